// Rollout correction for one row of the fused PPO loss (csrc/cpu/ppo_policy_loss.cpp):
// importance weights between the old (trainer) policy and the rollout
// (inference engine) policy, rejection of tokens / sequences, and the
// mismatch sums behind verl's rollout_corr/* metrics. Torch-free.
//
// With lr_t = old_t - rollout_t (log pi_old / pi_rollout), lrc_t = clamp(lr_t, -20, 20):
//   token weight      exp(lrc_t)
//   sequence weight   exp(clamp(sum_t lr_t, -20, 20))        (product of ratios)
//   geometric weight  exp(clamp(sum_t lr_t / n, -20, 20))    (geometric mean)
// then TIS: min(raw, upper), or IcePop (a lower bound given): raw inside
// [lower, upper], else 0. Rejection (verl's rollout_rs) keeps a token when
// its statistic (k1 = -lrc, k2 = lrc^2 / 2, k3 = exp(lrc) - 1 - lrc; per
// token, or summed / averaged / maxed over the row) lies within the bounds;
// k1 bounds are in log space ([log lower, log upper]), k2 / k3 have an upper
// bound only.
#pragma once

#include <cstdint>
#include <limits>

#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace rc {

enum IsLevel : int { kIsNone = 0, kIsToken = 1, kIsSeq = 2, kIsGeo = 3 };
enum RsLevel : int { kRsNone = -1, kRsToken = 0, kRsSum = 1, kRsMean = 2, kRsMax = 3 };

struct Cfg {
  int is = kIsNone;
  bool icepop = false;
  double is_hi = 2.0, is_lo = 0.5;  // is_lo: IcePop's lower bound, else 1 / upper (metrics only)
  int rs = kRsNone;
  int rs_k = 0;  // 1, 2, 3: k1, k2, k3
  double rs_lo = 0.0, rs_hi = 0.0;
  bool needs_row_pass() const { return is == kIsSeq || is == kIsGeo || (rs != kRsNone && rs != kRsToken); }
  bool row_pass_needs_k3() const { return rs_k == 3 && rs != kRsNone && rs != kRsToken; }
};

// Row statistics needed before any token can be weighted (only for the
// sequence / geometric levels and the sequence rejection options).
struct RowStats {
  double n = 0, lr = 0, k[4] = {0, 0, 0, 0}, mx[4] = {0, 0, 0, 0};
};

// Row sums of the mismatch metrics (fp64), folded in a fixed order by the epilogue.
struct Row {
  double n0 = 0, s_old = 0, s_roll = 0, s_lr = 0, s_k3 = 0, s_rho2 = 0;
  double s_w = 0, max_w = -std::numeric_limits<double>::infinity(), min_w = std::numeric_limits<double>::infinity();
  double n_high = 0, n_low = 0, n_rej = 0;
};

// lr clamped to [-20, 20] before every exp, as the policy ratio is.
template <typename acc_t>
RLHF_FAST_INLINE acc_t clamp20(acc_t x) {
  return cpu::clampv(x, acc_t(-20), acc_t(20));
}

constexpr int64_t kRcBlock = 256;  // tokens per acc_t partial sum, then fp64

// K3: also the k3 sum / max (one exp per token); the other options need none.
template <bool K3, typename acc_t>
RLHF_FAST_INLINE RowStats row_stats(const acc_t* old, const acc_t* roll, const uint8_t* mk, int64_t T) {
  RowStats out;
  for (int64_t t0 = 0; t0 < T; t0 += kRcBlock) {
    const int64_t len = T - t0 < kRcBlock ? T - t0 : kRcBlock;
    acc_t n = 0, lr = 0, k1 = 0, k2 = 0, k3 = 0, m2 = 0, m3 = 0;  // k2, k3 >= 0: 0 is their max identity
#pragma omp simd reduction(+ : n, lr, k1, k2, k3) reduction(max : m2, m3)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i;
      const bool v = mk[t] != 0;
      const acc_t d = v ? old[t] - roll[t] : acc_t(0);
      const acc_t c = clamp20(d);
      const acc_t q2 = acc_t(0.5) * c * c, q3 = K3 ? cpu::exp_pm20(c) - acc_t(1) - c : acc_t(0);
      n += v ? acc_t(1) : acc_t(0);
      lr += d, k1 -= c, k2 += q2, k3 += q3;
      m2 = q2 > m2 ? q2 : m2;
      m3 = q3 > m3 ? q3 : m3;
    }
    out.n += n, out.lr += lr, out.k[1] += k1, out.k[2] += k2, out.k[3] += k3;
    out.mx[2] = double(m2) > out.mx[2] ? double(m2) : out.mx[2];
    out.mx[3] = double(m3) > out.mx[3] ? double(m3) : out.mx[3];
  }
  return out;
}

// Does a row pass the sequence rejection option? (true without one)
inline bool row_passes(const Cfg& c, const RowStats& s) {
  if (c.rs == kRsNone || c.rs == kRsToken) return true;
  double stat = c.rs == kRsMax ? s.mx[c.rs_k] : s.k[c.rs_k];
  if (c.rs == kRsMean) stat = s.n > 0 ? stat / s.n : 0.0;
  return stat <= c.rs_hi && (c.rs_k != 1 || stat >= c.rs_lo);
}

// The row's raw importance weight at the sequence / geometric level.
inline double row_raw_weight(const Cfg& c, const RowStats& s) {
  if (c.is == kIsSeq) return cpu::exp_pm20(clamp20(s.lr));
  if (c.is == kIsGeo) return cpu::exp_pm20(clamp20(s.n > 0 ? s.lr / s.n : 0.0));
  return 1.0;
}

// The row's correction as the token loop sees it: the options, and what
// the row pass decided (row_raw: the sequence / geometric raw weight, 1 at
// the token level; row_pass: the sequence rejection's verdict).
template <typename acc_t>
struct RowCfg {
  bool tok_is, tok_rs, icepop, apply_w, row_pass;
  int rs_k;
  acc_t hi, lo, rs_hi, rs_lo, row_raw;
};

template <typename acc_t>
RowCfg<acc_t> row_cfg(const Cfg& c, double row_raw, bool row_pass) {
  return {c.is == kIsToken, c.rs == kRsToken, c.icepop, c.is != kIsNone, row_pass, c.rs_k,
          acc_t(c.is_hi), acc_t(c.is_lo), acc_t(c.rs_hi), acc_t(c.rs_lo), acc_t(row_raw)};
}

// One token (V: scalar or vector) of the correction, given e_t =
// exp_pm20(clamp20(old_t - roll_t)) (the caller's exp pass): the stop-gradient
// weight w of the clipped term (1 without an IS option), the kept mask, and
// the terms of the row's metric sums (each 0 outside the caller's mask v).
// Uniform options are branches on scalars, so the vector body stays one
// straight line: in the policy loss's sweep it costs one more load, one exp
// and ~30 vector ops per lane group, over a block of the row held in L1,
// instead of a separate weights pass with a (B, T) weight and keep buffer.
template <typename V>
struct Tok {
  cpu::mask_of<V> keep;
  V w, n0, o, r, d, k3, rho2, wsum, high, low, rej, wmax, wmin;
};

template <typename V, typename acc_t>
RLHF_FAST_INLINE Tok<V> token(cpu::mask_of<V> v, V old_t, V roll_t, V e_t, const RowCfg<acc_t>& c) {
  using cpu::bcast;
  using cpu::sel;
  const V zero = bcast<V>(0), one = bcast<V>(1);
  const V fv = sel<V>(v, one, zero);
  const V o = sel<V>(v, old_t, zero), r = sel<V>(v, roll_t, zero);
  const V d = o - r, cl = cpu::clampv(d, bcast<V>(-20), bcast<V>(20)), e = sel<V>(v, e_t, one);
  const V k3 = e - one - cl;
  cpu::mask_of<V> pass = zero == zero;  // all true
  if (c.tok_rs) {
    const V st = c.rs_k == 1 ? -cl : (c.rs_k == 2 ? bcast<V>(0.5) * cl * cl : k3);
    pass = st <= bcast<V>(c.rs_hi);
    if (c.rs_k == 1) pass = pass & (st >= bcast<V>(c.rs_lo));
  } else if (!c.row_pass) {
    pass = zero != zero;
  }
  const V hi = bcast<V>(c.hi), lo = bcast<V>(c.lo);
  const V raw = c.tok_is ? e : bcast<V>(c.row_raw);
  const V wt = c.icepop ? sel<V>((raw >= lo) & (raw <= hi), raw, zero) : sel<V>(raw > hi, hi, raw);
  const V inf = bcast<V>(std::numeric_limits<double>::infinity());
  return {static_cast<cpu::mask_of<V>>(v & pass),
          c.apply_w ? wt : one,
          fv,
          o,
          r,
          d,
          fv * k3,
          fv * e * e,
          fv * wt,
          sel<V>(raw > hi, fv, zero),
          sel<V>(raw < lo, fv, zero),
          sel<V>(pass, zero, fv),
          sel<V>(v, wt, -inf),
          sel<V>(v, wt, inf)};
}

}  // namespace rc
}  // namespace rlhf_fast
