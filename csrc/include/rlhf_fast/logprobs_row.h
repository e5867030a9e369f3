// Per-row statistics of softmax(x / T) computed by the CPU log-prob kernel
// (csrc/cpu/logprobs.cpp). The sampler calls the same functions, so rollout
// log-probs and training log-probs agree bit for bit on the CPU.
#pragma once

#include <cstdint>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {

template <typename acc_t>
struct RowStats {
  acc_t lse;      // log sum exp(z), z = x * (1 / T)
  acc_t entropy;  // of softmax(z)
  acc_t max_z;    // max(z): the shift every exp in the row used
};

// x: one row of V logits; inv_t = 1 / temperature > 0. NaN in the row, or a
// row of only -inf, gives NaN statistics.
RowStats<float> logprobs_row_stats(const float* x, int64_t V, float inv_t);
RowStats<float> logprobs_row_stats(const bf16_bits* x, int64_t V, float inv_t);
RowStats<float> logprobs_row_stats(const fp16_bits* x, int64_t V, float inv_t);
RowStats<double> logprobs_row_stats(const double* x, int64_t V, double inv_t);

}  // namespace cpu
}  // namespace rlhf_fast
