// Torch-free scalar helpers for the CPU kernels, written so that GCC and
// Clang vectorise the loops that call them (no branches, no libm calls).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#define RLHF_FAST_INLINE inline __attribute__((always_inline))
// the same for a lambda: `[&](auto x) RLHF_FAST_INLINE_LAMBDA { ... }`
#define RLHF_FAST_INLINE_LAMBDA __attribute__((always_inline))

namespace rlhf_fast {
namespace cpu {

// The accumulation type of an element type: double for double, else float
// (fp32 / bf16 / fp16 inputs are all computed in fp32).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The core of exp_nonpos and exp_pm20, for a float or a float vector V:
// n = round(x / ln 2) and y = exp(x - n ln 2) (Cody-Waite reduction, then
// Cephes' degree-6 polynomial), so exp(x) = y * 2^n.
template <typename V>
RLHF_FAST_INLINE V exp_reduced(V x, V& n) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: round to nearest int
  n = (x * 1.44269504088896341f + kRound) - kRound;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 = hi + lo
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) for x <= 88 (most callers pass z - max <= 0), about 1 ulp for
// x > -87.3. Below ln(FLT_MIN) the result is exactly 0 so -inf logits carry
// no weight; NaN stays NaN.
RLHF_FAST_INLINE float exp_nonpos(float x) {
  constexpr float kLo = -87.33654475f;  // ln(FLT_MIN): 2^n stays normal
  const float xc = x < kLo ? kLo : x;
  float n;
  const float y = exp_reduced(xc, n);
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


// valid ? a : b without a branch. GCC turns `valid ? a : b` on data-dependent
// masks into jumps; with 30% observation-token holes those mispredict and cost
// 5x (33 ms vs 7 ms for whiten at (512, 4096)). Bitwise blend instead.
template <typename acc_t>
RLHF_FAST_INLINE acc_t blend(bool valid, acc_t a, acc_t b) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  bits_t ua, ub;
  std::memcpy(&ua, &a, sizeof(a));
  std::memcpy(&ub, &b, sizeof(b));
  const bits_t sel = bits_t(0) - static_cast<bits_t>(valid);
  const bits_t r = (ua & sel) | (ub & ~sel);
  acc_t out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// ---------------------------------------------------------------------------
// Explicit vectors (GCC/Clang vector extensions). Auto-vectorisation of the
// row loops failed on AVX2 (GCC 12 kept them scalar), so the kernels say what
// they mean: W floats per register, W = 16 (AVX-512), 8 (AVX2), 4 (SSE2).
// Kernels that reduce keep kLanes = 16 partial sums as 16 / W registers, so
// every ISA sums in the same order.
constexpr int kLanes = 16;

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef uint8_t b __attribute__((vector_size(W)));  // a bool / uint8 mask
};

template <int W>
RLHF_FAST_INLINE typename Vec<W>::f splat(float a) {
  return typename Vec<W>::f{} + a;
}

// exp_nonpos above, W lanes at a time.
template <int W>
RLHF_FAST_INLINE typename Vec<W>::f exp_nonpos(typename Vec<W>::f x) {
  using vf = typename Vec<W>::f;
  using vi = typename Vec<W>::i;
  const vf lo = splat<W>(-87.33654475f);
  const vf xc = x < lo ? lo : x;
  vf n;
  const vf y = exp_reduced(xc, n);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf out = y * (vf)bits;  // same-size vector cast: reinterprets bits
  return x < lo ? splat<W>(0.f) : out;
}

// The 8 mask bytes at p as an 8-lane int mask (-1 where nonzero), for an
// ISA copy of W fp32 lanes. With AVX2 (W >= 8): one vpmovzxbd from memory
// and a compare. It is inline asm because the kernel bodies are compiled
// without a target of their own until inlined into an ISA copy, so GCC
// refuses the AVX2 intrinsic there; and the portable forms compile badly:
// GCC 12 turns __builtin_convertvector from 8 bytes to 8 int32 lanes into
// ~30 scalar shifts and inserts, and the two-broadcast form below was
// sometimes built through the stack (four 8-byte stores, one 32-byte load:
// a store-forwarding stall per 8 tokens, which made the rollout
// correction's row pass cost a third of the policy-loss sweep).
template <int W>
RLHF_FAST_INLINE Vec<8>::i mask8(const uint8_t* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (W >= 8) {
    struct Bytes8 {
      uint8_t b[8];
    };
    Vec<8>::i x;
    asm("vpmovzxbd %1, %0" : "=v"(x) : "m"(*reinterpret_cast<const Bytes8*>(p)));
    return x != 0;
  }
#endif
  uint32_t lo, hi;  // x86 is little-endian: byte l of lo is lane l
  std::memcpy(&lo, p, 4), std::memcpy(&hi, p + 4, 4);
  const Vec<8>::u v = {lo, lo, lo, lo, hi, hi, hi, hi};
  const Vec<8>::u byte_l = {0xffu, 0xff00u, 0xff0000u, 0xff000000u, 0xffu, 0xff00u, 0xff0000u, 0xff000000u};
  return (v & byte_l) != 0;
}

template <int W>
RLHF_FAST_INLINE typename Vec<W>::f load(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
RLHF_FAST_INLINE typename Vec<W>::f load(const bf16_bits* p) {
  typename Vec<W>::h h;
  std::memcpy(&h, p, sizeof(h));
  const typename Vec<W>::u u = __builtin_convertvector(h, typename Vec<W>::u) << 16;
  return (typename Vec<W>::f)u;
}

template <int W>
RLHF_FAST_INLINE typename Vec<W>::f load(const fp16_bits* p) {
  float tmp[W];  // fp16 logits are rare: scalar widening, vector math after
  for (int l = 0; l < W; ++l) tmp[l] = to_acc(p[l]);
  return load<W>(tmp);
}

template <int W>
RLHF_FAST_INLINE void store(typename Vec<W>::f v, float* p) {
  std::memcpy(p, &v, sizeof(v));
}

template <int W>
RLHF_FAST_INLINE void store(typename Vec<W>::f v, bf16_bits* p) {
  using vu = typename Vec<W>::u;
  const vu u = (vu)v;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu quiet = (u >> 16) | 0x40u;
  const vu out = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
  const typename Vec<W>::h h = __builtin_convertvector(out, typename Vec<W>::h);
  std::memcpy(p, &h, sizeof(h));
}

template <int W>
RLHF_FAST_INLINE void store(typename Vec<W>::f v, fp16_bits* p) {
  for (int l = 0; l < W; ++l) from_acc(v[l], p + l);
}

// Pairwise sum of 16 partial sums held as 16 / W vectors (fixed order).
template <int W>
RLHF_FAST_INLINE float sum_lanes(const typename Vec<W>::f* v) {
  float a[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = v[l / W][l % W];
  for (int half = kLanes / 2; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) a[l] += a[l + half];
  return a[0];
}

template <int W>
RLHF_FAST_INLINE float max_lanes(const typename Vec<W>::f* v) {
  float m = v[0][0];
  for (int l = 1; l < kLanes; ++l) m = v[l / W][l % W] > m ? v[l / W][l % W] : m;
  return m;
}

// ---------------------------------------------------------------------------
// One spelling for scalars and vectors. V is float, double or Vec<W>::f:
// per-token math written once with these runs on whole vectors in a row's
// body and on scalars for its tail and for fp64. A mask is what `V < V`
// gives: bool for a scalar, an int vector of 0 / -1 for a vector.
template <typename V>
using mask_of = decltype(V{} < V{});

template <typename V>
RLHF_FAST_INLINE V bcast(double x) {
  if constexpr (std::is_floating_point_v<V>) return V(x);
  else return V{} + static_cast<float>(x);  // Vec is fp32 only
}

template <typename V>
RLHF_FAST_INLINE V sel(mask_of<V> m, V a, V b) { return m ? a : b; }

// NaN passes through (both compares are false), as torch.clamp. Written
// as min(hi, x) then max(lo, .), each compare on the value it selects, so
// that GCC can emit vminps / vmaxps (whose NaN rule returns the second
// operand, x) in place of a compare and a blend each; it does where the
// operands are in registers. The same bits as clamping on x for every x
// when lo <= hi.
template <typename V>
RLHF_FAST_INLINE V clampv(V x, V lo, V hi) {
  const V t = hi < x ? hi : x;  // a plain ternary: through sel() GCC keeps the blend
  return lo > t ? lo : t;
}

// exp(x) for |x| <= 20 (callers clamp first, as verl does); fp64 takes libm.
// exp_nonpos without its underflow guard (a compare and two selects, never
// taken here), and 2^n applied by adding n to the exponent
// bits instead of a multiply: y * 2^n is exact while the result is normal
// (|n| <= 29 here), so the bits are exp_nonpos's for every float in
// [-20, 20] (all 2.2e9 checked) and NaN stays NaN. In the policy loss's exp
// pass, latency-bound at about 1.6 instructions per clock on Zen 3, this
// is 5 fewer operations and a 1-cycle add in place of a 3-cycle multiply
// at the end of each chain.
template <typename V>
RLHF_FAST_INLINE V exp_pm20(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return __builtin_exp(x);
  } else {
    using I = std::conditional_t<std::is_same_v<V, float>, int32_t, typename Vec<sizeof(V) / sizeof(float)>::i>;
    V n;
    const V y = exp_reduced(x, n);
    I yb, nb;
    if constexpr (std::is_same_v<V, float>) nb = static_cast<int32_t>(n) << 23;
    else nb = __builtin_convertvector(n, I) << 23;
    std::memcpy(&yb, &y, sizeof(y));
    yb += nb;  // scalar: two's-complement wrap never happens, |n| <= 29
    V out;
    std::memcpy(&out, &yb, sizeof(out));
    return out;
  }
}

}  // namespace cpu
}  // namespace rlhf_fast
