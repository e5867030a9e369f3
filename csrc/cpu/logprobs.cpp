// CPU log-probs and entropy from logits: rows in parallel (at::parallel_for
// over OpenMP), each row in two vectorised sweeps. The second sweep re-reads
// a row that is still in L2 (V=32000 fp32 is 125 KiB, V=151936 is 594 KiB),
// so DRAM sees the logits once, and no (N, V) intermediate exists.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../logprobs_checks.h"
#include "parallel.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"
#include "rlhf_fast/logprobs_row.h"

namespace rlhf_fast {
namespace cpu {
namespace {

// ---------------- row kernels ----------------
// float accumulation for fp32 / bf16 / fp16 logits, W floats per vector
// (cpu_math.h); a scalar double path for fp64.

// H = lse - E[z] = log s - w / s: no cancellation of two large terms, even
// with logits of 1e4. NaN anywhere in the row reaches s, so the row is NaN;
// so is a row whose lse = m * inv_t + log s overflows.
template <typename acc_t>
RLHF_FAST_INLINE RowStats<acc_t> finish_row(acc_t m, acc_t inv_t, acc_t s, acc_t w) {
  const acc_t log_s = std::log(s);
  const acc_t lse = m * inv_t + log_s;
  if (std::isinf(lse)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, nan, m, nan};
  }
  return {lse, log_s - w / s, m, log_s};
}

template <int W, typename T>
RLHF_FAST_INLINE RowStats<float> fwd_row(const T* x, int64_t V, float inv_t) {
  using vf = typename Vec<W>::f;
  constexpr int K = kLanes / W;
  const int64_t Vb = V / kLanes * kLanes;
  vf vm[K];
  for (int k = 0; k < K; ++k) vm[k] = splat<W>(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < Vb; j += kLanes)
    for (int k = 0; k < K; ++k) {
      const vf v = load<W>(x + j + k * W);
      vm[k] = v > vm[k] ? v : vm[k];
    }
  float m = max_lanes<W>(vm);
  for (int64_t j = Vb; j < V; ++j) m = to_acc(x[j]) > m ? to_acc(x[j]) : m;
  const vf vmax = splat<W>(m);

  // s = sum e and w = sum d * e, with d = (x - m) * inv_t <= 0 and
  // e = exp(d) <= 1. The second sweep re-reads the row from L2, not DRAM.
  vf vs[K] = {}, vw[K] = {};
  for (int64_t j = 0; j < Vb; j += kLanes)
    for (int k = 0; k < K; ++k) {
      const vf d = (load<W>(x + j + k * W) - vmax) * inv_t;
      const vf e = exp_nonpos<W>(d);
      vs[k] += e;
      vw[k] += e > 0.f ? d * e : splat<W>(0.f);  // -inf * 0 would be NaN
    }
  for (int64_t j = Vb; j < V; ++j) {  // tail: lane j - Vb, as a full block would
    const int l = static_cast<int>(j - Vb);
    const float d = (to_acc(x[j]) - m) * inv_t;
    const float e = exp_nonpos(d);
    vs[l / W][l % W] += e;
    vw[l / W][l % W] += e > 0.f ? d * e : 0.f;
  }
  const float s = sum_lanes<W>(vs), w = sum_lanes<W>(vw);
  return finish_row(m, inv_t, s, w);
}

// p_j = exp(d_j - log s) and log p_j + H = d_j - E_p[d], with
// d_j = (x_j - m) / T <= 0 and E_p[d] = log s - H: every term is of the
// row's spread. (From the absolute lse, z_j - lse cancels two numbers of the
// offset's size: fp32 lost 5e-4 of the gradient at logits of 1e4, 0.29 at
// 1e7.) One FSUB per element more than z_j - lse.
template <int W, typename T>
RLHF_FAST_INLINE void bwd_row(const T* x, T* dx, int64_t V, int64_t label,
                              float inv_t, float m, float log_s, float entropy,
                              float g_lp, float g_h) {
  using vf = typename Vec<W>::f;
  const float mu = log_s - entropy;  // E_p[d]
  const vf vm = splat<W>(m);
  const int64_t Vb = V / W * W;
  for (int64_t j = 0; j < Vb; j += W) {
    const vf d = (load<W>(x + j) - vm) * inv_t;
    const vf p = exp_nonpos<W>(d - log_s);
    const vf t = p > 0.f ? p * (d - mu) : splat<W>(0.f);
    store<W>((-g_lp * p - g_h * t) * inv_t, dx + j);
  }
  auto scalar = [&](int64_t j, bool is_label) {
    const float d = (to_acc(x[j]) - m) * inv_t;
    const float p = exp_nonpos(d - log_s);
    const float t = p > 0.f ? p * (d - mu) : 0.f;
    from_acc(((is_label ? g_lp : 0.f) - g_lp * p - g_h * t) * inv_t, dx + j);
  };
  for (int64_t j = Vb; j < V; ++j) scalar(j, false);
  scalar(label, true);  // the label's term in full: bf16 rounds once
}

// The kernels for isa_call (cpu_isa.h): W = 16 / 8 / 4 floats per vector.
// The 16 partial sums are the same in every copy, so all give the same bits.
struct FwdRow {
  template <int W, typename T>
  static RLHF_FAST_INLINE RowStats<float> run(const T* x, int64_t V, float inv_t) {
    return fwd_row<W>(x, V, inv_t);
  }
};

struct BwdRow {
  template <int W, typename T>
  static RLHF_FAST_INLINE void run(const T* x, T* dx, int64_t V, int64_t y, float it, float m, float log_s,
                                   float h, float gl, float gh) {
    bwd_row<W>(x, dx, V, y, it, m, log_s, h, gl, gh);
  }
};

template <typename T>
void bwd_row_k(const T* x, T* dx, int64_t V, int64_t y, float it, float m, float log_s, float h, float gl,
               float gh) {
  isa_call<BwdRow>(x, dx, V, y, it, m, log_s, h, gl, gh);
}

}  // namespace

// The row statistics, declared in logprobs_row.h and shared with the sampler
// so that a sampled token's log-prob is bit-identical to logprobs_from_logits.
RowStats<float> logprobs_row_stats(const float* x, int64_t V, float t) { return isa_call<FwdRow>(x, V, t); }
RowStats<float> logprobs_row_stats(const bf16_bits* x, int64_t V, float t) { return isa_call<FwdRow>(x, V, t); }
RowStats<float> logprobs_row_stats(const fp16_bits* x, int64_t V, float t) { return isa_call<FwdRow>(x, V, t); }
RowStats<double> logprobs_row_stats(const double* x, int64_t V, double inv_t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
  double s = 0, w = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double d = (x[j] - m) * inv_t;
    const double e = std::exp(d);
    s += e;
    w += e > 0 ? d * e : 0.0;
  }
  return finish_row(m, inv_t, s, w);
}


namespace {


// float64 (gradcheck, float64 references): scalar, libm exp, one copy.
void bwd_row_k(const double* x, double* dx, int64_t V, int64_t y, double inv_t,
               double m, double log_s, double entropy, double g_lp, double g_h) {
  const double mu = log_s - entropy;  // E_p[d], as in bwd_row
  for (int64_t j = 0; j < V; ++j) {
    const double d = (x[j] - m) * inv_t;
    const double p = std::exp(d - log_s);
    const double t = p > 0 ? p * (d - mu) : 0.0;
    dx[j] = ((j == y ? g_lp : 0.0) - g_lp * p - g_h * t) * inv_t;
  }
}

// ---------------- glue ----------------

void check_inputs(const at::Tensor& logits, const at::Tensor& labels,
                  double temperature, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected CPU tensors, got ",
              logits.device());
  check_logprobs_inputs(logits, labels, temperature, op);
}

[[noreturn]] void bad_label(int64_t label, int64_t row, int64_t V,
                            int64_t ignore_index) {
  TORCH_CHECK(false, "rlhf_fast.logprobs: label ", label, " at flat position ",
              row, " is outside [0, V=", V, ") and is not ignore_index (",
              ignore_index, ")");
}

template <typename F>
void dispatch_logits(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<bf16_bits*>(nullptr));
    case at::kHalf: return f(static_cast<fp16_bits*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported logits dtype ", dt);
  }
}

// compute_entropy = false: the entropy is still formed (the row statistics
// are shared with the sampler, which must match their bits) but 0 is
// written, as the Triton kernel's log-prob-only sweep leaves it.
template <typename T, typename acc_t>
void fwd_rows(const at::Tensor& logits, const int64_t* labels, acc_t inv_t,
              int64_t ignore_index, bool compute_entropy, acc_t* lp, acc_t* ent,
              acc_t* row_max, acc_t* log_s) {
  const int64_t B = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * B;
  const int64_t sA = logits.stride(0), sB = logits.stride(1);
  const T* base = reinterpret_cast<const T*>(logits.const_data_ptr());
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = labels[r];
      if (y == ignore_index) {  // padding: never read, 0 out
        lp[r] = ent[r] = row_max[r] = log_s[r] = acc_t(0);
        continue;
      }
      if (y < 0 || y >= V) bad_label(y, r, V, ignore_index);
      const T* row = base + (r / B) * sA + (r % B) * sB;
      const RowStats<acc_t> st = logprobs_row_stats(row, V, inv_t);
      row_max[r] = st.max_x;
      log_s[r] = st.log_s;
      ent[r] = compute_entropy ? st.entropy : acc_t(0);
      lp[r] = (to_acc(row[y]) - st.max_x) * inv_t - st.log_s;
    }
  });
}

template <typename T, typename acc_t>
void bwd_rows(const at::Tensor& logits, const int64_t* labels, acc_t inv_t,
              int64_t ignore_index, const acc_t* g_lp, const acc_t* g_h,
              const acc_t* row_max, const acc_t* log_s, const acc_t* ent, T* dx) {
  const int64_t B = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * B;
  const int64_t sA = logits.stride(0), sB = logits.stride(1);
  const T* base = reinterpret_cast<const T*>(logits.const_data_ptr());
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* out = dx + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill_n(reinterpret_cast<char*>(out), V * sizeof(T), char(0));
        continue;
      }
      if (y < 0 || y >= V) bad_label(y, r, V, ignore_index);
      const T* row = base + (r / B) * sA + (r % B) * sB;
      bwd_row_k(row, out, V, y, inv_t, row_max[r], log_s[r], ent[r], g_lp[r],
                g_h ? g_h[r] : acc_t(0));
    }
  });
}

LogprobsFwdOut logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                double temperature, int64_t ignore_index,
                                bool compute_entropy) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_fwd");
  LogprobsFwdOut out = logprobs_fwd_outputs(logits);
  at::Tensor &lp = std::get<0>(out), &ent = std::get<1>(out),
             &row_max = std::get<2>(out), &log_s = std::get<3>(out);
  if (lp.numel() == 0) return out;
  const at::Tensor y = logprobs_labels(labels);
  const int64_t* yp = y.const_data_ptr<int64_t>();
  if (logits.scalar_type() == at::kDouble) {
    fwd_rows<double, double>(logits, yp, 1.0 / temperature, ignore_index,
                             compute_entropy, lp.data_ptr<double>(),
                             ent.data_ptr<double>(), row_max.data_ptr<double>(),
                             log_s.data_ptr<double>());
  } else {
    const float inv_t = static_cast<float>(1.0 / temperature);
    dispatch_logits(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      fwd_rows<T, float>(logits, yp, inv_t, ignore_index, compute_entropy,
                         lp.data_ptr<float>(), ent.data_ptr<float>(),
                         row_max.data_ptr<float>(), log_s.data_ptr<float>());
    });
  }
  return out;
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logprobs,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& row_max, const at::Tensor& log_s,
                            const at::Tensor& entropy, double temperature,
                            int64_t ignore_index) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_bwd");
  const LogprobsBwdRows in =
      logprobs_bwd_rows(grad_logprobs, grad_entropy, logits, row_max, log_s, entropy);
  const at::Tensor &glp = in.grad_logprobs, &gh = in.grad_entropy;
  at::Tensor dx = logprobs_grad_logits(logits);
  if (dx.numel() == 0) return dx;
  const at::Tensor y = logprobs_labels(labels);
  const int64_t* yp = y.const_data_ptr<int64_t>();
  if (logits.scalar_type() == at::kDouble) {
    bwd_rows<double, double>(
        logits, yp, 1.0 / temperature, ignore_index, glp.const_data_ptr<double>(),
        gh.defined() ? gh.const_data_ptr<double>() : nullptr,
        in.row_max.const_data_ptr<double>(), in.log_s.const_data_ptr<double>(),
        in.entropy.const_data_ptr<double>(), dx.data_ptr<double>());
  } else {
    const float inv_t = static_cast<float>(1.0 / temperature);
    dispatch_logits(logits.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      bwd_rows<T, float>(logits, yp, inv_t, ignore_index,
                         glp.const_data_ptr<float>(),
                         gh.defined() ? gh.const_data_ptr<float>() : nullptr,
                         in.row_max.const_data_ptr<float>(),
                         in.log_s.const_data_ptr<float>(),
                         in.entropy.const_data_ptr<float>(),
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
