// Torch-side helpers shared by the CPU loss families (ppo_policy_loss.cpp,
// ppo_value_loss.cpp, kl_penalty.cpp): argument checks, option parsing, the
// aggregation's per-row scale and (B, T) rows read in the accumulation type.
#pragma once

#include <ATen/ATen.h>

#include <string>

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

// A (B, T) contiguous input read row by row as acc_t: in place when the
// dtypes match, else converted into a per-thread scratch row (T <= a few
// 10k: the conversion stays in L1/L2 and costs no DRAM traffic).
template <typename acc_t>
struct RowSrc {
  const void* data = nullptr;
  at::ScalarType dt = at::kFloat;
  int64_t T = 0;

  // row b in place when it is already acc_t (no conversion), else null
  const acc_t* direct_row(int64_t b) const {
    return data != nullptr && dt == c10::CppTypeToScalarType<acc_t>::value ? static_cast<const acc_t*>(data) + b * T
                                                                           : nullptr;
  }

  const acc_t* row(int64_t b, acc_t* scratch) const {
    if (data == nullptr) return nullptr;
    const int64_t off = b * T;
    if (dt == c10::CppTypeToScalarType<acc_t>::value) return static_cast<const acc_t*>(data) + off;
    switch (dt) {
      case at::kFloat: return convert(static_cast<const float*>(data) + off, scratch);
      case at::kDouble: return convert(static_cast<const double*>(data) + off, scratch);
      case at::kBFloat16: return convert(static_cast<const bf16_bits*>(data) + off, scratch);
      case at::kHalf: return convert(static_cast<const fp16_bits*>(data) + off, scratch);
      default: TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", dt);
    }
  }
  template <typename S>
  const acc_t* convert(const S* src, acc_t* dst) const {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) dst[t] = static_cast<acc_t>(to_acc(src[t]));
    return dst;
  }
};

template <typename acc_t>
RowSrc<acc_t> src_of(const at::Tensor& t) {
  RowSrc<acc_t> s;
  if (t.defined()) s = {t.const_data_ptr(), t.scalar_type(), t.size(1)};
  return s;
}

}  // namespace cpu
}  // namespace rlhf_fast
