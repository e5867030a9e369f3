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
#include <type_traits>

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

// How the weight of the clipped term varies within a row: one weight for
// the whole row (no IS option, or the sequence / geometric level), or per
// token (token TIS, token IcePop). Compile-time in the token pass, so each
// option set runs only the vector work it needs.
enum TokW : int { kWRow = 0, kWTrunc = 1, kWIcePop = 2 };

// The row's correction as the token pass sees it: the options, and what the
// row pass decided. tok_rs_k: the k of token-level rejection, 0 without
// one; row_pass: the sequence rejection's verdict (true without one);
// w_row: the row's weight under kWRow (1 without an IS option), with
// high_row / low_row its raw weight's side of the thresholds.
template <typename acc_t>
struct RowCfg {
  int tok_w, tok_rs_k;
  bool row_pass, high_row, low_row;
  acc_t hi, lo, rs_hi, rs_lo, w_row;
};

template <typename acc_t>
RowCfg<acc_t> row_cfg(const Cfg& c, double row_raw, bool row_pass) {
  const int tok_w = c.is != kIsToken ? kWRow : c.icepop ? kWIcePop : kWTrunc;
  // the row weight in acc_t, as the token weight is made
  const acc_t raw = acc_t(row_raw), hi = acc_t(c.is_hi), lo = acc_t(c.is_lo);
  const acc_t wt = c.icepop ? (raw >= lo && raw <= hi ? raw : acc_t(0)) : (raw > hi ? hi : raw);
  return {tok_w,   c.rs == kRsToken ? c.rs_k : 0, row_pass, raw > hi, raw < lo, hi, lo, acc_t(c.rs_hi),
          acc_t(c.rs_lo), c.is != kIsNone ? wt : acc_t(1)};
}

// Calls f(integral_constant<int, tok_w>, integral_constant<int, tok_rs_k>).
template <typename acc_t, typename F>
RLHF_FAST_INLINE auto with_token_mode(const RowCfg<acc_t>& c, F&& f) {
  auto with_w = [&](auto K) {
    switch (c.tok_w) {
      case kWTrunc: return f(std::integral_constant<int, kWTrunc>{}, K);
      case kWIcePop: return f(std::integral_constant<int, kWIcePop>{}, K);
      default: return f(std::integral_constant<int, kWRow>{}, K);
    }
  };
  switch (c.tok_rs_k) {
    case 1: return with_w(std::integral_constant<int, 1>{});
    case 2: return with_w(std::integral_constant<int, 2>{});
    case 3: return with_w(std::integral_constant<int, 3>{});
    default: return with_w(std::integral_constant<int, 0>{});
  }
}

// A row's running metric sums in one lane group (V: scalar or vector), in
// token order. n0, o, r, d, k3, rho2 always; w, high, low, mx, mn only with
// a per-token weight (kWRow rows get them from n0 and w_row at the end, and
// every row's rejected count is n0 minus the policy pass's kept count).
template <typename V>
struct TokSums {
  V n0{}, o{}, r{}, d{}, k3{}, rho2{}, w{}, high{}, low{};
  V mx = cpu::bcast<V>(-std::numeric_limits<double>::infinity());
  V mn = cpu::bcast<V>(std::numeric_limits<double>::infinity());
};

// One token (V: scalar or vector) of the correction, given e_t =
// exp_pm20(clamp20(old_t - roll_t)) (the caller's exp pass): adds the
// token's terms to s (nothing outside the caller's mask v), sets w_t to the
// stop-gradient weight of the clipped term under TW, and returns the kept
// mask. Masked lanes add exact zeros or are left by the selects, so the sums
// are those of the masked tokens alone.
template <int TW, int RSK, typename V, typename acc_t>
RLHF_FAST_INLINE cpu::mask_of<V> token(TokSums<V>& s, cpu::mask_of<V> v, V old_t, V roll_t, V e_t,
                                       const RowCfg<acc_t>& c, V& w_t) {
  using cpu::bcast;
  using cpu::sel;
  const V zero = bcast<V>(0), one = bcast<V>(1);
  const V o = sel<V>(v, old_t, zero), r = sel<V>(v, roll_t, zero);
  const V d = o - r, cl = cpu::clampv(d, bcast<V>(-20), bcast<V>(20)), e = sel<V>(v, e_t, one);
  const V k3 = e - one - cl;  // 0 where masked (e = 1, cl = 0)
  s.n0 = sel<V>(v, s.n0 + one, s.n0);
  s.o += o, s.r += r, s.d += d, s.k3 += k3;
  s.rho2 = sel<V>(v, s.rho2 + e * e, s.rho2);
  cpu::mask_of<V> keep;
  if constexpr (RSK == 0) {
    keep = c.row_pass ? v : (zero != zero);
  } else {
    const V st = RSK == 1 ? -cl : (RSK == 2 ? bcast<V>(0.5) * cl * cl : k3);
    cpu::mask_of<V> pass = st <= bcast<V>(c.rs_hi);
    if constexpr (RSK == 1) pass = pass & (st >= bcast<V>(c.rs_lo));
    keep = v & pass;
  }
  if constexpr (TW == kWRow) {
    w_t = bcast<V>(c.w_row);
  } else {
    const V hi = bcast<V>(c.hi), lo = bcast<V>(c.lo);
    const V wt = TW == kWIcePop ? sel<V>((e >= lo) & (e <= hi), e, zero) : sel<V>(e > hi, hi, e);
    s.w = sel<V>(v, s.w + wt, s.w);
    s.high = sel<V>(v & (e > hi), s.high + one, s.high);
    s.low = sel<V>(v & (e < lo), s.low + one, s.low);
    s.mx = sel<V>(v & (wt > s.mx), wt, s.mx);
    s.mn = sel<V>(v & (wt < s.mn), wt, s.mn);
    w_t = wt;
  }
  return keep;
}

}  // namespace rc
}  // namespace rlhf_fast
