// Torch-side helpers shared by the CPU advantage estimators
// (advantages_gae.cpp, advantages_norm.cpp): element and mask dtype dispatch
// and the input checks.
#pragma once

#include <ATen/ATen.h>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {

template <typename F>
inline void dispatch_value(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<bf16_bits*>(nullptr));
    case at::kHalf: return f(static_cast<fp16_bits*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", dt);
  }
}

// Masks are read in their own dtype (bool, int8/uint8, int32, int64, fp32,
// fp64: no conversion pass); any other dtype is converted to bool once.
inline at::Tensor mask_for_kernel(const at::Tensor& mask) {
  switch (mask.scalar_type()) {
    case at::kBool: case at::kByte: case at::kChar: case at::kInt:
    case at::kLong: case at::kFloat: case at::kDouble:
      return mask;
    default:
      return mask.ne(0);
  }
}

template <typename F>
inline void dispatch_mask(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kBool: case at::kByte: return f(static_cast<uint8_t*>(nullptr));
    case at::kChar: return f(static_cast<int8_t*>(nullptr));
    case at::kInt: return f(static_cast<int32_t*>(nullptr));
    case at::kLong: return f(static_cast<int64_t*>(nullptr));
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported mask dtype ", dt);
  }
}

// Inner dim contiguous; any row stride is read in place.
inline at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

inline void check_2d(const at::Tensor& t, const char* op, const char* name,
              at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name,
              " on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (B, T), got ",
              t.sizes());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape,
              " (the rewards' shape), got ", t.sizes());
}

}  // namespace cpu
}  // namespace rlhf_fast
