// CPU PPO losses: the clipped policy loss + entropy bonus + KL loss (one
// fused op), the clipped value loss and the per-token KL estimators.
//
// Forward is one sweep over the (B, T) token tensors, rows in parallel. Each
// row produces the per-token gradient d loss_tok / d logprobs (fp32, 0 where
// masked) and fp64 row sums; a serial epilogue then folds the B rows in a
// fixed order (no atomics: the same bits for any thread count) into the
// loss, the stats and the per-row scale that aggregation applies.
// Backward is grad_logprobs[b, t] = grad_loss * row_scale[b] * dtok[b, t]:
// one read of 4 bytes and one write per token. Recomputing in backward
// instead would re-read logprobs, old_logprobs, advantages, mask (and
// ref_logprobs): 13-17 bytes per token, and repeat every exp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "rlhf_fast/cpu_math.h"
#include "rlhf_fast/rollout_correction.h"

namespace rlhf_fast {
namespace cpu {
namespace {

// ---------------- scalar helpers ----------------

// exp(x) for |x| <= 20 (callers clamp first, as verl does): cpu_math.h's
// polynomial, whose underflow select never triggers above -87.
RLHF_FAST_INLINE float exp_pm20(float x) { return exp_nonpos(x); }
RLHF_FAST_INLINE double exp_pm20(double x) { return __builtin_exp(x); }

template <typename acc_t>
RLHF_FAST_INLINE acc_t clampv(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Gradient of max(a, b) / min(a, b) as torch gives it: all to the winner,
// half to each on a tie.
template <typename acc_t>
RLHF_FAST_INLINE acc_t dmax(acc_t a, acc_t b, acc_t ga, acc_t gb) {
  return a > b ? ga : (b > a ? gb : acc_t(0.5) * (ga + gb));
}

enum Kl : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3, kNone = 4 };
enum Agg : int { kTokenMean = 0, kSeqTokenSum = 1, kSeqTokenMean = 2, kSeqTokenSumNorm = 3 };

Kl parse_kl(const std::string& s, const char* op) {
  if (s == "k1") return kK1;
  if (s == "k2") return kK2;
  if (s == "k3") return kK3;
  if (s == "abs") return kAbs;
  TORCH_CHECK(false, op, ": kind must be one of k1, k2, k3, abs; got '", s, "'");
}

Agg parse_agg(const std::string& s, const char* op) {
  if (s == "token-mean") return kTokenMean;
  if (s == "seq-mean-token-sum") return kSeqTokenSum;
  if (s == "seq-mean-token-mean") return kSeqTokenMean;
  if (s == "seq-mean-token-sum-norm") return kSeqTokenSumNorm;
  TORCH_CHECK(false, op, ": agg must be one of token-mean, seq-mean-token-sum, ",
              "seq-mean-token-mean, seq-mean-token-sum-norm; got '", s, "'");
}

// KL estimate of logp vs ref and its derivative in logp (verl kl_penalty;
// k3 = low_var_kl with its clamps, whose gradient is 0 outside them).
template <int KIND, typename acc_t>
RLHF_FAST_INLINE void kl_term(acc_t lp, acc_t ref, acc_t& val, acc_t& dval) {
  const acc_t d = lp - ref;
  if (KIND == kK1) {
    val = d;
    dval = acc_t(1);
  } else if (KIND == kK2) {
    val = acc_t(0.5) * d * d;
    dval = d;
  } else if (KIND == kAbs) {
    val = d < acc_t(0) ? -d : d;
    dval = d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
  } else if (KIND == kK3) {
    const acc_t k = clampv(-d, acc_t(-20), acc_t(20));
    const acc_t e = exp_pm20(k);
    const acc_t kld = e - k - acc_t(1);
    val = clampv(kld, acc_t(-10), acc_t(10));
    const bool pass = (-d >= acc_t(-20)) & (-d <= acc_t(20)) & (kld >= acc_t(-10)) & (kld <= acc_t(10));
    dval = pass ? acc_t(1) - e : acc_t(0);
  } else {
    val = dval = acc_t(0);
  }
}

// ---------------- row kernels ----------------

template <typename acc_t>
struct PolicyCfg {
  acc_t lo, hi, dual, kl_coef;
};

// Row sums, fp64: 4096 fp32 terms summed in fp64 lose nothing measurable.
struct PolicyRow {
  double pg = 0, kl = 0, ent = 0, n = 0, clip = 0, lower = 0, akl = 0, rsum = 0, rmax = 0;
};

// ---------------- the per-token math, once, for scalars and vectors ----------------
// GCC would not vectorise the token loop on its own (the clip branches and
// the exp sit under `valid ? ... : 0` selects; it stayed scalar at ~25-40 ns
// per token in every clone), so the fp32 path is written with GCC vector
// types: 8 floats per step, ternaries become blends, and the same template
// body runs on plain scalars for the row tail and the fp64 path.
// (-Wpsabi: helpers returning vf8 are always inlined, no ABI is crossed.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint8_t vu8 __attribute__((vector_size(8)));

template <typename V> struct Lane;
template <> struct Lane<float> {
  using M = bool;
  static float splat(float x) { return x; }
};
template <> struct Lane<vf8> {
  using M = vi8;
  static vf8 splat(float x) { return vf8{} + x; }
};

template <typename V>
RLHF_FAST_INLINE V sel(typename Lane<V>::M m, V a, V b) { return m ? a : b; }

// exp(x) for |x| <= 20: cpu_math.h's polynomial (vf8 is Vec<8>::f).
RLHF_FAST_INLINE float exp20(float x) { return exp_nonpos(x); }
RLHF_FAST_INLINE vf8 exp20(vf8 x) { return exp_nonpos<8>(x); }
RLHF_FAST_INLINE double exp20(double x) { return __builtin_exp(x); }
template <> struct Lane<double> {
  using M = bool;
  static double splat(double x) { return x; }
};

template <typename V>
RLHF_FAST_INLINE V clampL(V x, V lo, V hi) {
  return sel<V>(x < lo, lo, sel<V>(x > hi, hi, x));
}

template <int KIND, typename V>
RLHF_FAST_INLINE void kl_lane(V lp, V ref, V& val, V& dval) {
  using L = Lane<V>;
  const V zero = L::splat(0), one = L::splat(1), d = lp - ref;
  if (KIND == kK1) {
    val = d, dval = one;
  } else if (KIND == kK2) {
    val = L::splat(0.5) * d * d, dval = d;
  } else if (KIND == kAbs) {
    val = sel<V>(d < zero, -d, d);
    dval = sel<V>(d > zero, one, sel<V>(d < zero, -one, zero));
  } else if (KIND == kK3) {
    const V k = clampL(-d, L::splat(-20), L::splat(20));
    const V e = exp20(k);
    const V kld = e - k - one;
    val = clampL(kld, L::splat(-10), L::splat(10));
    const auto pass = (-d >= L::splat(-20)) & (-d <= L::splat(20)) & (kld >= L::splat(-10)) & (kld <= L::splat(10));
    dval = sel<V>(pass, one - e, zero);
  } else {
    val = dval = zero;
  }
}

// Per-token terms of the fused policy loss for one lane group. Masked
// tokens are zeroed on input and every output is multiplied by fv in {0,1}.
template <typename V, int KL, bool DUAL>
struct PolicyTok {
  V dtok, loss, kl, n, clip, low, akl, r;
};

// w_t: the rollout-correction weight (stop-gradient) of the clipped term;
// it scales the token's policy loss and its gradient, not the KL term.
template <typename V, int KL, bool DUAL, bool W, typename acc_t>
RLHF_FAST_INLINE PolicyTok<V, KL, DUAL> policy_tok(typename Lane<V>::M valid, V lp_t, V old_t, V adv_t, V ref_t,
                                                   V w_t, PolicyCfg<acc_t> c) {
  using L = Lane<V>;
  const V zero = L::splat(0), one = L::splat(1), half = L::splat(0.5);
  const V fv = sel<V>(valid, one, zero);
  const V lpt = sel<V>(valid, lp_t, zero);
  const V x = lpt - sel<V>(valid, old_t, zero);
  const V lo20 = L::splat(-20), hi20 = L::splat(20);
  const V xc = clampL(x, lo20, hi20);
  const V r = exp20(xc);
  const V a = sel<V>(valid, adv_t, zero);
  const V clo = L::splat(c.lo), chi = L::splat(c.hi);
  const V l1 = -a * r;  // also d l1 / d x
  const V l2 = -a * clampL(r, clo, chi);
  const V g2 = sel<V>((r >= clo) & (r <= chi), l1, zero);  // d l2 / d x
  const V c1 = sel<V>(l1 > l2, l1, l2);
  // torch's gradient of max: all to the winner, half to each on a tie
  V dl = sel<V>(l1 > l2, l1, sel<V>(l2 > l1, g2, half * (l1 + g2)));
  V loss = c1, low = zero;
  if (DUAL) {
    const V l3 = -a * L::splat(c.dual);
    const auto neg = a < zero;
    const V d2 = sel<V>(c1 < l3, dl, sel<V>(c1 > l3, zero, half * dl));
    loss = sel<V>(neg, sel<V>(c1 < l3, c1, l3), c1);
    dl = sel<V>(neg, d2, dl);
    low = sel<V>(neg & (c1 > l3), one, zero);
  }
  dl = sel<V>((x >= lo20) & (x <= hi20), dl, zero);
  if (W) {
    const V w = sel<V>(valid, w_t, zero);
    dl = dl * w, loss = loss * w;
  }
  V kv = zero, dk = zero;
  if (KL != kNone) kl_lane<KL>(lpt, sel<V>(valid, ref_t, zero), kv, dk);
  return {(dl + L::splat(c.kl_coef) * dk) * fv, loss * fv, kv * fv, fv,
          sel<V>(l2 > l1, one, zero) * fv, low * fv, -xc * fv, r * fv};
}

// Row sums in fp64; lanes / blocks of <= 256 tokens summed in the lane type first.
template <typename V, int KL, bool DUAL, typename acc_t>
RLHF_FAST_INLINE void add_tok(const PolicyTok<V, KL, DUAL>& k, double* acc, double& rmax) {
  acc[0] += double(k.loss), acc[1] += double(k.kl), acc[2] += double(k.n), acc[3] += double(k.clip);
  acc[4] += double(k.low), acc[5] += double(k.akl), acc[6] += double(k.r);
  rmax = double(k.r) > rmax ? double(k.r) : rmax;
}

template <typename acc_t, int KL, bool DUAL, bool W>
RLHF_FAST_INLINE void policy_row(const acc_t* lp, const acc_t* old, const acc_t* adv,
                                 const acc_t* ref, const acc_t* wt, const uint8_t* mk, int64_t T,
                                 PolicyCfg<acc_t> c, acc_t* dtok, PolicyRow& out) {
  double acc[7] = {0, 0, 0, 0, 0, 0, 0}, rmax = 0;  // ratios are > 0: 0 is the max identity
  int64_t t = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr int64_t kGroups = 32;  // 8 x 32 = 256 tokens per fp32 partial sum
    while (t + 8 <= T) {
      vf8 s[7] = {}, m = {};
      for (int64_t g = 0; g < kGroups && t + 8 <= T; ++g, t += 8) {
        vf8 lpv, oldv, advv, refv = {}, wv = {};
        vu8 mv;
        std::memcpy(&lpv, lp + t, 32), std::memcpy(&oldv, old + t, 32), std::memcpy(&advv, adv + t, 32);
        if (KL != kNone) std::memcpy(&refv, ref + t, 32);
        if (W) std::memcpy(&wv, wt + t, 32);
        std::memcpy(&mv, mk + t, 8);
        const vi8 valid = __builtin_convertvector(mv, vi8) != 0;
        const auto k = policy_tok<vf8, KL, DUAL, W>(valid, lpv, oldv, advv, refv, wv, c);
        std::memcpy(dtok + t, &k.dtok, 32);
        s[0] += k.loss, s[1] += k.kl, s[2] += k.n, s[3] += k.clip, s[4] += k.low, s[5] += k.akl, s[6] += k.r;
        m = k.r > m ? k.r : m;
      }
      for (int j = 0; j < 7; ++j) {
        float sum = 0;
        for (int l = 0; l < 8; ++l) sum += s[j][l];
        acc[j] += sum;
      }
      for (int l = 0; l < 8; ++l) rmax = m[l] > rmax ? m[l] : rmax;
    }
  }
  for (; t < T; ++t) {  // tail (and the whole fp64 row)
    const auto k = policy_tok<acc_t, KL, DUAL, W>(mk[t] != 0, lp[t], old[t], adv[t],
                                                  KL != kNone ? ref[t] : acc_t(0), W ? wt[t] : acc_t(1), c);
    dtok[t] = k.dtok;
    add_tok<acc_t, KL, DUAL, acc_t>(k, acc, rmax);
  }
  out.pg = acc[0], out.kl = acc[1], out.n = acc[2], out.clip = acc[3], out.lower = acc[4];
  out.akl = acc[5], out.rsum = acc[6], out.rmax = rmax;
}

// Blocks of kBlock tokens for the simpler loops below.
constexpr int64_t kBlock = 256;

template <typename acc_t>
RLHF_FAST_INLINE double masked_sum(const acc_t* x, const uint8_t* mk, int64_t T) {
  double total = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
    const int64_t len = std::min(kBlock, T - t0);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) s += mk[t0 + i] != 0 ? x[t0 + i] : acc_t(0);
    total += s;
  }
  return total;
}

struct ValueRow {
  double loss = 0, n = 0, clip = 0, mean_r = 0, m2_r = 0, mean_e = 0, m2_e = 0;
};

template <typename acc_t, bool CLIP>
RLHF_FAST_INLINE void value_row(const acc_t* v, const acc_t* vo, const acc_t* ret,
                                const uint8_t* mk, int64_t T, acc_t cr, acc_t* dtok,
                                ValueRow& out) {
  alignas(64) acc_t v_loss[kBlock], v_n[kBlock], v_clip[kBlock];
  double loss = 0, n = 0, clip = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
    const int64_t len = std::min(kBlock, T - t0);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i;
      const bool valid = mk[t] != 0;
      const acc_t d = v[t] - ret[t];
      const acc_t vf1 = d * d;
      acc_t vf = vf1, dl = acc_t(2) * d;
      bool clipped = false;
      if (CLIP) {
        const acc_t lo = vo[t] - cr, hi = vo[t] + cr;
        const acc_t e2 = clampv(v[t], lo, hi) - ret[t];
        const acc_t vf2 = e2 * e2;
        const acc_t g2 = (v[t] >= lo) & (v[t] <= hi) ? acc_t(2) * e2 : acc_t(0);
        dl = dmax(vf1, vf2, dl, g2);
        vf = vf1 > vf2 ? vf1 : vf2;
        clipped = vf2 > vf1;
      }
      dtok[t] = valid ? acc_t(0.5) * dl : acc_t(0);
      v_loss[i] = valid ? acc_t(0.5) * vf : acc_t(0);
      v_n[i] = valid ? acc_t(1) : acc_t(0);
      v_clip[i] = valid & clipped ? acc_t(1) : acc_t(0);
    }
    acc_t s_loss = 0, s_n = 0, s_clip = 0;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip)
    for (int64_t i = 0; i < len; ++i) s_loss += v_loss[i], s_n += v_n[i], s_clip += v_clip[i];
    loss += s_loss, n += s_n, clip += s_clip;
  }
  // Explained variance: fp64 means, then a second sweep (the row is still
  // in L1/L2) for the centred sums of squares, so no one-pass cancellation.
  double sr = 0, se = 0, m2r = 0, m2e = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (mk[t] == 0) continue;
    sr += double(ret[t]);
    se += double(ret[t]) - double(v[t]);
  }
  const double mr = n > 0 ? sr / n : 0.0, me = n > 0 ? se / n : 0.0;
  for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
    const int64_t len = std::min(kBlock, T - t0);
    const acc_t mrf = acc_t(mr), mef = acc_t(me);
    acc_t s_r = 0, s_e = 0;
#pragma omp simd reduction(+ : s_r, s_e)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t t = t0 + i;
      const acc_t a = ret[t] - mrf, e = ret[t] - v[t] - mef;
      s_r += mk[t] != 0 ? a * a : acc_t(0);
      s_e += mk[t] != 0 ? e * e : acc_t(0);
    }
    m2r += s_r, m2e += s_e;
  }
  out = {loss, n, clip, mr, m2r, me, m2e};
}

// One out-of-line, ISA-cloned copy per (acc_t, KL, DUAL).
template <typename acc_t, int KL, bool DUAL, bool W>
RLHF_FAST_CPU_CLONES void policy_row_k(const acc_t* lp, const acc_t* old, const acc_t* adv,
                                       const acc_t* ref, const acc_t* wt, const uint8_t* mk, int64_t T,
                                       PolicyCfg<acc_t> c, acc_t* dtok, PolicyRow& out) {
  policy_row<acc_t, KL, DUAL, W>(lp, old, adv, ref, wt, mk, T, c, dtok, out);
}

template <typename acc_t, bool CLIP>
RLHF_FAST_CPU_CLONES void value_row_k(const acc_t* v, const acc_t* vo, const acc_t* ret,
                                      const uint8_t* mk, int64_t T, acc_t cr, acc_t* dtok,
                                      ValueRow& out) {
  value_row<acc_t, CLIP>(v, vo, ret, mk, T, cr, dtok, out);
}

template <typename acc_t, int KL>
RLHF_FAST_CPU_CLONES void kl_fwd_k(const acc_t* lp, const acc_t* ref, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t v, d;
    kl_term<KL>(lp[i], ref[i], v, d);
    out[i] = v;
  }
}

template <typename acc_t, int KL>
RLHF_FAST_CPU_CLONES void kl_bwd_k(const acc_t* g, const acc_t* lp, const acc_t* ref,
                                   acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t v, d;
    kl_term<KL>(lp[i], ref[i], v, d);
    out[i] = g[i] * d;
  }
}

// ---------------- rows of any float dtype as acc_t ----------------

// A (B, T) contiguous input read row by row as acc_t: in place when the
// dtypes match, else converted into a per-thread scratch row (T <= a few
// 10k: the conversion stays in L1/L2 and costs no DRAM traffic).
template <typename acc_t>
struct RowSrc {
  const void* data = nullptr;
  at::ScalarType dt = at::kFloat;
  int64_t T = 0;

  const acc_t* row(int64_t b, acc_t* scratch) const {
    if (data == nullptr) return nullptr;
    const int64_t off = b * T;
    if (dt == c10::CppTypeToScalarType<acc_t>::value) return static_cast<const acc_t*>(data) + off;
    switch (dt) {
      case at::kFloat: return convert(static_cast<const float*>(data) + off, scratch);
      case at::kDouble: return convert(static_cast<const double*>(data) + off, scratch);
      case at::kBFloat16: return convert(static_cast<const bf16_bits*>(data) + off, scratch);
      case at::kHalf: return convert(static_cast<const fp16_bits*>(data) + off, scratch);
      default: TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", dt);
    }
  }
  template <typename S>
  const acc_t* convert(const S* src, acc_t* dst) const {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) dst[t] = static_cast<acc_t>(to_acc(src[t]));
    return dst;
  }
};

template <typename acc_t>
RowSrc<acc_t> src_of(const at::Tensor& t) {
  RowSrc<acc_t> s;
  if (t.defined()) s = {t.const_data_ptr(), t.scalar_type(), t.size(1)};
  return s;
}

// ---------------- checks ----------------

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": ", name, " must be float32, bfloat16, float16 or float64, got ", dt);
}

at::Tensor prep(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

at::Tensor prep_mask(const at::Tensor& mask, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor");
  TORCH_CHECK(mask.sizes() == shape, op, ": mask must have shape ", shape, ", got ", mask.sizes());
  at::Tensor m = mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte ? mask : mask.ne(0);
  return m.contiguous();
}

at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row multiplier that turns row sums into the aggregated loss.
// N valid tokens in all, S non-empty rows, n_b valid tokens in row b.
double row_scale_of(Agg agg, double n_b, double N, double S, double norm) {
  switch (agg) {
    case kTokenMean: return N > 0 ? 1.0 / N : 0.0;
    case kSeqTokenSum: return n_b > 0 ? 1.0 / S : 0.0;
    case kSeqTokenMean: return n_b > 0 ? 1.0 / (S * n_b) : 0.0;
    default: return 1.0 / norm;
  }
}

// ---------------- fused policy loss ----------------

template <typename acc_t>
void policy_dispatch(int kl, bool dual, const acc_t* lp, const acc_t* old, const acc_t* adv,
                     const acc_t* ref, const acc_t* wt, const uint8_t* mk, int64_t T, PolicyCfg<acc_t> c,
                     acc_t* dtok, PolicyRow& out) {
#define RLHF_FAST_POLICY_W(K, D)                                                        \
  (wt ? policy_row_k<acc_t, K, D, true>(lp, old, adv, ref, wt, mk, T, c, dtok, out)     \
      : policy_row_k<acc_t, K, D, false>(lp, old, adv, ref, wt, mk, T, c, dtok, out))
#define RLHF_FAST_POLICY_CASE(K) \
  case K:                        \
    return dual ? RLHF_FAST_POLICY_W(K, true) : RLHF_FAST_POLICY_W(K, false);
  switch (kl) {
    RLHF_FAST_POLICY_CASE(kK1)
    RLHF_FAST_POLICY_CASE(kK2)
    RLHF_FAST_POLICY_CASE(kK3)
    RLHF_FAST_POLICY_CASE(kAbs)
    RLHF_FAST_POLICY_CASE(kNone)
  }
#undef RLHF_FAST_POLICY_CASE
#undef RLHF_FAST_POLICY_W
}

// Rollout correction, ISA-cloned. The row pass reads old / rollout once
// more (row in L1/L2: 2 x 16 KB at T = 4096 fp32) before the weights pass.
template <typename acc_t>
RLHF_FAST_CPU_CLONES void rc_row_k(const acc_t* old, const acc_t* roll, const uint8_t* mk, int64_t T,
                                   const rc::Cfg* c, acc_t* w, uint8_t* keep, rc::Row* out) {
  acc_t row_raw = 1;
  bool row_pass = true;
  if (c->needs_row_pass()) {
    const rc::RowStats s = rc::row_stats(old, roll, mk, T);
    row_raw = acc_t(rc::row_raw_weight(*c, s));
    row_pass = rc::row_passes(*c, s);
  }
  rc::weights_row(old, roll, mk, T, *c, row_raw, row_pass, w, keep, *out);
}

template <typename acc_t>
void policy_rows(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                 const at::Tensor& ent, const at::Tensor& ref, const at::Tensor& roll, const uint8_t* mk,
                 int kl, bool dual, PolicyCfg<acc_t> c, const rc::Cfg& rcc, acc_t* dtok, uint8_t* keep,
                 std::vector<PolicyRow>& rows, std::vector<rc::Row>& rc_rows) {
  const int64_t B = lp.size(0), T = lp.size(1);
  const auto s_lp = src_of<acc_t>(lp), s_old = src_of<acc_t>(old), s_adv = src_of<acc_t>(adv),
             s_ent = src_of<acc_t>(ent), s_ref = src_of<acc_t>(ref), s_roll = src_of<acc_t>(roll);
  const bool has_rc = roll.defined(), has_w = has_rc && rcc.is != rc::kIsNone;
  // ~16k tokens per task: less than that and the OpenMP fork dominates.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(7 * T);
    std::vector<uint8_t> keep_scratch(has_rc && !keep ? T : 0);
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* m = mk + b * T;
      PolicyRow& r = rows[b];
      const acc_t* o = s_old.row(b, buf.data() + T);
      acc_t* w = has_w ? buf.data() + 6 * T : nullptr;
      if (has_rc) {
        uint8_t* kp = keep ? keep + b * T : keep_scratch.data();
        rc_row_k<acc_t>(o, s_roll.row(b, buf.data() + 5 * T), m, T, &rcc, buf.data() + 6 * T, kp, &rc_rows[b]);
        if (keep) m = kp;  // rejected tokens leave the loss, its counts and the aggregation
      }
      policy_dispatch<acc_t>(kl, dual, s_lp.row(b, buf.data()), o, s_adv.row(b, buf.data() + 2 * T),
                             s_ref.row(b, buf.data() + 3 * T), w, m, T, c, dtok + b * T, r);
      const acc_t* e = s_ent.row(b, buf.data() + 4 * T);
      r.ent = e ? masked_sum(e, m, T) : 0.0;
    }
  });
}

rc::Cfg parse_rc(c10::string_view is_s, double is_hi, std::optional<double> is_lo, c10::string_view rs_s,
                 double rs_lo, double rs_hi, const char* op) {
  rc::Cfg c;
  const std::string is(is_s), rs(rs_s);
  if (is == "none") c.is = rc::kIsNone;
  else if (is == "token") c.is = rc::kIsToken;
  else if (is == "sequence") c.is = rc::kIsSeq;
  else if (is == "geometric") c.is = rc::kIsGeo;
  else TORCH_CHECK(false, op, ": rollout_is must be none, token, sequence or geometric; got '", is, "'");
  TORCH_CHECK(is_hi > 0, op, ": rollout_is upper threshold must be > 0, got ", is_hi);
  c.is_hi = is_hi;
  c.icepop = is_lo.has_value();
  c.is_lo = is_lo.value_or(1.0 / is_hi);
  TORCH_CHECK(c.is_lo > 0 && c.is_lo <= is_hi, op, ": rollout_is lower threshold must be in (0, upper], got ",
              c.is_lo);
  if (rs == "none") return c;
  const auto under = rs.rfind('_');
  const std::string lvl = under == std::string::npos ? "" : rs.substr(0, under), k = rs.substr(under + 1);
  TORCH_CHECK(k == "k1" || k == "k2" || k == "k3", op, ": unknown rollout_rs '", rs, "'");
  c.rs_k = k[1] - '0';
  if (lvl == "token") c.rs = rc::kRsToken;
  else if (lvl == "seq_sum") c.rs = rc::kRsSum;
  else if (lvl == "seq_mean") c.rs = rc::kRsMean;
  else if (lvl == "seq_max" && c.rs_k != 1) c.rs = rc::kRsMax;
  else TORCH_CHECK(false, op, ": unknown rollout_rs '", rs, "'");
  TORCH_CHECK(c.rs_k == 1 ? rs_lo <= rs_hi : rs_hi > 0, op, ": bad rollout_rs bounds [", rs_lo, ", ", rs_hi, "]");
  c.rs_lo = rs_lo, c.rs_hi = rs_hi;
  return c;
}

// The rollout_corr/* metrics (order: RC_STATS in rlhf_fast/ops/ppo_loss.py),
// from the row sums in row order. Token means over the caller's mask, row
// means over its non-empty rows; a mean over nothing is 0.
std::vector<double> rc_metrics(const rc::Cfg& c, const std::vector<rc::Row>& rows) {
  double N = 0, S = 0, sw = 0, nh = 0, nl = 0, nrej = 0, slr = 0, sk3 = 0, srho2 = 0;
  double mxw = -INFINITY, mnw = INFINITY, seq_rej = 0, chi2s = 0, tppl = 0, rppl = 0, tlp = 0, rlp = 0, d = 0,
         ad = 0, pr = 0, seq_hi = 0, seq_lo = 0, seq_mx = -INFINITY, seq_mn = INFINITY;
  const bool seq = c.is == rc::kIsSeq || c.is == rc::kIsGeo;
  for (const rc::Row& r : rows) {
    N += r.n0, sw += r.s_w, nh += r.n_high, nl += r.n_low, nrej += r.n_rej;
    slr += r.s_lr, sk3 += r.s_k3, srho2 += r.s_rho2;
    mxw = std::max(mxw, r.max_w), mnw = std::min(mnw, r.min_w);
    if (r.n0 == 0) continue;
    S += 1;
    seq_rej += r.n_rej > 0 ? 1.0 : 0.0;
    const double l = std::clamp(r.s_lr, -20.0, 20.0);
    chi2s += std::exp(2.0 * l);
    const double mo = r.s_old / r.n0, mr = r.s_roll / r.n0;
    tppl += std::exp(-mo), rppl += std::exp(-mr), tlp += -mo, rlp += -mr;
    d += mr - mo, ad += std::abs(mr - mo), pr += std::exp(mr - mo);
    // the row's raw weight, as the kernel made it (sequence: product, geometric: mean)
    const double raw = std::exp(std::clamp(c.is == rc::kIsGeo ? r.s_lr / r.n0 : r.s_lr, -20.0, 20.0));
    seq_hi += raw > c.is_hi ? 1.0 : 0.0, seq_lo += raw < c.is_lo ? 1.0 : 0.0;
    seq_mx = std::max(seq_mx, raw), seq_mn = std::min(seq_mn, raw);
  }
  const double iN = N > 0 ? 1.0 / N : 0.0, iS = S > 0 ? 1.0 / S : 0.0;
  const bool is = c.is != rc::kIsNone && N > 0, rs = c.rs != rc::kRsNone;
  return {
      is ? sw * iN : 0.0,
      is ? (seq ? seq_mx : mxw) : 0.0,
      is ? (seq ? seq_mn : mnw) : 0.0,
      is ? (seq ? seq_hi * iS : nh * iN) : 0.0,
      is ? (seq ? seq_lo * iS : nl * iN) : 0.0,
      rs ? nrej * iN : 0.0,
      rs ? seq_rej * iS : 0.0,
      -slr * iN,
      sk3 * iN,
      N > 0 ? srho2 * iN - 1.0 : 0.0,
      S > 0 ? chi2s * iS - 1.0 : 0.0,
      tppl * iS, rppl * iS, tlp * iS, rlp * iS, d * iS, ad * iS, pr * iS,
  };
}
constexpr int64_t kRcStats = 18;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& ref_logprobs, double entropy_coef, double kl_coef,
    c10::string_view kl_kind, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg_s, double agg_norm, const std::optional<at::Tensor>& rollout_logprobs,
    c10::string_view rc_is, double rc_is_upper, std::optional<double> rc_is_lower, c10::string_view rc_rs,
    double rc_rs_lower, double rc_rs_upper) {
  const char* op = "rlhf_fast::ppo_loss_fwd";
  check_float(logprobs, op, "logprobs");
  TORCH_CHECK(logprobs.dim() == 2, op, ": logprobs must be 2-D (B, T), got ", logprobs.sizes());
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
  TORCH_CHECK(agg_norm > 0, op, ": agg_norm must be > 0, got ", agg_norm);
  const int kl = ref.defined() ? parse_kl(std::string(kl_kind), op) : kNone;

  const int64_t B = lp.size(0), T = lp.size(1);
  const auto acc = acc_of(lp);
  const auto opts = lp.options().dtype(acc);
  at::Tensor dtok = at::empty({B, T}, opts);
  at::Tensor row_scale = at::empty({B}, opts);
  // the mask after rejection, for backward's entropy gradient; (0,) without rejection
  const std::vector<int64_t> keep_shape = rcc.rs != rc::kRsNone ? std::vector<int64_t>{B, T}
                                                                 : std::vector<int64_t>{0};
  at::Tensor keep = at::empty(keep_shape, lp.options().dtype(at::kBool));
  std::vector<PolicyRow> rows(B);
  std::vector<rc::Row> rc_rows(roll.defined() ? B : 0);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  uint8_t* kp = keep.numel() ? reinterpret_cast<uint8_t*>(keep.data_ptr()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_loss_fwd", [&] {
    PolicyCfg<scalar_t> c{scalar_t(1.0 - clip_low), scalar_t(1.0 + clip_high),
                          scalar_t(dual_clip.value_or(3.0)), scalar_t(kl_coef)};
    if (B * T > 0)
      policy_rows<scalar_t>(lp, old, adv, ent, ref, roll, m, kl, dual_clip.has_value(), c, rcc,
                            dtok.data_ptr<scalar_t>(), kp, rows, rc_rows);
  });

  // Fixed-order fp64 epilogue over the rows.
  double N = 0, S = 0;
  for (const auto& r : rows) N += r.n, S += r.n > 0 ? 1.0 : 0.0;
  double pg = 0, en = 0, kv = 0, clip = 0, lower = 0, akl = 0, rsum = 0, rmax = 0;
  std::vector<double> scale(B);
  for (int64_t b = 0; b < B; ++b) {
    const PolicyRow& r = rows[b];
    scale[b] = row_scale_of(agg, r.n, N, S, agg_norm);
    pg += scale[b] * r.pg, en += scale[b] * r.ent, kv += scale[b] * r.kl;
    clip += r.clip, lower += r.lower, akl += r.akl, rsum += r.rsum;
    rmax = std::max(rmax, r.rmax);
  }
  const double inv_n = N > 0 ? 1.0 / N : 0.0;
  const double loss = pg - entropy_coef * en + kl_coef * kv;
  std::vector<double> st = {pg, en, kv, clip * inv_n, lower * inv_n, akl * inv_n, rsum * inv_n, rmax};
  const std::vector<double> rcs = roll.defined() ? rc_metrics(rcc, rc_rows) : std::vector<double>(kRcStats, 0.0);
  st.insert(st.end(), rcs.begin(), rcs.end());
  at::Tensor stats = at::tensor(st, at::TensorOptions().dtype(at::kDouble)).to(acc);
  at::Tensor loss_t = at::scalar_tensor(loss, at::TensorOptions().dtype(at::kDouble)).to(acc);
  row_scale.copy_(at::from_blob(scale.data(), {B}, at::TensorOptions().dtype(at::kDouble)));
  return {loss_t, stats, dtok, row_scale, keep};
}

// grad_logprobs = g * row_scale[b] * dtok; grad_entropy = -coef * g * row_scale[b] * mask.
template <typename acc_t, typename T>
RLHF_FAST_CPU_CLONES void scale_row_k(const acc_t* src, acc_t s, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) from_acc(s * src[t], dst + t);
}

template <typename acc_t, typename T>
RLHF_FAST_CPU_CLONES void mask_row_k(const uint8_t* mk, acc_t s, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) from_acc(mk[t] != 0 ? s : acc_t(0), dst + t);
}

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

std::tuple<at::Tensor, at::Tensor> ppo_loss_bwd_cpu(const at::Tensor& grad_loss,
                                                    const at::Tensor& dtok, const at::Tensor& row_scale,
                                                    const at::Tensor& mask, double entropy_coef,
                                                    bool has_entropy, at::ScalarType logp_dtype,
                                                    at::ScalarType entropy_dtype) {
  const char* op = "rlhf_fast::ppo_loss_bwd";
  TORCH_CHECK(dtok.dim() == 2, op, ": dtok must be 2-D");
  const int64_t B = dtok.size(0), T = dtok.size(1);
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
  at::Tensor glp = at::empty({B, T}, dtok.options().dtype(out_dtype(logp_dtype)));
  at::Tensor gent = has_entropy ? at::empty({B, T}, dtok.options().dtype(out_dtype(entropy_dtype)))
                                : at::empty({0}, dtok.options().dtype(entropy_dtype));
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_loss_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t* dp = d.const_data_ptr<acc_t>();
    const acc_t* sp = rs.const_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1));
    dispatch_out<acc_t>(glp.scalar_type(), [&](auto* tag) {
      using O = std::remove_pointer_t<decltype(tag)>;
      O* out = reinterpret_cast<O*>(glp.data_ptr());
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) scale_row_k<acc_t, O>(dp + b * T, acc_t(g * sp[b]), out + b * T, T);
      });
    });
    if (has_entropy) {
      dispatch_out<acc_t>(gent.scalar_type(), [&](auto* tag) {
        using O = std::remove_pointer_t<decltype(tag)>;
        O* out = reinterpret_cast<O*>(gent.data_ptr());
        at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            mask_row_k<acc_t, O>(m + b * T, acc_t(-entropy_coef * g * sp[b]), out + b * T, T);
        });
      });
    }
  });
  if (glp.scalar_type() != logp_dtype) glp = glp.to(logp_dtype);
  if (has_entropy && gent.scalar_type() != entropy_dtype) gent = gent.to(entropy_dtype);
  return {glp, gent};
}

// ---------------- value loss ----------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& mask, std::optional<double> clip, c10::string_view agg_s, double agg_norm) {
  const char* op = "rlhf_fast::ppo_value_loss_fwd";
  check_float(values, op, "values");
  check_float(old_values, op, "old_values");
  check_float(returns, op, "returns");
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D (B, T), got ", values.sizes());
  const auto shape = values.sizes();
  const at::Tensor v = values.contiguous();
  const at::Tensor vo = prep(old_values, shape, op, "old_values");
  const at::Tensor ret = prep(returns, shape, op, "returns");
  const at::Tensor mk = prep_mask(mask, shape, op);
  TORCH_CHECK(!clip.has_value() || *clip > 0, op, ": clip must be > 0 or None");
  const Agg agg = parse_agg(std::string(agg_s), op);
  TORCH_CHECK(agg_norm > 0, op, ": agg_norm must be > 0, got ", agg_norm);
  const int64_t B = v.size(0), T = v.size(1);
  const auto acc = acc_of(v);
  at::Tensor dtok = at::empty({B, T}, v.options().dtype(acc));
  at::Tensor row_scale = at::empty({B}, v.options().dtype(acc));
  std::vector<ValueRow> rows(B);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_value_loss_fwd", [&] {
    using acc_t = scalar_t;
    const auto s_v = src_of<acc_t>(v), s_vo = src_of<acc_t>(vo), s_r = src_of<acc_t>(ret);
    const acc_t cr = acc_t(clip.value_or(0.0));
    acc_t* dp = dtok.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1));
    if (B * T > 0)
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> buf(3 * T);
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t* pv = s_v.row(b, buf.data());
          const acc_t* pvo = s_vo.row(b, buf.data() + T);
          const acc_t* pr = s_r.row(b, buf.data() + 2 * T);
          if (clip.has_value())
            value_row_k<acc_t, true>(pv, pvo, pr, m + b * T, T, cr, dp + b * T, rows[b]);
          else
            value_row_k<acc_t, false>(pv, pvo, pr, m + b * T, T, cr, dp + b * T, rows[b]);
        }
      });
  });
  double N = 0, S = 0;
  for (const auto& r : rows) N += r.n, S += r.n > 0 ? 1.0 : 0.0;
  // Chan et al.'s pairwise merge of (n, mean, M2), rows in order.
  double loss = 0, clipn = 0, n = 0, mr = 0, m2r = 0, me = 0, m2e = 0;
  std::vector<double> scale(B);
  for (int64_t b = 0; b < B; ++b) {
    const ValueRow& r = rows[b];
    scale[b] = row_scale_of(agg, r.n, N, S, agg_norm);
    loss += scale[b] * r.loss;
    clipn += r.clip;
    if (r.n > 0) {
      const double nn = n + r.n, dr = r.mean_r - mr, de = r.mean_e - me;
      m2r += r.m2_r + dr * dr * n * r.n / nn;
      m2e += r.m2_e + de * de * n * r.n / nn;
      mr += dr * r.n / nn, me += de * r.n / nn;
      n = nn;
    }
  }
  const double ev = N > 0 ? 1.0 - (m2e / N) / (m2r / N + 1e-8) : 0.0;
  at::Tensor stats = at::tensor({N > 0 ? clipn / N : 0.0, ev}, at::TensorOptions().dtype(at::kDouble)).to(acc);
  at::Tensor loss_t = at::scalar_tensor(loss, at::TensorOptions().dtype(at::kDouble)).to(acc);
  row_scale.copy_(at::from_blob(scale.data(), {B}, at::TensorOptions().dtype(at::kDouble)));
  return {loss_t, stats, dtok, row_scale};
}

// ---------------- KL estimators ----------------

template <typename acc_t, typename F>
void dispatch_kl(int kind, F&& f) {
  switch (kind) {
    case kK1: return f(std::integral_constant<int, kK1>{});
    case kK2: return f(std::integral_constant<int, kK2>{});
    case kK3: return f(std::integral_constant<int, kK3>{});
    default: return f(std::integral_constant<int, kAbs>{});
  }
}

at::Tensor kl_penalty_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                              c10::string_view kind_s) {
  const char* op = "rlhf_fast::kl_penalty_fwd";
  check_float(logprobs, op, "logprobs");
  check_float(ref_logprobs, op, "ref_logprobs");
  const int kind = parse_kl(std::string(kind_s), op);
  const auto acc = acc_of(logprobs);
  const at::Tensor lp = logprobs.to(acc).contiguous();
  const at::Tensor ref = prep(ref_logprobs, logprobs.sizes(), op, "ref_logprobs").to(acc).contiguous();
  at::Tensor out = at::empty(logprobs.sizes(), lp.options());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(acc, "kl_penalty_fwd", [&] {
    const scalar_t *a = lp.const_data_ptr<scalar_t>(), *r = ref.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_kl<scalar_t>(kind, [&](auto K) {
      at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
        kl_fwd_k<scalar_t, decltype(K)::value>(a + i0, r + i0, o + i0, i1 - i0);
      });
    });
  });
  return out;
}

at::Tensor kl_penalty_bwd_cpu(const at::Tensor& grad, const at::Tensor& logprobs,
                              const at::Tensor& ref_logprobs, c10::string_view kind_s) {
  const char* op = "rlhf_fast::kl_penalty_bwd";
  const int kind = parse_kl(std::string(kind_s), op);
  const auto acc = acc_of(logprobs);
  const at::Tensor lp = logprobs.to(acc).contiguous();
  const at::Tensor ref = prep(ref_logprobs, logprobs.sizes(), op, "ref_logprobs").to(acc).contiguous();
  const at::Tensor g = prep(grad, logprobs.sizes(), op, "grad").to(acc).contiguous();
  at::Tensor out = at::empty(logprobs.sizes(), lp.options());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(acc, "kl_penalty_bwd", [&] {
    const scalar_t *a = lp.const_data_ptr<scalar_t>(), *r = ref.const_data_ptr<scalar_t>(),
                   *gp = g.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_kl<scalar_t>(kind, [&](auto K) {
      at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
        kl_bwd_k<scalar_t, decltype(K)::value>(gp + i0, a + i0, r + i0, o + i0, i1 - i0);
      });
    });
  });
  return out.to(logprobs.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("ppo_loss_fwd", &rlhf_fast::cpu::ppo_loss_fwd_cpu);
  m.impl("ppo_loss_bwd", &rlhf_fast::cpu::ppo_loss_bwd_cpu);
  m.impl("ppo_value_loss_fwd", &rlhf_fast::cpu::ppo_value_loss_fwd_cpu);
  m.impl("kl_penalty_fwd", &rlhf_fast::cpu::kl_penalty_fwd_cpu);
  m.impl("kl_penalty_bwd", &rlhf_fast::cpu::kl_penalty_bwd_cpu);
}
