// Torch-free scalar helpers for the CPU kernels, written so that GCC and
// Clang vectorise the loops that call them (no branches, no libm calls).
// Each kernel that uses them is compiled for AVX-512, AVX2+FMA and a plain
// x86-64 fallback through RLHF_FAST_CPU_CLONES, and picked at load time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One function body, three machine-code versions, chosen by the loader
// (ifunc) from the running CPU: wider vectors only where the CPU has them.
#define RLHF_FAST_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_CPU_CLONES
#endif

#define RLHF_FAST_INLINE inline __attribute__((always_inline))

namespace rlhf_fast {
namespace cpu {

// exp(x) for x <= 0 (callers pass z - max). Cephes' degree-6 polynomial on
// the reduced argument, about 1 ulp for x > -87.3. Below ln(FLT_MIN) the
// result is exactly 0 so -inf logits carry no weight; NaN stays NaN.
RLHF_FAST_INLINE float exp_nonpos(float x) {
  constexpr float kLo = -87.33654475f;  // ln(FLT_MIN): 2^n stays normal
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: round to nearest int
  const float xc = x < kLo ? kLo : x;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = y * scale;
  return x < kLo ? 0.0f : out;
}

// float64 path (gradcheck, float64 references): libm, not vectorised.
RLHF_FAST_INLINE double exp_nonpos(double x) { return __builtin_exp(x); }

// Loads into the accumulation type (float; double for double) and stores
// back. bf16 / fp16 are plain bit manipulation (no torch types), so
// the same loop vectorises for every input dtype.
struct bf16_bits { uint16_t x; };
struct fp16_bits { uint16_t x; };

RLHF_FAST_INLINE float to_acc(float v) { return v; }
RLHF_FAST_INLINE double to_acc(double v) { return v; }

RLHF_FAST_INLINE float to_acc(bf16_bits v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE half -> float without F16C so the default clone builds anywhere;
// subnormals handled by scaling, inf/NaN by the exponent-31 branch.
RLHF_FAST_INLINE float to_acc(fp16_bits v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  // normal: rebias 15 -> 127; inf/NaN: exponent 255
  uint32_t u = sign | ((expo + 112u) << 23) | (mant << 13);
  u = expo == 31u ? (sign | 0x7f800000u | (mant << 13)) : u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  // zero and subnormals: mant * 2^-24
  const float sub = static_cast<float>(mant) * 5.9604644775390625e-8f;
  const float subs = sign ? -sub : sub;
  return expo == 0u ? subs : f;
}

RLHF_FAST_INLINE void from_acc(float v, float* out) { *out = v; }
RLHF_FAST_INLINE void from_acc(double v, double* out) { *out = v; }

// Round to nearest even, NaN kept quiet.
RLHF_FAST_INLINE void from_acc(float v, bf16_bits* out) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  out->x = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

RLHF_FAST_INLINE void from_acc(float v, fp16_bits* out) {
  // Rare path (fp16 gradients): scalar, correct rounding via the compiler.
  _Float16 h = static_cast<_Float16>(v);
  std::memcpy(&out->x, &h, sizeof(out->x));
}

}  // namespace cpu
}  // namespace rlhf_fast
