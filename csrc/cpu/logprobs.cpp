// CPU log-probs and entropy from logits: rows in parallel (at::parallel_for
// over OpenMP), each row in two vectorised sweeps. The second sweep re-reads
// a row that is still in L2 (V=32000 fp32 is 125 KiB, V=151936 is 594 KiB),
// so DRAM sees the logits once, and no (N, V) intermediate exists.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {
namespace {

// ---------------- row kernels ----------------
// acc_t is float for fp32 / bf16 / fp16 logits and double for fp64.

template <typename acc_t>
struct RowStats {
  acc_t lse;
  acc_t entropy;
};

template <typename T, typename acc_t>
RLHF_FAST_INLINE RowStats<acc_t> fwd_row(const T* x, int64_t V, acc_t inv_t) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t v = to_acc(x[j]);
    m = v > m ? v : m;
  }
  // max(x * inv_t) == max(x) * inv_t: rounding is monotone and inv_t > 0.
  const acc_t mz = m * inv_t;
  acc_t s = 0, w = 0;  // sum e and sum (z - mz) * e, with e = exp(z - mz)
#pragma omp simd reduction(+ : s, w)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t d = to_acc(x[j]) * inv_t - mz;
    const acc_t e = exp_nonpos(d);
    s += e;
    w += e > acc_t(0) ? d * e : acc_t(0);  // -inf * 0 would be NaN
  }
  const acc_t log_s = std::log(s);
  // H = lse - E[z] = log s - w / s: no cancellation of two large terms, even
  // with logits of 1e4. NaN anywhere in the row reaches s, so the row is NaN.
  return {mz + log_s, log_s - w / s};
}

template <typename T, typename acc_t>
RLHF_FAST_INLINE acc_t dlogit(T x, acc_t inv_t, acc_t lse, acc_t mu, acc_t g_lp,
                              acc_t g_h, bool is_label) {
  const acc_t z = to_acc(x) * inv_t;
  const acc_t p = exp_nonpos(z - lse);
  const acc_t t = p > acc_t(0) ? p * (z - mu) : acc_t(0);
  return ((is_label ? g_lp : acc_t(0)) - g_lp * p - g_h * t) * inv_t;
}

template <typename T, typename acc_t>
RLHF_FAST_INLINE void bwd_row(const T* x, T* dx, int64_t V, int64_t label,
                              acc_t inv_t, acc_t lse, acc_t entropy, acc_t g_lp,
                              acc_t g_h) {
  const acc_t mu = lse - entropy;  // E_p[z]
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    from_acc(dlogit(x[j], inv_t, lse, mu, g_lp, g_h, false), dx + j);
  }
  // The label's term in full, so bf16 gradients are rounded once.
  from_acc(dlogit(x[label], inv_t, lse, mu, g_lp, g_h, true), dx + label);
}

// One out-of-line copy per dtype, cloned for AVX-512 / AVX2+FMA / baseline.
#define RLHF_FAST_ROW_KERNELS(T, acc_t)                                        \
  RLHF_FAST_CPU_CLONES RowStats<acc_t> fwd_row_k(const T* x, int64_t V,        \
                                                 acc_t inv_t) {                \
    return fwd_row<T, acc_t>(x, V, inv_t);                                     \
  }                                                                            \
  RLHF_FAST_CPU_CLONES void bwd_row_k(const T* x, T* dx, int64_t V,            \
                                      int64_t label, acc_t inv_t, acc_t lse,   \
                                      acc_t ent, acc_t g_lp, acc_t g_h) {      \
    bwd_row<T, acc_t>(x, dx, V, label, inv_t, lse, ent, g_lp, g_h);            \
  }
RLHF_FAST_ROW_KERNELS(float, float)
RLHF_FAST_ROW_KERNELS(bf16_bits, float)
RLHF_FAST_ROW_KERNELS(fp16_bits, float)
RLHF_FAST_ROW_KERNELS(double, double)
#undef RLHF_FAST_ROW_KERNELS

// ---------------- glue ----------------

void check_inputs(const at::Tensor& logits, const at::Tensor& labels,
                  double temperature, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected CPU tensors, got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (A, B, V), got ",
              logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1, op,
              ": logits must have stride 1 on the vocabulary dim, got strides ",
              logits.strides());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ||
                  dt == at::kDouble,
              op, ": logits must be float32, bfloat16, float16 or float64, got ",
              dt);
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ",
              labels.device(), " but logits on ", logits.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              op, ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1),
              op, ": labels must have shape ", logits.sizes().slice(0, 2),
              ", got ", labels.sizes());
  TORCH_CHECK(logits.size(2) > 0 || labels.numel() == 0, op,
              ": logits have an empty vocabulary dim");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite number > 0, got ", temperature);
}

[[noreturn]] void bad_label(int64_t label, int64_t row, int64_t V,
                            int64_t ignore_index) {
  TORCH_CHECK(false, "rlhf_fast.logprobs: label ", label, " at flat position ",
              row, " is outside [0, V=", V, ") and is not ignore_index (",
              ignore_index, ")");
}

// Rows per task so that each task touches at least ~32k logits: below that
// forking the OpenMP team costs more than it saves.
int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename acc_t, typename F>
void dispatch_logits(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<bf16_bits*>(nullptr));
    case at::kHalf: return f(static_cast<fp16_bits*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported logits dtype ", dt);
  }
}

template <typename T, typename acc_t>
void fwd_rows(const at::Tensor& logits, const int64_t* labels, acc_t inv_t,
              int64_t ignore_index, acc_t* lp, acc_t* ent, acc_t* lse) {
  const int64_t B = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * B;
  const int64_t sA = logits.stride(0), sB = logits.stride(1);
  const T* base = reinterpret_cast<const T*>(logits.const_data_ptr());
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = labels[r];
      if (y == ignore_index) {  // padding: never read, 0 out
        lp[r] = ent[r] = lse[r] = acc_t(0);
        continue;
      }
      if (y < 0 || y >= V) bad_label(y, r, V, ignore_index);
      const T* row = base + (r / B) * sA + (r % B) * sB;
      const RowStats<acc_t> st = fwd_row_k(row, V, inv_t);
      lse[r] = st.lse;
      ent[r] = st.entropy;
      lp[r] = to_acc(row[y]) * inv_t - st.lse;
    }
  });
}

template <typename T, typename acc_t>
void bwd_rows(const at::Tensor& logits, const int64_t* labels, acc_t inv_t,
              int64_t ignore_index, const acc_t* g_lp, const acc_t* g_h,
              const acc_t* lse, const acc_t* ent, T* dx) {
  const int64_t B = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * B;
  const int64_t sA = logits.stride(0), sB = logits.stride(1);
  const T* base = reinterpret_cast<const T*>(logits.const_data_ptr());
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* out = dx + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill_n(reinterpret_cast<char*>(out), V * sizeof(T), char(0));
        continue;
      }
      if (y < 0 || y >= V) bad_label(y, r, V, ignore_index);
      const T* row = base + (r / B) * sA + (r % B) * sB;
      bwd_row_k(row, out, V, y, inv_t, lse[r], ent[r], g_lp[r],
                g_h ? g_h[r] : acc_t(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature,
    int64_t ignore_index) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_fwd");
  const auto opts = logits.options().dtype(acc_dtype(logits));
  const auto shape = logits.sizes().slice(0, 2);
  at::Tensor lp = at::empty(shape, opts), ent = at::empty(shape, opts),
             lse = at::empty(shape, opts);
  if (lp.numel() == 0) return {lp, ent, lse};
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  if (logits.scalar_type() == at::kDouble) {
    fwd_rows<double, double>(logits, yp, 1.0 / temperature, ignore_index,
                             lp.data_ptr<double>(), ent.data_ptr<double>(),
                             lse.data_ptr<double>());
  } else {
    const float inv_t = static_cast<float>(1.0 / temperature);
    dispatch_logits<float>(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      fwd_rows<T, float>(logits, yp, inv_t, ignore_index, lp.data_ptr<float>(),
                         ent.data_ptr<float>(), lse.data_ptr<float>());
    });
  }
  return {lp, ent, lse};
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logprobs,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& lse, const at::Tensor& entropy,
                            double temperature, int64_t ignore_index) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_bwd");
  const auto acc = acc_dtype(logits);
  const auto shape = logits.sizes().slice(0, 2);
  auto prep = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == shape, "rlhf_fast::logprobs_bwd: ", name,
                " must have shape ", shape, ", got ", t.sizes());
    return t.to(acc).contiguous();
  };
  const at::Tensor glp = prep(grad_logprobs, "grad_logprobs");
  const at::Tensor lse_c = prep(lse, "lse"), ent_c = prep(entropy, "entropy");
  at::Tensor gh;
  if (grad_entropy.has_value() && grad_entropy->defined())
    gh = prep(*grad_entropy, "grad_entropy");
  at::Tensor dx = at::empty(logits.sizes(), logits.options().memory_format(
                                                at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  if (logits.scalar_type() == at::kDouble) {
    bwd_rows<double, double>(
        logits, yp, 1.0 / temperature, ignore_index, glp.const_data_ptr<double>(),
        gh.defined() ? gh.const_data_ptr<double>() : nullptr,
        lse_c.const_data_ptr<double>(), ent_c.const_data_ptr<double>(),
        dx.data_ptr<double>());
  } else {
    const float inv_t = static_cast<float>(1.0 / temperature);
    dispatch_logits<float>(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      bwd_rows<T, float>(logits, yp, inv_t, ignore_index,
                         glp.const_data_ptr<float>(),
                         gh.defined() ? gh.const_data_ptr<float>() : nullptr,
                         lse_c.const_data_ptr<float>(),
                         ent_c.const_data_ptr<float>(),
                         reinterpret_cast<T*>(dx.data_ptr()));
    });
  }
  return dx;
}

}  // namespace
}  // namespace cpu
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("logprobs_fwd", &rlhf_fast::cpu::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &rlhf_fast::cpu::logprobs_bwd_cpu);
}
