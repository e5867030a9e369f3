// The per-token KL estimators of logp vs ref and their derivative in logp,
// once, for the kl_penalty op (csrc/cpu/kl_penalty.cpp) and the KL term of
// the fused policy loss (csrc/cpu/ppo_policy_loss.cpp). Torch-free; V is a
// scalar or a vector (cpu_math.h's lane-generic helpers).
//   k1 = d, k2 = d^2 / 2, abs = |d| with d = logp - ref;
//   k3 = clamp(exp(k) - k - 1, -10, 10) with k = clamp(ref - logp, -20, 20)
// (verl's low_var_kl; the gradient is 0 wherever a clamp is active).
#pragma once

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {

enum Kl : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3, kNone = 4 };
// k1, k2 or abs, chosen at run time (kl_term_cheap): a kernel's template
// parameter where the loop does not care which of the three it computes
constexpr int kKlCheap = 5;

// k3 and its derivative given d = lp - ref and e = exp(clamp(-d, -20, 20)):
// the fused policy loss computes e ahead, in its exp pass.
template <typename V>
RLHF_FAST_INLINE void kl_k3_from_exp(V d, V e, V& val, V& dval) {
  const V zero = bcast<V>(0), one = bcast<V>(1);
  const V k = clampv(-d, bcast<V>(-20), bcast<V>(20));
  const V kld = e - k - one;
  val = clampv(kld, bcast<V>(-10), bcast<V>(10));
  const auto pass = (-d >= bcast<V>(-20)) & (-d <= bcast<V>(20)) & (kld >= bcast<V>(-10)) & (kld <= bcast<V>(10));
  dval = sel<V>(pass, one - e, zero);
}

template <int KIND, typename V>
RLHF_FAST_INLINE void kl_term(V lp, V ref, V& val, V& dval) {
  const V zero = bcast<V>(0), one = bcast<V>(1), d = lp - ref;
  if constexpr (KIND == kK1) {
    val = d, dval = one;
  } else if constexpr (KIND == kK2) {
    val = bcast<V>(0.5) * d * d, dval = d;
  } else if constexpr (KIND == kAbs) {
    val = sel<V>(d < zero, -d, d);
    dval = sel<V>(d > zero, one, sel<V>(d < zero, -one, zero));
  } else if constexpr (KIND == kK3) {
    kl_k3_from_exp(d, exp_pm20(clampv(-d, bcast<V>(-20), bcast<V>(20))), val, dval);
  } else {
    val = dval = zero;
  }
}

// k1, k2 or abs by `kind` (a run-time value): all three computed, one
// selected lane-wise, so the same bits as kl_term<kind> and no branch for
// GCC to clone a vector loop on.
template <typename V>
RLHF_FAST_INLINE void kl_term_cheap(int kind, V lp, V ref, V& val, V& dval) {
  V v1, d1, v2, d2, va, da;
  kl_term<kK1>(lp, ref, v1, d1);
  kl_term<kK2>(lp, ref, v2, d2);
  kl_term<kAbs>(lp, ref, va, da);
  const V zero = bcast<V>(0);
  const auto is1 = bcast<V>(kind == kK1) != zero, is2 = bcast<V>(kind == kK2) != zero;
  val = sel<V>(is1, v1, sel<V>(is2, v2, va));
  dval = sel<V>(is1, d1, sel<V>(is2, d2, da));
}

}  // namespace cpu
}  // namespace rlhf_fast
