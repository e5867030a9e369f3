// Torch glue for the CUDA advantage scans (csrc/cuda/advantages.cu): checks,
// dtype choice, device guard, current stream. Compiled only where a CUDA
// build of torch and nvcc exist (setup.py). whiten / group_advantages on CUDA
// tensors run as Triton ops (rlhf_fast/ops/_advantages.py), not here.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>

#include "../acc_dtype.h"
#include "rlhf_fast/advantages.cuh"

namespace rlhf_fast {
namespace cuda {
namespace {

ValueType value_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ValueType::kF32;
    case at::kBFloat16: return ValueType::kBF16;
    case at::kHalf: return ValueType::kF16;
    case at::kDouble: return ValueType::kF64;
    default: TORCH_CHECK(false, "rlhf_fast: rewards/values must be float32, bfloat16, float16 or float64, got ", t);
  }
}

// Masks read in place in these dtypes; anything else becomes bool once.
std::tuple<at::Tensor, MaskType> mask_for_kernel(const at::Tensor& m) {
  switch (m.scalar_type()) {
    case at::kBool: case at::kByte: return {m, MaskType::kU8};
    case at::kChar: return {m, MaskType::kI8};
    case at::kInt: return {m, MaskType::kI32};
    case at::kLong: return {m, MaskType::kI64};
    case at::kFloat: return {m, MaskType::kF32};
    case at::kDouble: return {m, MaskType::kF64};
    default: return {m.ne(0), MaskType::kU8};
  }
}

at::Tensor inner_contiguous(const at::Tensor& t) {
  if (t.dim() == 1) return t.contiguous();  // packed (total,)
  return (t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

void check_2d(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but rewards on ",
              like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ",
              like.sizes(), " (the rewards' shape), got ", t.sizes());
}

// (B,) per-row values in the accumulation dtype, or an undefined tensor. Their
// range was checked by rlhf_fast/ops/_advantages.py (a check here would cost a
// device sync per call).
at::Tensor per_row(const std::optional<at::Tensor>& rows, int64_t B, at::ScalarType acc,
                   const at::Tensor& like, const char* op, const char* name) {
  if (!rows.has_value() || !rows->defined()) return at::Tensor();
  TORCH_CHECK(rows->numel() == B, op, ": ", name, " as a tensor must have one value per row (", B,
              "), got shape ", rows->sizes());
  return rows->to(like.device(), acc).reshape({B}).contiguous();
}

void check_scalar(double x, const char* op, const char* name) {
  TORCH_CHECK(x >= 0.0 && x <= 1.0, op, ": ", name, " must lie in [0, 1], got ", x);
}

std::tuple<at::Tensor, at::Tensor> scan_cuda(const char* op, const at::Tensor& rewards_in,
                                             const at::Tensor* values_in, const at::Tensor& mask_in,
                                             double gamma, double lam,
                                             const std::optional<at::Tensor>& gamma_rows,
                                             const std::optional<at::Tensor>& lam_rows,
                                             const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(rewards_in.is_cuda(), op, ": expected CUDA tensors, got ", rewards_in.device());
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  const int64_t want_dim = packed ? 1 : 2;
  TORCH_CHECK(rewards_in.dim() == want_dim, op, packed ? ": with cu_seqlens, rewards must be 1-D (total,), got "
              : ": rewards must be 2-D (B, T), got ", rewards_in.sizes());
  check_2d(mask_in, rewards_in, op, "mask");
  // Packed offsets: dtype, shape and device here; their values are not read
  // on the host (a sync): the kernel clamps them into [0, total]
  // (docs/packing.md, what is checked where).
  if (packed) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong, op,
                ": cu_seqlens must have dtype int32 or int64, got ", cu_seqlens->scalar_type());
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 1, op,
                ": cu_seqlens must be 1-D (S + 1,) offsets starting at 0 and ending at total, got shape ",
                cu_seqlens->sizes());
    TORCH_CHECK(cu_seqlens->device() == rewards_in.device(), op, ": cu_seqlens is on ", cu_seqlens->device(),
                " but the token tensors are on ", rewards_in.device());
  }
  check_scalar(gamma, op, "gamma");
  check_scalar(lam, op, "lam");
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  at::ScalarType vt = rewards_in.scalar_type();
  if (values_in) {
    check_2d(*values_in, rewards_in, op, "values");
    if (values_in->scalar_type() != vt)
      vt = (vt == at::kDouble || values_in->scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  }
  const ValueType vtype = value_type(vt);
  const at::ScalarType acc = acc_dtype(vt);
  const at::Tensor cu = packed ? cu_seqlens->contiguous() : at::Tensor();
  const int64_t S = packed ? cu.size(0) - 1 : 0;
  const int64_t B = packed ? S : rewards_in.size(0);
  const int64_t T = packed ? rewards_in.size(0) : rewards_in.size(1);
  const at::Tensor g = per_row(gamma_rows, B, acc, rewards_in, op, "gamma");
  const at::Tensor l = values_in ? per_row(lam_rows, B, acc, rewards_in, op, "lam") : at::Tensor();
  const at::Tensor r = inner_contiguous(rewards_in.to(vt));
  const at::Tensor v = values_in ? inner_contiguous(values_in->to(vt)) : at::Tensor();
  auto [m_raw, mtype] = mask_for_kernel(mask_in);
  const at::Tensor m = inner_contiguous(m_raw);
  const auto opts = rewards_in.options().dtype(acc);
  at::Tensor adv = at::empty(rewards_in.sizes(), opts);
  at::Tensor ret = values_in ? at::empty(rewards_in.sizes(), opts) : adv;
  if (adv.numel() == 0) return {adv, ret};

  ScanArgs a{};
  a.rewards = r.const_data_ptr();
  a.values = values_in ? v.const_data_ptr() : nullptr;
  a.mask = m.const_data_ptr();
  a.stride_r = packed ? 0 : r.stride(0);
  a.stride_v = values_in && !packed ? v.stride(0) : 0;
  a.stride_m = packed ? 0 : m.stride(0);
  a.value_type = vtype;
  a.mask_type = mtype;
  a.gamma_rows = g.defined() ? g.const_data_ptr() : nullptr;
  a.lam_rows = l.defined() ? l.const_data_ptr() : nullptr;
  a.gamma = gamma;
  a.lam = lam;
  a.advantages = adv.data_ptr();
  a.returns = values_in ? ret.data_ptr() : nullptr;
  a.B = packed ? 0 : B;
  a.T = T;
  a.cu_seqlens = packed ? cu.const_data_ptr() : nullptr;
  a.cu_int64 = packed && cu.scalar_type() == at::kLong;
  a.S = S;
  const cudaError_t err = launch_advantage_scan(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam,
                                            const std::optional<at::Tensor>& gamma_rows,
                                            const std::optional<at::Tensor>& lam_rows,
                                            const std::optional<at::Tensor>& cu_seqlens) {
  return scan_cuda("rlhf_fast::gae", rewards, &values, mask, gamma, lam, gamma_rows, lam_rows, cu_seqlens);
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                   const std::optional<at::Tensor>& gamma_rows,
                                   const std::optional<at::Tensor>& cu_seqlens) {
  return std::get<0>(scan_cuda("rlhf_fast::discounted_returns", rewards, nullptr, mask, gamma, 1.0,
                               gamma_rows, std::nullopt, cu_seqlens));
}

}  // namespace
}  // namespace cuda
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae", &rlhf_fast::cuda::gae_cuda);
  m.impl("discounted_returns", &rlhf_fast::cuda::discounted_returns_cuda);
}
