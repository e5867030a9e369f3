// Torch-side helpers shared by the CPU loss families (ppo_policy_loss.cpp,
// ppo_value_loss.cpp, kl_penalty.cpp): argument checks, option parsing, the
// aggregation's per-row scale, the row table (padded (B, T) rows or packed
// cu_seqlens segments) and rows read in the accumulation type.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include <optional>
#include <string>
#include <vector>

#include "rlhf_fast/cpu_math.h"
#include "rlhf_fast/kl_estimators.h"

namespace rlhf_fast {
namespace cpu {

enum Agg : int { kTokenMean = 0, kSeqTokenSum = 1, kSeqTokenMean = 2, kSeqTokenSumNorm = 3 };

inline Kl parse_kl(const std::string& s, const char* op) {
  if (s == "k1") return kK1;
  if (s == "k2") return kK2;
  if (s == "k3") return kK3;
  if (s == "abs") return kAbs;
  TORCH_CHECK(false, op, ": kind must be one of k1, k2, k3, abs; got '", s, "'");
}

inline Agg parse_agg(const std::string& s, const char* op) {
  if (s == "token-mean") return kTokenMean;
  if (s == "seq-mean-token-sum") return kSeqTokenSum;
  if (s == "seq-mean-token-mean") return kSeqTokenMean;
  if (s == "seq-mean-token-sum-norm") return kSeqTokenSumNorm;
  TORCH_CHECK(false, op, ": agg must be one of token-mean, seq-mean-token-sum, ",
              "seq-mean-token-mean, seq-mean-token-sum-norm; got '", s, "'");
}

// Per-row multiplier that turns row sums into the aggregated loss.
// N valid tokens in all, S non-empty rows, n_b valid tokens in row b.
inline double row_scale_of(Agg agg, double n_b, double N, double S, double norm) {
  switch (agg) {
    case kTokenMean: return N > 0 ? 1.0 / N : 0.0;
    case kSeqTokenSum: return n_b > 0 ? 1.0 / S : 0.0;
    case kSeqTokenMean: return n_b > 0 ? 1.0 / (S * n_b) : 0.0;
    default: return 1.0 / norm;
  }
}

// max that keeps a NaN of either side (std::max drops a NaN second argument)
inline double nan_max(double a, double b) { return b > a || b != b ? b : a; }

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": ", name, " must be float32, bfloat16, float16 or float64, got ", dt);
}

inline at::Tensor prep(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

inline at::Tensor prep_mask(const at::Tensor& mask, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor");
  TORCH_CHECK(mask.sizes() == shape, op, ": mask must have shape ", shape, ", got ", mask.sizes());
  at::Tensor m = mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte ? mask : mask.ne(0);
  return m.contiguous();
}

// The rows a loss kernel sweeps, as (offset, length): the B rows of a
// padded (B, T) batch (offset b * T, length T) or the S segments of a packed
// (total,) stream (docs/packing.md), so both layouts run the same row loop.
struct Rows {
  std::vector<int64_t> off;  // n + 1 offsets into the token tensors
  int64_t n = 0, max_len = 0, total = 0;
  int64_t start(int64_t b) const { return off[b]; }
  int64_t len(int64_t b) const { return off[b + 1] - off[b]; }
  bool packed = false;
  // rows per parallel task: about kTaskElems tokens, from the mean row length
  int64_t mean_len() const { return n > 0 ? std::max<int64_t>(1, total / n) : 1; }
};

// ref: the first token tensor, (B, T) without cu_seqlens, (total,) with it.
// The packed offsets are checked here too (the Python checks do not run
// under torch.compile): int32 / int64, 1-D, first 0, last total, non-decreasing.
inline Rows rows_of(const at::Tensor& ref, const std::optional<at::Tensor>& cu_seqlens, const char* op,
                    const char* name) {
  Rows r;
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) {
    TORCH_CHECK(ref.dim() == 2, op, ": ", name, " must be 2-D (B, T), got ", ref.sizes());
    r.n = ref.size(0), r.max_len = ref.size(1), r.total = r.n * r.max_len;
    r.off.resize(r.n + 1);
    for (int64_t b = 0; b <= r.n; ++b) r.off[b] = b * r.max_len;
    return r;
  }
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(ref.dim() == 1, op, ": with cu_seqlens, ", name, " must be 1-D (total,) packed tokens, got ",
              ref.sizes());
  TORCH_CHECK(cu.device().is_cpu(), op, ": cu_seqlens must be a CPU tensor, got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op, ": cu_seqlens must be 1-D (S + 1,), got ", cu.sizes());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* q = c.const_data_ptr<int64_t>();
  r.packed = true, r.n = c.size(0) - 1, r.total = ref.size(0);
  TORCH_CHECK_VALUE(q[0] == 0, op, ": cu_seqlens[0] must be 0, got ", q[0]);
  TORCH_CHECK_VALUE(q[r.n] == r.total, op, ": cu_seqlens[-1] = ", q[r.n],
                    " must equal the number of packed tokens (", r.total, ")");
  r.off.assign(q, q + r.n + 1);
  for (int64_t s = 0; s < r.n; ++s) {
    TORCH_CHECK_VALUE(q[s + 1] >= q[s], op, ": cu_seqlens must be non-decreasing: cu_seqlens[", s, "] = ", q[s],
                      " > cu_seqlens[", s + 1, "] = ", q[s + 1]);
    r.max_len = std::max(r.max_len, q[s + 1] - q[s]);
  }
  return r;
}

// seq-mean-token-sum-norm's divisor: agg_norm (> 0), or 0 on a packed
// stream for its longest segment (the padded default, T, is the longest
// row a padded batch can hold; read here from the offsets, no extra pass).
inline double packed_norm(const Rows& R, double agg_norm, const char* op) {
  TORCH_CHECK(agg_norm > 0 || (R.packed && agg_norm == 0), op, ": agg_norm must be > 0 (0: the longest ",
              "segment, packed only), got ", agg_norm);
  return agg_norm > 0 ? agg_norm : double(std::max<int64_t>(R.max_len, 1));
}

// A contiguous token tensor read row by row as acc_t: in place when the
// dtypes match, else converted into a per-thread scratch row (a row is at
// most a few 10k tokens: the conversion stays in L1/L2, no DRAM traffic).
template <typename acc_t>
struct RowSrc {
  const void* data = nullptr;
  at::ScalarType dt = at::kFloat;

  // the row at token offset off in place when it is already acc_t (no conversion), else null
  const acc_t* direct_row(int64_t off) const {
    return data != nullptr && dt == c10::CppTypeToScalarType<acc_t>::value ? static_cast<const acc_t*>(data) + off
                                                                           : nullptr;
  }

  const acc_t* row(int64_t off, int64_t len, acc_t* scratch) const {
    if (data == nullptr) return nullptr;
    if (dt == c10::CppTypeToScalarType<acc_t>::value) return static_cast<const acc_t*>(data) + off;
    switch (dt) {
      case at::kFloat: return convert(static_cast<const float*>(data) + off, len, scratch);
      case at::kDouble: return convert(static_cast<const double*>(data) + off, len, scratch);
      case at::kBFloat16: return convert(static_cast<const bf16_bits*>(data) + off, len, scratch);
      case at::kHalf: return convert(static_cast<const fp16_bits*>(data) + off, len, scratch);
      default: TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", dt);
    }
  }
  template <typename S>
  const acc_t* convert(const S* src, int64_t len, acc_t* dst) const {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<acc_t>(to_acc(src[t]));
    return dst;
  }
};

template <typename acc_t>
RowSrc<acc_t> src_of(const at::Tensor& t) {
  RowSrc<acc_t> s;
  if (t.defined()) s = {t.const_data_ptr(), t.scalar_type()};
  return s;
}

}  // namespace cpu
}  // namespace rlhf_fast
