// The dtype every op computes and returns its floating results in: fp64 for
// fp64 inputs, fp32 for fp32 / bf16 / fp16 (torch-side twin of cpu_math.h's
// acc_type<T>). Shared by the CPU and CUDA glue.
#pragma once

#include <c10/core/ScalarType.h>

namespace rlhf_fast {

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rlhf_fast
