// CPU fused PPO policy loss (rlhf_fast::ppo_loss_fwd / _bwd): the clipped
// policy loss + entropy bonus + KL loss, with the optional rollout
// correction (rlhf_fast/rollout_correction.h, ppo_rollout_correction.cpp).
//
// Rows are (offset, length) (ppo_glue.h Rows): the B rows of a padded (B, T)
// batch or the S segments of a packed stream (cu_seqlens), one loop for both.
// Forward is one sweep over the token tensors, rows in parallel. Each
// row produces the per-token gradient d loss_tok / d logprobs (fp32, 0 where
// masked) and fp64 row sums; a serial epilogue then folds the B rows in a
// fixed order (no atomics: the same bits for any thread count) into the
// loss, the stats and the per-row scale that aggregation applies.
// Backward is grad_logprobs[b, t] = grad_loss * row_scale[b] * dtok[b, t]:
// one read of 4 bytes and one write per token. Recomputing in backward
// instead would re-read logprobs, old_logprobs, advantages, mask (and
// ref_logprobs): 13-17 bytes per token, and repeat every exp.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../acc_dtype.h"
#include "aten_lite.h"
#include "kernels.h"
#include "parallel.h"
#include "ppo_glue.h"
#include "ppo_rollout_correction.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"
#include "rlhf_fast/kl_estimators.h"
#include "rlhf_fast/rollout_correction.h"

namespace rlhf_fast {
namespace cpu {
namespace {

// dual_on (1 or 0) and kl (k1 / k2 / abs under kKlCheap) are run-time
// options of one row kernel (see policy_tok).
template <typename acc_t>
struct PolicyCfg {
  acc_t lo, hi, dual, kl_coef, dual_on;
  int kl;
};

// Row sums, fp64: 4096 fp32 terms summed in fp64 lose nothing measurable.
struct PolicyRow {
  double pg = 0, kl = 0, ent = 0, n = 0, clip = 0, lower = 0, akl = 0, rsum = 0, rmax = 0;
};

// ---------------- the per-token math, once, for scalars and vectors ----------------
// GCC would not vectorise the token loop on its own (the clip branches and
// the exp sit under `valid ? ... : 0` selects; it stayed scalar at ~25-40 ns
// per token), so the fp32 path runs on Vec<kPolicyLanes>: ternaries become
// blends, and the same template body runs on plain scalars for the row tail
// and the fp64 path. The lane count is part of the summation order, so it is
// fixed at 8 for every ISA copy (on AVX-512 too): all copies agree bit for bit.
constexpr int kPolicyLanes = 8;
using PV = Vec<kPolicyLanes>;

// Per-token terms of the fused policy loss for one lane group. Masked
// tokens are zeroed on input and every output is multiplied by fv in {0,1}.
template <typename V>
struct PolicyTok {
  V dtok, loss, kl, n, clip, low, akl, r;
};

// The token's exps, unmasked (masked lanes select 1 in their place):
// ratio = exp(clamp(lp - old)), kl = exp(clamp(ref - lp)) (k3 only), rc =
// exp(clamp(old - rollout)) (with a correction only).
template <typename V>
struct TokExps {
  V ratio, kl, rc;
};

template <int KL, bool RC, typename V>
RLHF_FAST_INLINE TokExps<V> tok_exps(V lp, V old, V ref, V roll) {
  const V lo20 = bcast<V>(-20), hi20 = bcast<V>(20);
  TokExps<V> e{exp_pm20(clampv(lp - old, lo20, hi20)), V{}, V{}};
  if constexpr (KL == kK3) e.kl = exp_pm20(clampv(-(lp - ref), lo20, hi20));
  if constexpr (RC) e.rc = exp_pm20(clampv(old - roll, lo20, hi20));
  return e;
}

// w_t: the rollout-correction weight (stop-gradient) of the clipped term
// (1 when no importance weighting is asked for: an exact multiply);
// it scales the token's policy loss and its gradient, not the KL term.
// KL: kNone, kK3 (whose exp comes from the exp pass) or kKlCheap: k1, k2
// or abs by c.kl, all three computed and one selected (a few vector ops per
// 8 tokens; no branch, so GCC does not clone the loop per kind). The dual
// clip is a run-time option too: its terms are computed always and select
// nothing when c.dual_on is 0, which leaves the bits of the plain clip. As
// template parameters they made 5 x 2 row kernels per ISA copy, ~60% of this
// file's compile. DUAL = false compiles the dual clip out (fp32 kernels
// without a correction, where it was worth 6-10%: policy_row).
template <typename V, int KL, bool HAS_W, bool DUAL, typename acc_t>
RLHF_FAST_INLINE PolicyTok<V> policy_tok(mask_of<V> valid, V lp_t, V old_t, V adv_t, V ref_t, V w_t,
                                         TokExps<V> e, PolicyCfg<acc_t> c) {
  const V zero = bcast<V>(0), one = bcast<V>(1), half = bcast<V>(0.5);
  const V fv = sel<V>(valid, one, zero);
  const V lpt = sel<V>(valid, lp_t, zero);
  const V x = lpt - sel<V>(valid, old_t, zero);
  const V lo20 = bcast<V>(-20), hi20 = bcast<V>(20);
  const V xc = clampv(x, lo20, hi20);
  const V r = sel<V>(valid, e.ratio, one);  // exp(0) = 1 where masked, as before
  const V a = sel<V>(valid, adv_t, zero);
  const V clo = bcast<V>(c.lo), chi = bcast<V>(c.hi);
  const V l1 = -a * r;  // also d l1 / d x
  const V l2 = -a * clampv(r, clo, chi);
  const V g2 = sel<V>((r >= clo) & (r <= chi), l1, zero);  // d l2 / d x
  const V c1 = sel<V>(l1 > l2, l1, l2);
  // torch's gradient of max: all to the winner, half to each on a tie
  V dl = sel<V>(l1 > l2, l1, sel<V>(l2 > l1, g2, half * (l1 + g2)));
  V loss = c1, low = zero;
  if constexpr (DUAL) {
    const V l3 = -a * bcast<V>(c.dual);
    const auto neg = (a < zero) & (bcast<V>(c.dual_on) != zero);
    const V d2 = sel<V>(c1 < l3, dl, sel<V>(c1 > l3, zero, half * dl));
    loss = sel<V>(neg, sel<V>(c1 < l3, c1, l3), c1);
    dl = sel<V>(neg, d2, dl);
    low = sel<V>(neg & (c1 > l3), one, zero);
  }
  dl = sel<V>((x >= lo20) & (x <= hi20), dl, zero);
  if constexpr (HAS_W) {
    const V w = sel<V>(valid, w_t, zero);
    dl = dl * w, loss = loss * w;
  }
  V kv = zero, dk = zero;
  if constexpr (KL == kK3) kl_k3_from_exp(lpt - sel<V>(valid, ref_t, zero), sel<V>(valid, e.kl, one), kv, dk);
  else if constexpr (KL == kKlCheap) kl_term_cheap(c.kl, lpt, sel<V>(valid, ref_t, zero), kv, dk);
  return {(dl + bcast<V>(c.kl_coef) * dk) * fv, loss * fv, kv * fv, fv,
          sel<V>(l2 > l1, one, zero) * fv, low * fv, -xc * fv, r * fv};
}

constexpr int64_t kBlock = 256;  // tokens per acc_t partial sum, then fp64

// One row's inputs (acc_t rows; ref / ent / roll may be null) and outputs.
template <typename acc_t>
struct RowIO {
  const acc_t *lp, *old, *adv, *ref, *ent, *roll;
  const uint8_t* mk;
  acc_t* dtok;
  uint8_t* keep;  // the mask after rejection (backward's entropy gradient), or null
  PolicyRow* out;
  rc::Row* rc_out;
  // the next row's old / rollout / mask, prefetched during this row's exp
  // pass when its row pass will read them (null: nothing to prefetch)
  const acc_t *next_old = nullptr, *next_roll = nullptr;
  const uint8_t* next_mk = nullptr;
};

// Lane-wise sums on kPolicyLanes lanes.
using vf8 = PV::f;
RLHF_FAST_INLINE void add8(vf8& s, vf8 v) { s += v; }

// The rollout correction's metric sums of one row, fp64, in token order:
// n0, s_old, s_roll, s_lr, s_k3, s_rho2, then (per-token weights only)
// s_w, n_high, n_low, and the weight's max and min.
struct RcAcc {
  double s[9] = {};
  double mx = -INFINITY, mn = INFINITY;
  template <typename V>
  void add(const rc::TokSums<V>& q) {
    const V terms[9] = {q.n0, q.o, q.r, q.d, q.k3, q.rho2, q.w, q.high, q.low};
    for (int j = 0; j < 9; ++j) {
      if constexpr (std::is_floating_point_v<V>) {
        s[j] += double(terms[j]);
      } else {
        float sum = 0;
        for (int l = 0; l < kPolicyLanes; ++l) sum += terms[j][l];
        s[j] += sum;
      }
    }
    if constexpr (std::is_floating_point_v<V>) {
      mx = double(q.mx) > mx ? double(q.mx) : mx, mn = double(q.mn) < mn ? double(q.mn) : mn;
    } else {
      for (int l = 0; l < kPolicyLanes; ++l) {
        mx = q.mx[l] > mx ? q.mx[l] : mx;
        mn = q.mn[l] < mn ? q.mn[l] : mn;
      }
    }
  }
};

// The scalar tail's rollout-correction token (fewer than 8 tokens a row in
// fp32; every token in fp64), once per accumulation type rather than inlined
// into every row kernel and ISA copy: 12 token modes each. Scalar IEEE
// arithmetic, so the same bits from any caller's copy.
template <typename acc_t>
__attribute__((noinline)) bool rc_token_scalar(rc::TokSums<acc_t>& q, bool valid, acc_t old, acc_t roll, acc_t e,
                                               const rc::RowCfg<acc_t>& c, acc_t& w) {
  return rc::with_token_mode(c, [&](auto TW, auto RSK) RLHF_FAST_INLINE_LAMBDA {
    return rc::token<decltype(TW)::value, decltype(RSK)::value>(q, valid, old, roll, e, c, w);
  });
}

// Pass 2 of a block (fp32, 8 lanes): rc::token over n tokens (a multiple of
// 8) with the options TW / RSK fixed at compile time. ex holds the rollout
// exps in and the weights out; keep32 gets the kept mask, keep8 (when not
// null) its bytes. Two bodies: rc_block_avx2 below (intrinsics) for the AVX2
// and AVX-512 copies, and for the baseline copy rc::token itself one lane at
// a time, into 8 lane accumulators: lane by lane the operations of the
// vector form, so the same sums. In a same-run A/B (docs/build.md) rc::token
// as a generic vector body was 8-20% slower than rc_block_avx2 in the AVX2
// copy, and a mask-register AVX-512 copy of it was 1-5% faster than
// rc_block_avx2 in the AVX-512 copy: neither is compiled any more.
inline void rc_block_lanes(const float* old, const float* roll, const uint8_t* mk, int64_t n, float* ex,
                           int32_t* keep32, uint8_t* keep8, RcAcc* acc, const rc::RowCfg<float>& c) {
  constexpr int kL = kPolicyLanes;
  rc::TokSums<float> q[kL];
  for (int64_t u = 0; u < n; u += kL) {
    for (int l = 0; l < kL; ++l) {
      const int64_t t = u + l;
      float w;
      const bool kp = rc_token_scalar<float>(q[l], mk[t] != 0, old[t], roll[t], ex[t], c, w);
      keep32[t] = kp ? -1 : 0, ex[t] = w;
      if (keep8) keep8[t] = kp;
    }
  }
  rc::TokSums<vf8> qv;
  for (int l = 0; l < kL; ++l) {
    qv.n0[l] = q[l].n0, qv.o[l] = q[l].o, qv.r[l] = q[l].r, qv.d[l] = q[l].d, qv.k3[l] = q[l].k3;
    qv.rho2[l] = q[l].rho2, qv.w[l] = q[l].w, qv.high[l] = q[l].high, qv.low[l] = q[l].low;
    qv.mx[l] = q[l].mx, qv.mn[l] = q[l].mn;
  }
  acc->add(qv);
}

#if defined(__x86_64__) && defined(__GNUC__)
// rc::token on 8 lanes for the AVX2 and AVX-512 copies, masks as 0 / -1 lanes. GCC's output of
// the generic body there kept 11 accumulators, the constants and the masks
// in 16 registers by spilling inside the loop (~70 instructions per 8
// tokens for token TIS, ~0.9 ns per token on a Zen 3 core). Here every
// select on the token mask is an AND (sel(v, x, 0), and s + AND(v, x) for
// sel(v, s + x, s): the sums are never -0, so adding +0 leaves them as
// they are), clampv is a min then a max, and the truncation a min, each
// with the operand order whose NaN rule matches the generic select: the
// same bits, held to the baseline copy by tests/test_cpu_isa.py.
template <int TW, int RSK>
__attribute__((target("arch=x86-64-v3"), noinline)) void rc_block_avx2(
    const float* old, const float* roll, const uint8_t* mk, int64_t n, float* ex, int32_t* keep32, uint8_t* keep8,
    RcAcc* acc, rc::RowCfg<float> c) {
  const __m256 one = _mm256_set1_ps(1.f), lo20 = _mm256_set1_ps(-20.f), hi20 = _mm256_set1_ps(20.f);
  const __m256 hi = _mm256_set1_ps(c.hi), lo = _mm256_set1_ps(c.lo), w_row = _mm256_set1_ps(c.w_row);
  const __m256 row = _mm256_castsi256_ps(_mm256_set1_epi32(c.row_pass ? -1 : 0));
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY), pos_inf = _mm256_set1_ps(INFINITY);
  const __m256i c_high = _mm256_set1_epi32(1 << 8), c_low = _mm256_set1_epi32(1 << 16);
  __m256 n0 = _mm256_setzero_ps(), so = n0, sr = n0, sd = n0, sk3 = n0, srho2 = n0, sw = n0, mx = neg_inf, mn = pos_inf;
  __m256i n_side = _mm256_setzero_si256();
  for (int64_t u = 0; u < n; u += kPolicyLanes) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mk + u)));
    const __m256 v = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
    const __m256 o = _mm256_and_ps(v, _mm256_loadu_ps(old + u)), r = _mm256_and_ps(v, _mm256_loadu_ps(roll + u));
    const __m256 d = _mm256_sub_ps(o, r);
    const __m256 cl = _mm256_max_ps(lo20, _mm256_min_ps(hi20, d));
    const __m256 e = _mm256_blendv_ps(one, _mm256_loadu_ps(ex + u), v);
    const __m256 k3 = _mm256_sub_ps(_mm256_sub_ps(e, one), cl);
    n0 = _mm256_add_ps(n0, _mm256_and_ps(v, one));
    so = _mm256_add_ps(so, o), sr = _mm256_add_ps(sr, r), sd = _mm256_add_ps(sd, d), sk3 = _mm256_add_ps(sk3, k3);
    srho2 = _mm256_add_ps(srho2, _mm256_and_ps(v, _mm256_mul_ps(e, e)));
    __m256 keep;
    if constexpr (RSK == 0) {
      keep = _mm256_and_ps(v, row);
    } else {
      const __m256 st = RSK == 1 ? _mm256_xor_ps(cl, _mm256_set1_ps(-0.f))
                                 : (RSK == 2 ? _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), cl), cl) : k3);
      __m256 pass = _mm256_cmp_ps(st, _mm256_set1_ps(c.rs_hi), _CMP_LE_OQ);
      if constexpr (RSK == 1) pass = _mm256_and_ps(pass, _mm256_cmp_ps(st, _mm256_set1_ps(c.rs_lo), _CMP_GE_OQ));
      keep = _mm256_and_ps(v, pass);
    }
    __m256 w = w_row;
    if constexpr (TW != rc::kWRow) {
      w = TW == rc::kWIcePop
              ? _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(e, lo, _CMP_GE_OQ), _mm256_cmp_ps(e, hi, _CMP_LE_OQ)), e)
              : _mm256_min_ps(hi, e);
      sw = _mm256_add_ps(sw, _mm256_and_ps(v, w));
      // the high and low counts share one register: 1 << 8 per high token,
      // 1 << 16 per low one (at most 32 per lane and block)
      const __m256i side = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(e, hi, _CMP_GT_OQ)), c_high),
                                           _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(e, lo, _CMP_LT_OQ)), c_low));
      n_side = _mm256_add_epi32(n_side, _mm256_and_si256(_mm256_castps_si256(v), side));
      // max(sel(v, w, -inf), mx): "x > mx ? x : mx", the generic select's rule, NaN included
      mx = _mm256_max_ps(_mm256_blendv_ps(neg_inf, w, v), mx);
      mn = _mm256_min_ps(_mm256_blendv_ps(pos_inf, w, v), mn);
    }
    _mm256_storeu_ps(reinterpret_cast<float*>(keep32 + u), keep);
    _mm256_storeu_ps(ex + u, w);
    if (keep8) {
      const __m256i k = _mm256_castps_si256(keep);
      const __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(keep8 + u), _mm_and_si128(_mm_packs_epi16(k16, k16), _mm_set1_epi8(1)));
    }
  }
  const __m256 sh = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(n_side, 8), _mm256_set1_epi32(0xff)));
  const __m256 sl = _mm256_cvtepi32_ps(_mm256_srli_epi32(n_side, 16));
  rc::TokSums<vf8> q;
  q.n0 = (vf8)n0, q.o = (vf8)so, q.r = (vf8)sr, q.d = (vf8)sd, q.k3 = (vf8)sk3, q.rho2 = (vf8)srho2;
  q.w = (vf8)sw, q.high = (vf8)sh, q.low = (vf8)sl, q.mx = (vf8)mx, q.mn = (vf8)mn;
  acc->add(q);
}
#endif

// The rollout-correction block on the ISA copy of lane count W (the caller's).
template <int W, typename... A>
RLHF_FAST_INLINE void rc_block(const rc::RowCfg<float>& c, A&&... a) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (W >= 8)
    rc::with_token_mode(c, [&](auto TW, auto RSK) {
      rc_block_avx2<decltype(TW)::value, decltype(RSK)::value>(a..., c);
    });
  else
    rc_block_lanes(a..., c);
#else
  rc_block_lanes(a..., c);
#endif
}

// One row: dtok and the row sums (the masked entropy's too, when given);
// with RC the rollout correction in the same sweep (rc::token, block by
// block): its weight scales the clipped term, rejected tokens leave the
// loss, and the rollout_corr/* row sums come out of the same sweep.
template <typename acc_t, int KL, bool RC, bool DUAL>
struct PolicyRowKernel {
  template <int W>  // the fp32 copy's exps take max(W, 8) lanes at once; all else 8
  static RLHF_FAST_INLINE void run(const RowIO<acc_t>* io, int64_t T, PolicyCfg<acc_t> c,
                                   const rc::RowCfg<acc_t>* rcc) {
    const acc_t *lp = io->lp, *old = io->old, *adv = io->adv, *ref = io->ref, *ent = io->ent, *roll = io->roll;
    const uint8_t* mk = io->mk;
    acc_t* dtok = io->dtok;
    uint8_t* keep = io->keep;
    // acc[7]: the masked entropy sum, in the same lanes and order, so it too
    // is the same in every copy
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, rmax = 0;  // ratios are > 0: 0 is the max identity
    RcAcc racc;
    int64_t t = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      // Each block of kBlock tokens in three passes, its data staying in L1:
      //  1. the exps (policy ratio, k3 KL, rollout weight), W lanes at a time
      //     (16 on AVX-512; each exp is its own element, so no bit depends on W);
      //  2. with a correction, rc::token on 8 lanes: the kept mask and the
      //     weight (over the rollout exp in ex_rc), and the metric sums;
      //  3. policy_tok on 8 lanes, reading both.
      // As one fused loop, each 8-token group was a ~200-instruction chain
      // with two or three ~15-deep exp polynomials on its critical path, and
      // the core ran ~0.9 instructions per clock; split, each loop's
      // iterations are short and independent (bare forward at (64, 4096):
      // about a third less time, docs/rollout_correction.md).
      constexpr int kL = kPolicyLanes;
      constexpr int kExp = W > kL ? W : kL;
      alignas(64) float ex_ratio[kBlock], ex_kl[KL == kK3 ? kBlock : 1], ex_rc[RC ? kBlock : 1];
      alignas(64) int32_t rc_keep[RC ? kBlock : 1];
      vf8 s[8], m;
      while (t + kL <= T) {
        const int64_t t0 = t, t_end = std::min(T, t + kBlock);
        auto exps = [&](int64_t u, auto n_tag) RLHF_FAST_INLINE_LAMBDA {
          using vf = typename Vec<decltype(n_tag)::value>::f;
          vf lpv, oldv, refv = {}, rv = {};
          std::memcpy(&lpv, lp + u, sizeof(vf)), std::memcpy(&oldv, old + u, sizeof(vf));
          if constexpr (KL == kK3) std::memcpy(&refv, ref + u, sizeof(vf));
          if constexpr (RC) std::memcpy(&rv, roll + u, sizeof(vf));
          const TokExps<vf> e = tok_exps<KL, RC>(lpv, oldv, refv, rv);
          std::memcpy(ex_ratio + (u - t0), &e.ratio, sizeof(vf));
          if constexpr (KL == kK3) std::memcpy(ex_kl + (u - t0), &e.kl, sizeof(vf));
          if constexpr (RC) {
            std::memcpy(ex_rc + (u - t0), &e.rc, sizeof(vf));
            if (io->next_old) {  // one 64-byte line of each per 16 tokens
              __builtin_prefetch(io->next_old + u), __builtin_prefetch(io->next_roll + u);
              if ((u & 63) == 0) __builtin_prefetch(io->next_mk + u);
            }
          }
        };
        int64_t u = t0;
        for (; u + kExp <= t_end; u += kExp) exps(u, std::integral_constant<int, kExp>{});
        for (; u + kL <= t_end; u += kL) exps(u, std::integral_constant<int, kL>{});

        if constexpr (RC)
          rc_block<W>(*rcc, old + t0, roll + t0, mk + t0, (t_end - t0) / kL * kL, ex_rc, rc_keep,
                      keep ? keep + t0 : nullptr, &racc);

        // 8 lanes on AVX-512 too: at 16, GCC 12 scalarised the nested selects
        // of policy_tok (a test-and-branch per lane; 28 vs 11 ns / token).
        for (auto& v : s) v = vf8{};
        m = vf8{};
        for (; t + kL <= t_end; t += kL) {
          const int64_t i = t - t0;
          vf8 lpv, oldv, advv, refv = {}, wv = {};
          std::memcpy(&lpv, lp + t, sizeof(vf8)), std::memcpy(&oldv, old + t, sizeof(vf8));
          std::memcpy(&advv, adv + t, sizeof(vf8));
          if (KL != kNone) std::memcpy(&refv, ref + t, sizeof(vf8));
          PV::i valid = mask8<W>(mk + t);
          TokExps<vf8> e;
          std::memcpy(&e.ratio, ex_ratio + i, sizeof(vf8));
          if constexpr (KL == kK3) std::memcpy(&e.kl, ex_kl + i, sizeof(vf8));
          if constexpr (RC) std::memcpy(&valid, rc_keep + i, sizeof(vf8)), std::memcpy(&wv, ex_rc + i, sizeof(vf8));
          const auto k = policy_tok<vf8, KL, RC, DUAL>(valid, lpv, oldv, advv, refv, wv, e, c);
          std::memcpy(dtok + t, &k.dtok, sizeof(vf8));
          add8(s[0], k.loss), add8(s[1], k.kl), add8(s[2], k.n), add8(s[3], k.clip), add8(s[4], k.low);
          add8(s[5], k.akl), add8(s[6], k.r);
          m = (k.r > m) | (k.r != k.r) ? k.r : m;  // a NaN ratio (NaN log-prob) is the max, as elsewhere
          if (ent) {
            vf8 ev;
            std::memcpy(&ev, ent + t, sizeof(vf8));
            add8(s[7], sel<vf8>(valid, ev, vf8{}));
          }
        }
        for (int j = 0; j < 8; ++j) {
          float sum = 0;
          for (int l = 0; l < kL; ++l) sum += s[j][l];
          acc[j] += sum;
        }
        for (int l = 0; l < kL; ++l) rmax = nan_max(rmax, double(m[l]));
      }
    }
    for (; t < T; ++t) {  // tail (and the whole fp64 row)
      bool valid = mk[t] != 0;
      acc_t w = 1;
      const auto e = tok_exps<KL, RC>(lp[t], old[t], KL == kK3 ? ref[t] : acc_t(0), RC ? roll[t] : acc_t(0));
      if constexpr (RC) {
        rc::TokSums<acc_t> q;
        valid = rc_token_scalar<acc_t>(q, valid, old[t], roll[t], e.rc, *rcc, w);
        racc.add(q);
        if (keep) keep[t] = valid;
      }
      const auto k = policy_tok<acc_t, KL, RC, DUAL>(valid, lp[t], old[t], adv[t],
                                                     KL != kNone ? ref[t] : acc_t(0), w, e, c);
      dtok[t] = k.dtok;
      acc[0] += double(k.loss), acc[1] += double(k.kl), acc[2] += double(k.n), acc[3] += double(k.clip);
      acc[4] += double(k.low), acc[5] += double(k.akl), acc[6] += double(k.r);
      rmax = nan_max(rmax, double(k.r));
      if (ent && valid) acc[7] += double(ent[t]);
    }
    PolicyRow* out = io->out;
    out->pg = acc[0], out->kl = acc[1], out->n = acc[2], out->clip = acc[3], out->lower = acc[4];
    out->akl = acc[5], out->rsum = acc[6], out->rmax = rmax, out->ent = acc[7];
    if constexpr (RC) {
      rc::Row& o = *io->rc_out;
      const double* q = racc.s;
      o.n0 = q[0], o.s_old = q[1], o.s_roll = q[2], o.s_lr = q[3], o.s_k3 = q[4], o.s_rho2 = q[5];
      o.n_rej = q[0] - acc[2];  // the valid tokens less those the policy pass kept
      if (rcc->tok_w == rc::kWRow) {  // one weight for the row
        const double w = rcc->w_row;
        o.s_w = q[0] * w, o.n_high = rcc->high_row ? q[0] : 0.0, o.n_low = rcc->low_row ? q[0] : 0.0;
        o.max_w = q[0] > 0 ? w : -INFINITY, o.min_w = q[0] > 0 ? w : INFINITY;
      } else {
        o.s_w = q[6], o.n_high = q[7], o.n_low = q[8], o.max_w = racc.mx, o.min_w = racc.mn;
      }
    }
  }
};

// The compile-time variants of the row kernel: KL kind (none / k3 / the
// cheap three) x rollout correction. fp64 rows are scalar code whatever the
// ISA (the vector body is fp32 only): one copy, not three.
template <typename acc_t, typename... A>
void policy_row(int kl, bool dual, bool has_rc, A&&... args) {
  auto call = [&](auto K, auto R, auto D) {
    using Kern = PolicyRowKernel<acc_t, decltype(K)::value, decltype(R)::value, decltype(D)::value>;
    if constexpr (std::is_same_v<acc_t, float>) isa_call<Kern>(args...);
    else isa_copy_baseline<Kern>(args...);
  };
  // The dual clip's terms (~14 vector ops per 8 tokens) are compiled out of
  // the fp32 kernels without a correction when it is off: computed and not
  // selected they cost k1 / k2 without dual clip 6-10% (same-run A/B,
  // docs/build.md). With a correction (a larger body) and in fp64 the dual
  // clip stays a run-time option.
  auto with_rc = [&](auto K) {
    if (has_rc) call(K, std::true_type{}, std::true_type{});
    else if (!std::is_same_v<acc_t, float> || dual) call(K, std::false_type{}, std::true_type{});
    else if constexpr (std::is_same_v<acc_t, float>) call(K, std::false_type{}, std::false_type{});
  };
  switch (kl) {
    case kK3: return with_rc(std::integral_constant<int, kK3>{});
    case kNone: return with_rc(std::integral_constant<int, kNone>{});
    default: return with_rc(std::integral_constant<int, kKlCheap>{});
  }
}

// The row pass of the sequence / geometric levels and the sequence
// rejection options: one read of old / rollout / mask (16 KB each at
// T = 4096 fp32, so the token loop then finds them in L1/L2), no exp unless
// a k3 statistic is asked for. fp32 on kPolicyLanes explicit lanes (the
// omp simd loop of rc::row_stats cost ~4 ns / token, 1 ms at (64, 4096));
// fp64 rows take rc::row_stats.
template <bool K3, int W>
RLHF_FAST_INLINE rc::RowStats row_stats8(const float* old, const float* roll, const uint8_t* mk, int64_t T) {
  constexpr int kL = kPolicyLanes;
  rc::RowStats out;
  int64_t t = 0;
  const vf8 zero = vf8{}, one = bcast<vf8>(1), lo20 = bcast<vf8>(-20), hi20 = bcast<vf8>(20);
  while (t + kL <= T) {
    vf8 n{}, lr{}, k1{}, k2{}, k3{}, m2{}, m3{};  // k2, k3 >= 0: 0 is their max identity
    for (const int64_t t_end = std::min(T, t + kBlock); t + kL <= t_end; t += kL) {
      vf8 o, r;
      std::memcpy(&o, old + t, sizeof(o)), std::memcpy(&r, roll + t, sizeof(r));
      const PV::i valid = mask8<W>(mk + t);
      const vf8 d = sel<vf8>(valid, o - r, zero), c = clampv(d, lo20, hi20);
      const vf8 q2 = bcast<vf8>(0.5) * c * c;
      n += sel<vf8>(valid, one, zero), lr += d, k1 -= c, k2 += q2;
      m2 = q2 > m2 ? q2 : m2;
      if constexpr (K3) {
        const vf8 q3 = exp_pm20(c) - one - c;
        k3 += q3, m3 = q3 > m3 ? q3 : m3;
      }
    }
    float sn = 0, slr = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int l = 0; l < kL; ++l) {
      sn += n[l], slr += lr[l], s1 += k1[l], s2 += k2[l], s3 += k3[l];
      out.mx[2] = double(m2[l]) > out.mx[2] ? double(m2[l]) : out.mx[2];
      out.mx[3] = double(m3[l]) > out.mx[3] ? double(m3[l]) : out.mx[3];
    }
    out.n += sn, out.lr += slr, out.k[1] += s1, out.k[2] += s2, out.k[3] += s3;
  }
  for (; t < T; ++t) {
    if (mk[t] == 0) continue;
    const double d = double(old[t] - roll[t]);
    const float c = clampv(old[t] - roll[t], -20.f, 20.f);
    const float q2 = 0.5f * c * c, q3 = K3 ? exp_pm20(c) - 1.f - c : 0.f;
    out.n += 1, out.lr += d, out.k[1] -= c, out.k[2] += q2, out.k[3] += q3;
    out.mx[2] = double(q2) > out.mx[2] ? double(q2) : out.mx[2];
    out.mx[3] = double(q3) > out.mx[3] ? double(q3) : out.mx[3];
  }
  return out;
}

template <typename acc_t>
struct RcRowPass {
  template <int W>
  static RLHF_FAST_INLINE rc::RowStats run(const acc_t* old, const acc_t* roll, const uint8_t* mk, int64_t T,
                                           bool k3) {
    if constexpr (std::is_same_v<acc_t, float>)
      return k3 ? row_stats8<true, W>(old, roll, mk, T) : row_stats8<false, W>(old, roll, mk, T);
    else
      return k3 ? rc::row_stats<true>(old, roll, mk, T) : rc::row_stats<false>(old, roll, mk, T);
  }
};

template <typename acc_t>
void policy_rows(const Rows& R, const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                 const at::Tensor& ent, const at::Tensor& ref, const at::Tensor& roll, const uint8_t* mk,
                 int kl, PolicyCfg<acc_t> c, const rc::Cfg& rcc, acc_t* dtok, uint8_t* keep,
                 std::vector<PolicyRow>& rows, std::vector<rc::Row>& rc_rows) {
  const int64_t B = R.n, L = R.max_len;
  const auto s_lp = src_of<acc_t>(lp), s_old = src_of<acc_t>(old), s_adv = src_of<acc_t>(adv),
             s_ent = src_of<acc_t>(ent), s_ref = src_of<acc_t>(ref), s_roll = src_of<acc_t>(roll);
  const bool has_rc = roll.defined();
  at::parallel_for(0, B, rows_per_task(R.mean_len()), [&](int64_t begin, int64_t end) {
    // scratch rows for inputs that are not already acc_t (bf16 / fp16 / mixed)
    std::vector<acc_t> buf(6 * L);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = R.start(b), T = R.len(b);
      RowIO<acc_t> io{s_lp.row(o, T, buf.data()), s_old.row(o, T, buf.data() + L),
                      s_adv.row(o, T, buf.data() + 2 * L), s_ref.row(o, T, buf.data() + 3 * L),
                      s_ent.row(o, T, buf.data() + 4 * L), s_roll.row(o, T, buf.data() + 5 * L), mk + o, dtok + o,
                      keep ? keep + o : nullptr, &rows[b], has_rc ? &rc_rows[b] : nullptr};
      double row_raw = 1.0;
      bool row_pass = true;
      if (has_rc && rcc.needs_row_pass()) {
        // The row pass is the first to read a row's old / rollout / mask:
        // 9 bytes per token from L3 or DRAM for ~2.5 instructions, so it
        // waits on memory. Prefetched during the previous row's exp pass
        // (two lines per 16 tokens), they are in cache: the sequence-level
        // sweep at (64, 4096) fp32 2-6% faster (same-binary A/B, min and
        // median of 30 calls, 7 runs).
        // (only over the next row's first T tokens: no read past a shorter one)
        if (b + 1 < end && R.len(b + 1) >= T && s_old.direct_row(R.start(b + 1)) &&
            s_roll.direct_row(R.start(b + 1))) {
          const int64_t on = R.start(b + 1);
          io.next_old = s_old.direct_row(on), io.next_roll = s_roll.direct_row(on);
          io.next_mk = mk + on;
        }
        rc::RowStats st;
        if constexpr (std::is_same_v<acc_t, float>)
          st = isa_call<RcRowPass<acc_t>>(io.old, io.roll, io.mk, T, rcc.row_pass_needs_k3());
        else  // fp64: scalar code on every ISA, one copy
          st = isa_copy_baseline<RcRowPass<acc_t>>(io.old, io.roll, io.mk, T, rcc.row_pass_needs_k3());
        row_raw = rc::row_raw_weight(rcc, st);
        row_pass = rc::row_passes(rcc, st);
      }
      const rc::RowCfg<acc_t> rrc = rc::row_cfg<acc_t>(rcc, row_raw, row_pass);
      policy_row<acc_t>(kl, c.dual_on != acc_t(0), has_rc, &io, T, c, &rrc);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& ref_logprobs, double entropy_coef, double kl_coef,
    c10::string_view kl_kind, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg_s, double agg_norm, const std::optional<at::Tensor>& rollout_logprobs,
    c10::string_view rc_is, double rc_is_upper, std::optional<double> rc_is_lower, c10::string_view rc_rs,
    double rc_rs_lower, double rc_rs_upper, const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "rlhf_fast::ppo_loss_fwd";
  check_float(logprobs, op, "logprobs");
  const Rows R = rows_of(logprobs, cu_seqlens, op, "logprobs");
  const auto shape = logprobs.sizes();
  const at::Tensor lp = logprobs.contiguous();
  check_float(old_logprobs, op, "old_logprobs");
  check_float(advantages, op, "advantages");
  const at::Tensor old = prep(old_logprobs, shape, op, "old_logprobs");
  const at::Tensor adv = prep(advantages, shape, op, "advantages");
  const at::Tensor mk = prep_mask(mask, shape, op);
  at::Tensor ent, ref, roll;
  if (entropy.has_value() && entropy->defined()) {
    check_float(*entropy, op, "entropy");
    ent = prep(*entropy, shape, op, "entropy");
  }
  if (ref_logprobs.has_value() && ref_logprobs->defined()) {
    check_float(*ref_logprobs, op, "ref_logprobs");
    ref = prep(*ref_logprobs, shape, op, "ref_logprobs");
  }
  if (rollout_logprobs.has_value() && rollout_logprobs->defined()) {
    check_float(*rollout_logprobs, op, "rollout_logprobs");
    roll = prep(*rollout_logprobs, shape, op, "rollout_logprobs");
  }
  const rc::Cfg rcc = parse_rc(rc_is, rc_is_upper, rc_is_lower, rc_rs, rc_rs_lower, rc_rs_upper, op);
  TORCH_CHECK(roll.defined() || (rcc.is == rc::kIsNone && rcc.rs == rc::kRsNone), op,
              ": a rollout correction needs rollout_logprobs");
  TORCH_CHECK(clip_low > 0 && clip_high > 0, op, ": clip_low and clip_high must be > 0");
  TORCH_CHECK(!dual_clip.has_value() || *dual_clip > 1.0, op, ": dual_clip must be > 1");
  const Agg agg = parse_agg(std::string(agg_s), op);
  const double norm = packed_norm(R, agg_norm, op);
  const int kl = ref.defined() ? parse_kl(std::string(kl_kind), op) : kNone;

  const int64_t B = R.n;
  const auto acc = acc_dtype(lp.scalar_type());
  const auto opts = lp.options().dtype(acc);
  at::Tensor dtok = lp.new_empty(shape, opts);
  // the mask after rejection, for backward's entropy gradient; (0,) without rejection
  const std::vector<int64_t> keep_shape = rcc.rs != rc::kRsNone ? shape.vec() : std::vector<int64_t>{0};
  at::Tensor keep = lp.new_empty(keep_shape, lp.options().dtype(at::kBool));
  std::vector<PolicyRow> rows(B);
  std::vector<rc::Row> rc_rows(roll.defined() ? B : 0);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  uint8_t* kp = keep.numel() ? reinterpret_cast<uint8_t*>(keep.data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_loss_fwd", [&] {
    PolicyCfg<scalar_t> c{scalar_t(1.0 - clip_low),       scalar_t(1.0 + clip_high),
                          scalar_t(dual_clip.value_or(3.0)), scalar_t(kl_coef),
                          scalar_t(dual_clip.has_value()), kl};
    if (R.total > 0)
      policy_rows<scalar_t>(R, lp, old, adv, ent, ref, roll, m, kl, c, rcc,
                            dtok.data_ptr<scalar_t>(), kp, rows, rc_rows);
  });

  // Fixed-order fp64 epilogue over the rows.
  double N = 0, S = 0;
  for (const auto& r : rows) N += r.n, S += r.n > 0 ? 1.0 : 0.0;
  double pg = 0, en = 0, kv = 0, clip = 0, lower = 0, akl = 0, rsum = 0, rmax = 0;
  std::vector<double> scale(B);
  for (int64_t b = 0; b < B; ++b) {
    const PolicyRow& r = rows[b];
    scale[b] = row_scale_of(agg, r.n, N, S, norm);
    pg += scale[b] * r.pg, en += scale[b] * r.ent, kv += scale[b] * r.kl;
    clip += r.clip, lower += r.lower, akl += r.akl, rsum += r.rsum;
    rmax = nan_max(rmax, r.rmax);
  }
  const double inv_n = N > 0 ? 1.0 / N : 0.0;
  const double loss = pg - entropy_coef * en + kl_coef * kv;
  std::vector<double> st = {pg, en, kv, clip * inv_n, lower * inv_n, akl * inv_n, rsum * inv_n, rmax};
  const std::vector<double> rcs = roll.defined() ? rc_metrics(rcc, rc_rows) : std::vector<double>(kRcStats, 0.0);
  st.insert(st.end(), rcs.begin(), rcs.end());
  at::Tensor stats = tensor_of(lp, st, acc);
  at::Tensor loss_t = scalar_of(lp, loss, acc);
  at::Tensor row_scale = tensor_of(lp, scale, acc);
  return {loss_t, stats, dtok, row_scale, keep};
}

namespace {

// grad_logprobs = g * row_scale[b] * dtok (src = dtok); grad_entropy =
// -coef * g * row_scale[b] * mask (src = nullptr). Elementwise: every copy
// gives the same bits.
template <typename acc_t, typename T>
struct ScaleRowKernel {
  template <int W>
  static RLHF_FAST_INLINE void run(const acc_t* src, const uint8_t* mk, acc_t s, T* dst, int64_t n) {
    if (src) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) from_acc(s * src[t], dst + t);
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) from_acc(mk[t] != 0 ? s : acc_t(0), dst + t);
    }
  }
};

template <typename acc_t, typename F>
void dispatch_out(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: if constexpr (std::is_same_v<acc_t, float>) return f(static_cast<float*>(nullptr)); break;
    case at::kDouble: if constexpr (std::is_same_v<acc_t, double>) return f(static_cast<double*>(nullptr)); break;
    case at::kBFloat16: if constexpr (std::is_same_v<acc_t, float>) return f(static_cast<bf16_bits*>(nullptr)); break;
    case at::kHalf: if constexpr (std::is_same_v<acc_t, float>) return f(static_cast<fp16_bits*>(nullptr)); break;
    default: break;
  }
  // fp32 accumulation written as fp64 (or the reverse): convert afterwards.
  TORCH_CHECK(false, "rlhf_fast::ppo_loss_bwd: unsupported gradient dtype ", dt);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ppo_loss_bwd_cpu(const at::Tensor& grad_loss,
                                                    const at::Tensor& dtok, const at::Tensor& row_scale,
                                                    const at::Tensor& mask, double entropy_coef,
                                                    bool has_entropy, at::ScalarType logp_dtype,
                                                    at::ScalarType entropy_dtype,
                                                    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "rlhf_fast::ppo_loss_bwd";
  const Rows R = rows_of(dtok, cu_seqlens, op, "dtok");
  const int64_t B = R.n;
  const auto acc = dtok.scalar_type();
  const at::Tensor d = dtok.contiguous();
  const at::Tensor rs = prep(row_scale.to(acc), {B}, op, "row_scale");
  const at::Tensor mk = prep_mask(mask, dtok.sizes(), op);
  const double g = grad_loss.item<double>();
  // A grad dtype that the accumulation cannot write directly (fp64 grads
  // for fp32 math or the reverse) is produced in acc and converted.
  auto out_dtype = [&](at::ScalarType want) {
    const bool direct = acc == at::kDouble ? want == at::kDouble : want != at::kDouble;
    return direct ? want : acc;
  };
  at::Tensor glp = dtok.new_empty(dtok.sizes(), dtok.options().dtype(out_dtype(logp_dtype)));
  at::Tensor gent = has_entropy ? dtok.new_empty(dtok.sizes(), dtok.options().dtype(out_dtype(entropy_dtype)))
                                : dtok.new_empty({0}, dtok.options().dtype(entropy_dtype));
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_loss_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t* dp = d.const_data_ptr<acc_t>();
    const acc_t* sp = rs.const_data_ptr<acc_t>();
    const int64_t grain = rows_per_task(R.mean_len());
    dispatch_out<acc_t>(glp.scalar_type(), [&](auto* tag) {
      using O = std::remove_pointer_t<decltype(tag)>;
      O* out = reinterpret_cast<O*>(glp.data_ptr());
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t o = R.start(b);
          isa_call<ScaleRowKernel<acc_t, O>>(dp + o, m + o, acc_t(g * sp[b]), out + o, R.len(b));
        }
      });
    });
    if (has_entropy) {
      dispatch_out<acc_t>(gent.scalar_type(), [&](auto* tag) {
        using O = std::remove_pointer_t<decltype(tag)>;
        O* out = reinterpret_cast<O*>(gent.data_ptr());
        at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t o = R.start(b);
            isa_call<ScaleRowKernel<acc_t, O>>(static_cast<const acc_t*>(nullptr), m + o,
                                               acc_t(-entropy_coef * g * sp[b]), out + o, R.len(b));
          }
        });
      });
    }
  });
  if (glp.scalar_type() != logp_dtype) glp = glp.to(logp_dtype);
  if (has_entropy && gent.scalar_type() != entropy_dtype) gent = gent.to(entropy_dtype);
  return {glp, gent};
}

}  // namespace cpu
}  // namespace rlhf_fast
