// CUDA glue for rlhf_fast::logprobs_fwd / logprobs_bwd: argument checks,
// device guard, current stream, dtype dispatch. The kernels live in
// rlhf_fast/logprobs.cuh (torch-free) and are instantiated by logprobs.cu;
// this file is compiled by the host compiler, so it sees only the launcher
// declarations from that header (the kernels sit behind __CUDACC__).
// Semantics match csrc/cpu/logprobs.cpp, error messages included.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../logprobs_checks.h"
#include "rlhf_fast/logprobs.cuh"

namespace rlhf_fast {
namespace gpu {
namespace {

void check_inputs(const at::Tensor& logits, const at::Tensor& labels,
                  double temperature, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": expected CUDA tensors, got logits on ",
              logits.device());
  check_logprobs_inputs(logits, labels, temperature, op);
  TORCH_CHECK(logits.size(2) <= kLogprobsMaxVocab, op, ": vocabulary of ",
              logits.size(2), " exceeds the CUDA kernel's limit of ",
              kLogprobsMaxVocab);
}

// Label range: rlhf_fast.logprobs_from_logits checks it in eager mode (one
// host sync). The kernels never read out of bounds for a bad label (it
// gives a NaN log-prob), so this glue adds no second sync, and the op stays
// capturable in CUDA graphs.

// Calls f with a null T* naming the kernel's element type: at::BFloat16 and
// at::Half are bit-identical to __nv_bfloat16 and __half (2-byte IEEE-style
// storage), so data pointers are reinterpret_cast across.
template <typename F>
void dispatch_logits(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    case at::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    case at::kHalf: return f(static_cast<__half*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported logits dtype ", dt);
  }
}
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) &&
                  sizeof(at::Half) == sizeof(__half),
              "2-byte float types must match between ATen and CUDA");

LogprobsFwdOut logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                 double temperature, int64_t ignore_index,
                                 bool compute_entropy) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_fwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  LogprobsFwdOut out = logprobs_fwd_outputs(logits);
  at::Tensor &lp = std::get<0>(out), &ent = std::get<1>(out),
             &row_max = std::get<2>(out), &log_s = std::get<3>(out);
  if (lp.numel() == 0) return out;
  const int64_t A = logits.size(0), B = logits.size(1), V = logits.size(2);
  const at::Tensor y = logprobs_labels(labels);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_type_t<T>;
    C10_CUDA_CHECK(launch_logprobs_fwd<T>(
        reinterpret_cast<const T*>(logits.const_data_ptr()),
        y.const_data_ptr<int64_t>(), lp.data_ptr<acc_t>(), ent.data_ptr<acc_t>(),
        row_max.data_ptr<acc_t>(), log_s.data_ptr<acc_t>(), A, B, V,
        logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
        compute_entropy, stream));
  });
  return out;
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logprobs,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& row_max, const at::Tensor& log_s,
                             const at::Tensor& entropy, double temperature,
                             int64_t ignore_index) {
  check_inputs(logits, labels, temperature, "rlhf_fast::logprobs_bwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const LogprobsBwdRows in =
      logprobs_bwd_rows(grad_logprobs, grad_entropy, logits, row_max, log_s, entropy);
  const at::Tensor &glp = in.grad_logprobs, &gh = in.grad_entropy;
  at::Tensor dx = logprobs_grad_logits(logits);
  if (dx.numel() == 0) return dx;
  const int64_t A = logits.size(0), B = logits.size(1), V = logits.size(2);
  const at::Tensor y = logprobs_labels(labels);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = acc_type_t<T>;
    C10_CUDA_CHECK(launch_logprobs_bwd<T>(
        glp.const_data_ptr<acc_t>(),
        gh.defined() ? gh.const_data_ptr<acc_t>() : nullptr,
        reinterpret_cast<const T*>(logits.const_data_ptr()),
        y.const_data_ptr<int64_t>(), in.row_max.const_data_ptr<acc_t>(),
        in.log_s.const_data_ptr<acc_t>(), in.entropy.const_data_ptr<acc_t>(),
        reinterpret_cast<T*>(dx.data_ptr()), A, B,
        V, logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
        stream));
  });
  return dx;
}

}  // namespace
}  // namespace gpu
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("logprobs_fwd", &rlhf_fast::gpu::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &rlhf_fast::gpu::logprobs_bwd_cuda);
}
