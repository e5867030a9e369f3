// Torch-side helpers shared by the CPU advantage estimators
// (advantages_gae.cpp, advantages_norm.cpp): element and mask dtype dispatch
// and the input checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

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

// A mask is read as raw bits of its width (1, 4 or 8 bytes): valid where
// (bits & keep) != 0. keep is all ones for bool / integer masks and all but
// the sign bit for fp32 / fp64 ones, so -0.0 is masked and NaN valid, as
// `x != 0` says. Three element types instead of six halve every kernel
// instantiated per mask type (the AND with a broadcast constant costs one
// vector op per load). A byte mask's keep is always 0xff: mask_keep() gives
// the kernels that as a constant, so the AND folds away (as a run-time
// value through the ISA copies' calls it cost discounted returns ~6% at
// (512, 4096)).
template <typename M>
RLHF_FAST_INLINE M mask_keep(M keep) {
  return sizeof(M) == 1 ? M(0xff) : keep;
}

template <typename F>
inline void dispatch_mask(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kBool: case at::kByte: case at::kChar: return f(uint8_t{0xff});
    case at::kInt: return f(~uint32_t{0});
    case at::kFloat: return f(uint32_t{0x7fffffff});
    case at::kLong: return f(~uint64_t{0});
    case at::kDouble: return f(uint64_t{0x7fffffffffffffff});
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

inline void check_1d(const at::Tensor& t, const char* op, const char* name,
                     at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name,
              " on ", t.device());
  TORCH_CHECK(t.dim() == 1, op, ": with cu_seqlens, ", name,
              " must be 1-D (total,) packed tokens, got ", t.sizes());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape,
              " (the rewards' shape), got ", t.sizes());
}

// The packed layout's offsets (docs/packing.md), checked again here because
// under torch.compile the Python checks do not run; the same messages as
// rlhf_fast/ops/_packing.py. Returns them as int64.
inline std::vector<int64_t> read_cu_seqlens(const char* op, const at::Tensor& cu_in,
                                            int64_t total) {
  TORCH_CHECK(cu_in.scalar_type() == at::kInt || cu_in.scalar_type() == at::kLong, op,
              ": cu_seqlens must have dtype int32 or int64, got ", cu_in.scalar_type());
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 1, op,
              ": cu_seqlens must be 1-D (S + 1,) offsets starting at 0 and ending at total, got shape ",
              cu_in.sizes());
  TORCH_CHECK(cu_in.device().is_cpu(), op, ": cu_seqlens is on ", cu_in.device(),
              " but the token tensors are on cpu");
  const at::Tensor c = cu_in.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  std::vector<int64_t> cu(p, p + c.size(0));
  TORCH_CHECK(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK(cu.back() == total, op, ": cu_seqlens[-1] = ", cu.back(),
              " must equal the number of packed tokens (", total, ")");
  for (size_t s = 0; s + 1 < cu.size(); ++s)
    TORCH_CHECK(cu[s] <= cu[s + 1], op, ": cu_seqlens must be non-decreasing: cu_seqlens[", s,
                "] = ", cu[s], " > cu_seqlens[", s + 1, "] = ", cu[s + 1]);
  return cu;
}

}  // namespace cpu
}  // namespace rlhf_fast
