// Torch-free pieces of the sampler shared by the CPU kernel (and mirrored,
// bit for bit, by rlhf_fast/reference/_sampling.py and the Triton kernel):
// the counter-based noise and an ordered integer key for fp32 bisection.
#pragma once

#include <cstdint>
#include <cstring>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace sampling {

// lowbias32 (Wellons): a bijective 32-bit mixer with ~0.17 bias.
RLHF_FAST_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// 32 random bits for (row seed, token): two rounds keyed by the two halves
// of the row's 64-bit seed, so rows with different seeds share no stream.
RLHF_FAST_INLINE uint32_t noise_bits(uint32_t seed_lo, uint32_t seed_hi,
                                     uint32_t token) {
  return mix32(mix32(token ^ seed_lo) + seed_hi);
}

// log(x) for finite x > 0 (normal): Cephes logf, ~1 ulp, branch-free so the
// noise loop vectorises (std::log does not).
RLHF_FAST_INLINE float log_pos(float x) {
  constexpr float kSqrtHalf = 0.707106781186547524f;
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  // m < sqrt(1/2): use 2m - 1 and exponent - 1 (selects, not branches)
  const float low = m < kSqrtHalf ? 1.0f : 0.0f;
  const float ef = static_cast<float>(((bits >> 23) & 0xff) - 126) - low;
  const float f = m * (1.0f + low) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * ef;
}

// Gumbel noise -log(E), E = -log(u) ~ Exp(1), u = ((bits >> 9) + 0.5) / 2^23:
// 23 bits keep u <= 1 - 2^-24, exact in fp32, so E > 0 and |noise| <= 16.6.
RLHF_FAST_INLINE float gumbel(uint32_t seed_lo, uint32_t seed_hi,
                              uint32_t token) {
  const uint32_t b = noise_bits(seed_lo, seed_hi, token) >> 9;
  const float u = (static_cast<float>(static_cast<int32_t>(b)) + 0.5f) * 1.1920928955078125e-7f;
  return -log_pos(-log_pos(u));
}

// Order-preserving map fp32 -> int32 (and back) for bisection on values:
// x < y  <=>  key(x) < key(y) for non-NaN x, y (-0 sorts just below +0).
RLHF_FAST_INLINE int32_t float_key(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b >= 0 ? b : (b ^ 0x7fffffff);
}

RLHF_FAST_INLINE float key_float(int32_t k) {
  const int32_t b = k >= 0 ? k : (k ^ 0x7fffffff);
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

}  // namespace sampling
}  // namespace rlhf_fast
