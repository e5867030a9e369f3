// Argument checks and dtype facts shared by the CPU and CUDA glue of
// rlhf_fast::logprobs_fwd / logprobs_bwd (torch-side; kernels stay torch-free).
#pragma once

#include <ATen/ATen.h>

#include "acc_dtype.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace rlhf_fast {

inline void check_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels,
                                  double temperature, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (A, B, V), got ", logits.sizes());
  // V <= 1 may carry any stride (a slice of width 1): only j = 0 is read.
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1, op,
              ": logits must have stride 1 on the vocabulary dim, got strides ", logits.strides());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": logits must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              op, ": labels must have shape ", logits.sizes().slice(0, 2), ", got ", labels.sizes());
  TORCH_CHECK(logits.size(2) > 0 || labels.numel() == 0, op, ": logits have an empty vocabulary dim");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite number > 0, got ", temperature);
}

// fp32 results for fp32 / bf16 / fp16 logits, fp64 for fp64.
inline at::ScalarType logprobs_acc_dtype(const at::Tensor& logits) { return acc_dtype(logits.scalar_type()); }

// The forward's (A, B) outputs (log-probs, entropy, row max, log s) in the
// acc dtype, allocated the same way by the CPU and CUDA glue.
using LogprobsFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LogprobsFwdOut logprobs_fwd_outputs(const at::Tensor& logits) {
  const auto opts = logits.options().dtype(logprobs_acc_dtype(logits));
  const auto shape = logits.sizes().slice(0, 2);
  return {at::empty(shape, opts), at::empty(shape, opts), at::empty(shape, opts), at::empty(shape, opts)};
}

// The backward's grad_logits: contiguous (A, B, V) in the logits dtype,
// whatever the logits' strides (the kernels write rows of V back to back).
inline at::Tensor logprobs_grad_logits(const at::Tensor& logits) {
  return at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
}

// Labels as contiguous int64: int32 labels are widened once, here.
inline at::Tensor logprobs_labels(const at::Tensor& labels) { return labels.to(at::kLong).contiguous(); }

// The backward's (A, B) per-row inputs as contiguous acc_t tensors (an
// expanded grad from .sum(), stride 0, becomes a real copy of A*B values).
// grad_entropy is undefined when the entropy output took no gradient.
struct LogprobsBwdRows {
  at::Tensor grad_logprobs, grad_entropy, row_max, log_s, entropy;
};

inline LogprobsBwdRows logprobs_bwd_rows(const at::Tensor& grad_logprobs,
                                         const std::optional<at::Tensor>& grad_entropy,
                                         const at::Tensor& logits, const at::Tensor& row_max,
                                         const at::Tensor& log_s, const at::Tensor& entropy) {
  const auto acc = logprobs_acc_dtype(logits);
  const auto shape = logits.sizes().slice(0, 2);
  auto prep = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == logits.device(), "rlhf_fast::logprobs_bwd: ", name, " is on ",
                t.device(), " but logits on ", logits.device());
    TORCH_CHECK(t.sizes() == shape, "rlhf_fast::logprobs_bwd: ", name, " must have shape ", shape,
                ", got ", t.sizes());
    return t.to(acc).contiguous();
  };
  LogprobsBwdRows rows{prep(grad_logprobs, "grad_logprobs"), at::Tensor(), prep(row_max, "row_max"),
                       prep(log_s, "log_s"), prep(entropy, "entropy")};
  if (grad_entropy.has_value() && grad_entropy->defined())
    rows.grad_entropy = prep(*grad_entropy, "grad_entropy");
  return rows;
}

}  // namespace rlhf_fast
