// nvcc translation unit for the log-probs / entropy kernels: torch-free, so
// it compiles wherever nvcc exists (scripts/check_cuda_compile.sh). The glue
// in logprobs_ops.cpp sees only the launcher declarations and links against
// the four instantiations below.
#include "rlhf_fast/logprobs.cuh"

namespace rlhf_fast {
namespace gpu {

#define RLHF_FAST_INSTANTIATE_LOGPROBS(T)                                       \
  template cudaError_t launch_logprobs_fwd<T>(                                  \
      const T*, const int64_t*, acc_type_t<T>*, acc_type_t<T>*, acc_type_t<T>*, \
      acc_type_t<T>*, int64_t, int64_t, int64_t, int64_t, int64_t, double,      \
      int64_t, bool, cudaStream_t);                                             \
  template cudaError_t launch_logprobs_bwd<T>(                                  \
      const acc_type_t<T>*, const acc_type_t<T>*, const T*, const int64_t*,     \
      const acc_type_t<T>*, const acc_type_t<T>*, const acc_type_t<T>*, T*,     \
      int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t,             \
      cudaStream_t);

RLHF_FAST_INSTANTIATE_LOGPROBS(float)
RLHF_FAST_INSTANTIATE_LOGPROBS(__nv_bfloat16)
RLHF_FAST_INSTANTIATE_LOGPROBS(__half)
RLHF_FAST_INSTANTIATE_LOGPROBS(double)

#undef RLHF_FAST_INSTANTIATE_LOGPROBS

}  // namespace gpu
}  // namespace rlhf_fast
