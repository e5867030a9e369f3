// Per-row statistics of softmax(x / T) computed by the CPU log-prob kernel
// (csrc/cpu/logprobs.cpp). The sampler calls the same functions, so rollout
// log-probs and training log-probs agree bit for bit on the CPU.
#pragma once

#include <cstdint>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {

// Every exp in the row is of d = (x - max x) * (1 / T) <= 0: the max is
// subtracted before scaling, so d (hence the log-prob and the entropy) is
// exact to the spread of the row, whatever its offset. x * (1 / T) - max z
// instead rounds at the offset's scale: 0.5 absolute at x ~ 1e7 in fp32.
// A log-prob is (x_y - max_x) * inv_t - log_s, never z_y - lse, which
// cancels two large terms.
template <typename acc_t>
struct RowStats {
  acc_t lse;      // log sum exp(z), z = x * (1 / T): max_x * inv_t + log_s
  acc_t entropy;  // of softmax(z): log_s - sum(d e^d) / sum(e^d)
  acc_t max_x;    // max(x): the shift every exp in the row used
  acc_t log_s;    // log sum exp(d)
};

// x: one row of V logits; inv_t = 1 / temperature > 0. NaN in the row, a
// row of only -inf, or one whose max(x) * inv_t overflows (lse = +-inf,
// which the backward could not use), gives NaN statistics.
RowStats<float> logprobs_row_stats(const float* x, int64_t V, float inv_t);
RowStats<float> logprobs_row_stats(const bf16_bits* x, int64_t V, float inv_t);
RowStats<float> logprobs_row_stats(const fp16_bits* x, int64_t V, float inv_t);
RowStats<double> logprobs_row_stats(const double* x, int64_t V, double inv_t);

}  // namespace cpu
}  // namespace rlhf_fast
