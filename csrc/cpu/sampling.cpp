// CPU sampler: rows in parallel, each row in a few vectorised sweeps over an
// L2-resident copy (V=32000: z and exp(z - max) are 250 KiB per thread).
//   1. max and NaN check;  2. d = (x - max x) / T, e = exp(d), s = sum e
//      -> log-sum-exp (every threshold and key below is on d <= 0, so the
//      row's offset costs no precision: see logprobs_row.h)
//   3. only if the row truncates: thresholds by bisection on the fp32 order
//      key (32 count / mass sweeps each for top-k and top-p; no sort)
//   4. exponential race over the kept tokens: argmax d + Gumbel(seed, token)
// Semantics and noise are those of rlhf_fast/reference/_sampling.py.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "parallel.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"
#include "rlhf_fast/logprobs_row.h"
#include "rlhf_fast/sampling.h"

namespace rlhf_fast {
namespace cpu {
namespace {

using sampling::float_key;
using sampling::key_float;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 256;  // noise keys computed a chunk at a time

struct RowParams {
  float inv_t;
  bool greedy;
  uint32_t seed_lo, seed_hi;
  int64_t top_k;
  float top_p, min_p;
  bool filtered;
};

struct RowResult {
  int64_t token;
  float logprob, processed;
  bool nan;
};

// ---- sweeps over the fp32 row buffers z[0..V), e[0..V), for isa_call ----
// Counts are exact in any order and the other sweeps are elementwise; the
// mass is summed in kLanes = 16 fixed partial sums (as the log-prob kernel
// does), so every ISA copy samples the same token with the same bits.

struct CountGe {
  template <int W>
  static RLHF_FAST_INLINE int64_t run(const float* z, int64_t V, float thr) {
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < V; ++j) c += z[j] >= thr ? 1 : 0;
    return c;
  }
};

struct MassGe {
  template <int W>
  static RLHF_FAST_INLINE float run(const float* z, const float* e, int64_t V, float thr) {
    using vf = typename Vec<W>::f;
    constexpr int K = kLanes / W;
    const int64_t Vb = V / kLanes * kLanes;
    const vf th = splat<W>(thr);
    vf vs[K] = {};
    for (int64_t j = 0; j < Vb; j += kLanes)
      for (int k = 0; k < K; ++k)
        vs[k] += load<W>(z + j + k * W) >= th ? load<W>(e + j + k * W) : splat<W>(0.f);
    for (int64_t j = Vb; j < V; ++j) {  // tail: lane j - Vb, as a full block would
      const int l = static_cast<int>(j - Vb);
      vs[l / W][l % W] += z[j] >= thr ? e[j] : 0.0f;
    }
    return sum_lanes<W>(vs);
  }
};

// d = (x - mx) * inv_t and e = exp(d) into the row buffers (only for rows
// that truncate).
template <typename T>
struct FillRow {
  template <int W>
  static RLHF_FAST_INLINE void run(const T* x, int64_t V, float inv_t, float mx, float* z, float* e) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float dj = (to_acc(x[j]) - mx) * inv_t;
      z[j] = dj;
      e[j] = exp_nonpos(dj);
    }
  }
};

int64_t count_ge(const float* z, int64_t V, float thr) { return isa_call<CountGe>(z, V, thr); }
float mass_ge(const float* z, const float* e, int64_t V, float thr) { return isa_call<MassGe>(z, e, V, thr); }

// The log-prob kernel's own row statistics (logprobs_row.h): the sampled
// token's log-prob is then bit-identical to logprobs_from_logits'.
// keys = kept ? d + gumbel : -inf for one chunk; vectorises (no libm calls).
template <typename T>
struct RaceChunk {
  template <int W>
  static RLHF_FAST_INLINE void run(const T* x, int64_t j0, int64_t n, float inv_t, float mx, float thr,
                                   uint32_t lo, uint32_t hi, float* keys) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float dj = (to_acc(x[j0 + i]) - mx) * inv_t;
      const float g = sampling::gumbel(lo, hi, static_cast<uint32_t>(j0 + i));
      keys[i] = dj >= thr ? dj + g : kNegInf;
    }
  }
};

// Largest key t in [lo, hi] with pred(key_float(t)) true; pred(lo) is true
// and pred is monotone (true then false), so 32 halvings at most.
template <typename Pred>
float bisect(int32_t lo, int32_t hi, Pred pred) {
  int64_t a = lo, b = hi;
  while (a < b) {
    const int64_t mid = a + (b - a + 1) / 2;
    if (pred(key_float(static_cast<int32_t>(mid)))) a = mid; else b = mid - 1;
  }
  return key_float(static_cast<int32_t>(a));
}

struct Filters {
  int64_t top_k;
  float top_p, min_p;
};

// The kept set {d >= thr} of one row and the log of its mass sum(exp(d)),
// d = (x - mx) * inv_t <= 0. z / e are left in zbuf / ebuf (V floats each)
// for the caller's further sweeps. Shared by the sampler and the scorer
// (processed_logprobs_fwd), so a token's processed log-prob is the same bits
// whether it was drawn here or handed in.
struct KeptSet {
  float thr, mass, log_mass;
};

template <typename T>
KeptSet kept_set(const T* x, int64_t V, float inv_t, float mx, const Filters& f,
                 std::vector<float>& zbuf, std::vector<float>& ebuf) {
  zbuf.resize(V);
  ebuf.resize(V);
  float* z = zbuf.data();
  float* e = ebuf.data();
  isa_call<FillRow<T>>(x, V, inv_t, mx, z, e);
  const int32_t top = float_key(0.0f);  // max d
  float tau_k = kNegInf, mass_k = mass_ge(z, e, V, kNegInf);
  if (f.top_k > 0 && f.top_k < V) {
    tau_k = bisect(float_key(kNegInf), top, [&](float t) { return count_ge(z, V, t) >= f.top_k; });
    mass_k = mass_ge(z, e, V, tau_k);
  }
  float tau_p = kNegInf;
  if (f.top_p < 1.0f) {
    const float target = f.top_p * mass_k;
    tau_p = bisect(float_key(tau_k), top, [&](float t) { return mass_ge(z, e, V, t) >= target; });
  }
  float tau_min = kNegInf;
  if (f.min_p > 0.0f) tau_min = std::log(f.min_p);
  KeptSet ks;
  ks.thr = std::min(std::max(std::max(tau_k, tau_p), tau_min), 0.0f);  // the max token is always kept
  ks.mass = mass_ge(z, e, V, ks.thr);
  ks.log_mass = std::log(ks.mass);
  return ks;
}

template <typename T>
RowResult sample_row(const T* x, int64_t V, const RowParams& p,
                     std::vector<float>& zbuf, std::vector<float>& ebuf) {
  RowResult r{0, 0.0f, 0.0f, false};
  const float inv_t = p.greedy ? 1.0f : p.inv_t;
  // the log-prob kernel's own row statistics (logprobs_row.h): the sampled
  // token's log-prob is then bit-identical to logprobs_from_logits'
  const RowStats<float> st = logprobs_row_stats(x, V, inv_t);
  if (std::isnan(st.lse)) {
    r.nan = true;
    return r;
  }
  const float mx = st.max_x;
  auto d_at = [&](int64_t j) { return (to_acc(x[j]) - mx) * inv_t; };  // <= 0, 0 at the max
  auto first_max = [&]() {  // first argmax, as torch.argmax
    int64_t j = 0;
    while (j < V - 1 && !(to_acc(x[j]) == mx)) ++j;
    return j;
  };
  if (p.greedy) {
    r.token = first_max();
    r.logprob = d_at(r.token) - st.log_s;
    r.processed = 0.0f;
    return r;
  }
  float thr = kNegInf;
  float log_kept = st.log_s;  // log of the kept mass, relative to exp(max z)
  if (p.filtered) {
    const KeptSet ks = kept_set(x, V, inv_t, mx, {p.top_k, p.top_p, p.min_p}, zbuf, ebuf);
    thr = ks.thr;
    log_kept = ks.log_mass;
  }
  float keys[kChunk];
  float best = kNegInf;
  int64_t best_j = -1;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int64_t n = std::min(kChunk, V - j0);
    isa_call<RaceChunk<T>>(x, j0, n, inv_t, mx, thr, p.seed_lo, p.seed_hi, keys);
    for (int64_t i = 0; i < n; ++i) {
      if (keys[i] > best) { best = keys[i]; best_j = j0 + i; }
    }
  }
  if (best_j < 0) best_j = first_max();  // only -inf logits: no key is finite
  r.token = best_j;
  r.logprob = d_at(best_j) - st.log_s;
  r.processed = d_at(best_j) - log_kept;
  return r;
}

// Why a row's log-sum-exp is NaN, for the error message: one more scalar
// pass over that row, on the error path only.
template <typename T>
std::string bad_row_reason(const T* x, int64_t V, float inv_t) {
  bool nan = false, pos_inf = false, overflow = false, all_neg_inf = true;
  for (int64_t j = 0; j < V; ++j) {
    const float v = to_acc(x[j]);
    if (std::isnan(v)) {
      nan = true;
    } else if (v == -kNegInf) {
      pos_inf = true;
    } else if (v != kNegInf) {
      all_neg_inf = false;
      if (!std::isfinite(v * inv_t)) overflow = true;
    }
  }
  if (nan) return "contains NaN";
  if (pos_inf)
    return "contains +inf, which leaves the distribution undefined (mask tokens with -inf, never +inf)";
  if (all_neg_inf) return "has no valid token: every logit is -inf";
  if (overflow)
    return "overflows float32 once divided by the temperature (logits / temperature is +-inf); "
           "raise the temperature or use 0 for greedy";
  return "has a NaN log-sum-exp";
}

// ---- glue ----

at::Tensor row_param(const at::Tensor& t, int64_t B, at::ScalarType dt,
                     const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rlhf_fast::sample: ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "rlhf_fast::sample: ", name,
              " must have shape (", B, "), got ", t.sizes());
  return t.to(dt).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& seeds,
    const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, bool filtered) {
  const char* op = "rlhf_fast::sample";
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected CPU tensors, got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (B, V), got ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || B == 0, op, ": logits have an empty vocabulary dim");
  TORCH_CHECK(V < (int64_t(1) << 31), op, ": V must be < 2^31, got ", V);
  const at::Tensor lg = V > 1 && logits.stride(1) != 1 ? logits.contiguous() : logits;
  const at::Tensor sd = row_param(seeds, B, at::kLong, "seeds");
  const at::Tensor tt = row_param(temperature, B, at::kDouble, "temperature");
  const at::Tensor tk = row_param(top_k, B, at::kLong, "top_k");
  const at::Tensor tp = row_param(top_p, B, at::kDouble, "top_p");
  const at::Tensor mp = row_param(min_p, B, at::kDouble, "min_p");
  const auto fopt = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor lp = at::empty({B}, fopt), plp = at::empty({B}, fopt);
  if (B == 0) return {tokens, lp, plp};
  const int64_t stride = lg.stride(0);
  const int64_t* sdp = sd.const_data_ptr<int64_t>();
  const double* ttp = tt.const_data_ptr<double>();
  const int64_t* tkp = tk.const_data_ptr<int64_t>();
  const double* tpp = tp.const_data_ptr<double>();
  const double* mpp = mp.const_data_ptr<double>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lpp = lp.data_ptr<float>();
  float* plpp = plp.data_ptr<float>();
  std::atomic<int64_t> nan_row{-1};
  std::string bad_reason;
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = reinterpret_cast<const T*>(lg.const_data_ptr());
    at::parallel_for(0, B, rows_per_task(V), [&](int64_t begin, int64_t end) {
      std::vector<float> zbuf, ebuf;
      for (int64_t r = begin; r < end; ++r) {
        const double t = ttp[r];
        TORCH_CHECK(std::isfinite(t) && t >= 0.0, op,
                    ": temperature must be finite and >= 0, got ", t,
                    " at row ", r);
        RowParams p;
        p.greedy = t == 0.0;
        p.inv_t = p.greedy ? 1.0f : static_cast<float>(1.0 / t);
        TORCH_CHECK_VALUE(std::isfinite(p.inv_t), op, ": temperature ", t, " at row ", r,
                          " is too small: 1 / temperature overflows float32; use 0 for greedy or a "
                          "value >= ", 2.0 / std::numeric_limits<float>::max());
        const uint64_t seed = static_cast<uint64_t>(sdp[r]);
        p.seed_lo = static_cast<uint32_t>(seed);
        p.seed_hi = static_cast<uint32_t>(seed >> 32);
        p.top_k = tkp[r];
        p.top_p = static_cast<float>(tpp[r]);
        p.min_p = static_cast<float>(mpp[r]);
        p.filtered = filtered;
        const RowResult res = sample_row(base + r * stride, V, p, zbuf, ebuf);
        if (res.nan) {
          int64_t expected = -1;
          nan_row.compare_exchange_strong(expected, r);
        }
        tok[r] = res.token;
        lpp[r] = res.logprob;
        plpp[r] = res.processed;
      }
    });
    const int64_t bad = nan_row.load();
    if (bad >= 0) {
      const bool greedy = ttp[bad] == 0.0;
      const float inv_t = greedy ? 1.0f : static_cast<float>(1.0 / ttp[bad]);
      bad_reason = bad_row_reason(base + bad * stride, V, inv_t);
    }
  };
  switch (dt) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: run(static_cast<bf16_bits*>(nullptr)); break;
    default: run(static_cast<fp16_bits*>(nullptr)); break;
  }
  // a row with no valid token never yields a token: say which row and why
  TORCH_CHECK_VALUE(nan_row.load() < 0, "rlhf_fast.sample: row ", nan_row.load(), " of logits ",
                    bad_reason);
  return {tokens, lp, plp};
}

// ---- scoring given tokens under the sampler's truncation ----
// processed_logprobs_fwd: the log-prob of each given label under the
// distribution sample() draws from (temperature, top-k, top-p, min-p,
// renormalised), from the same row statistics and kept_set, so sample's
// processed log-prob of its own token and this op's agree bit for bit.
// A label outside the kept set gets -inf. stats (N, 3) fp32 = (max x, thr,
// log kept mass) for the backward, which treats the kept set as fixed.

struct ScoreParams {
  float inv_t;
  Filters f;
  bool filtered, entropy;
};

struct ScoreResult {
  float logprob, entropy, mx, thr, log_mass;
};

// The row max, and whether the row has a distribution: no NaN, no +inf, a
// finite logit, max / T finite (the cases where logprobs_row_stats gives a
// NaN lse). One compare-only sweep: the truncated path needs no log-sum-exp
// of the whole row, only its max (the max is exact, so the kept set and the
// log-probs are the sampler's bits all the same).
template <typename T>
bool row_max(const T* x, int64_t V, float inv_t, float& mx) {
  float m = kNegInf;
  int64_t nan = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan)
  for (int64_t j = 0; j < V; ++j) {
    const float v = to_acc(x[j]);
    m = v > m ? v : m;
    nan += v != v ? 1 : 0;
  }
  mx = m;
  return nan == 0 && m != -kNegInf && m != kNegInf && std::isfinite(m * inv_t);
}

template <typename T>
ScoreResult score_row(const T* x, int64_t V, int64_t label, const ScoreParams& p,
                      std::vector<float>& zbuf, std::vector<float>& ebuf) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!p.filtered) {  // the log-prob kernel's own statistics: its bits for its log-prob
    const RowStats<float> st = logprobs_row_stats(x, V, p.inv_t);
    if (std::isnan(st.lse)) return {nan, nan, nan, nan, nan};  // that row alone, as logprobs_from_logits
    const float d_y = (to_acc(x[label]) - st.max_x) * p.inv_t;
    return {d_y - st.log_s, p.entropy ? st.entropy : 0.0f, st.max_x, kNegInf, st.log_s};
  }
  float mx;
  if (!row_max(x, V, p.inv_t, mx)) return {nan, nan, nan, nan, nan};
  const float d_y = (to_acc(x[label]) - mx) * p.inv_t;
  const KeptSet ks = kept_set(x, V, p.inv_t, mx, p.f, zbuf, ebuf);
  ScoreResult r{d_y >= ks.thr ? d_y - ks.log_mass : kNegInf, 0.0f, mx, ks.thr, ks.log_mass};
  if (p.entropy) {
    // H = log M - sum_kept(e d) / M over the kept tokens (e = exp(d), M their mass)
    const float* z = zbuf.data();
    const float* e = ebuf.data();
    float ed = 0.0f;
#pragma omp simd reduction(+ : ed)
    for (int64_t j = 0; j < V; ++j) ed += (z[j] >= ks.thr && e[j] > 0.0f) ? e[j] * z[j] : 0.0f;
    r.entropy = ks.log_mass - ed / ks.mass;
  }
  return r;
}

at::Tensor score_param(const at::Tensor& t, int64_t N, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rlhf_fast::processed_logprobs: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "rlhf_fast::processed_logprobs: ", name, " must have shape (",
              N, "), got ", t.sizes());
  return t.to(dt).contiguous();
}

void check_score_logits(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must have shape (",
              logits.size(0), "), got ", labels.sizes());
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), op, ": V must be < 2^31, got ", logits.size(1));
}

template <typename F>
void dispatch_logits(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<bf16_bits*>(nullptr)); break;
    default: f(static_cast<fp16_bits*>(nullptr)); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> processed_logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, int64_t ignore_index,
    bool filtered, bool compute_entropy) {
  const char* op = "rlhf_fast::processed_logprobs_fwd";
  check_score_logits(logits, labels, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || N == 0, op, ": logits have an empty vocabulary dim");
  const at::Tensor lg = V > 1 && logits.stride(1) != 1 ? logits.contiguous() : logits;
  const at::Tensor lb = labels.to(at::kLong).contiguous();
  const at::Tensor tt = score_param(temperature, N, at::kDouble, "temperature");
  const at::Tensor tk = score_param(top_k, N, at::kLong, "top_k");
  const at::Tensor tp = score_param(top_p, N, at::kDouble, "top_p");
  const at::Tensor mp = score_param(min_p, N, at::kDouble, "min_p");
  const auto fopt = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({N}, fopt), ent = at::empty({N}, fopt), stats = at::empty({N, 3}, fopt);
  if (N == 0) return {lp, ent, stats};
  const int64_t stride = lg.stride(0);
  const int64_t* lbp = lb.const_data_ptr<int64_t>();
  const double* ttp = tt.const_data_ptr<double>();
  const int64_t* tkp = tk.const_data_ptr<int64_t>();
  const double* tpp = tp.const_data_ptr<double>();
  const double* mpp = mp.const_data_ptr<double>();
  float* lpp = lp.data_ptr<float>();
  float* entp = ent.data_ptr<float>();
  float* stp = stats.data_ptr<float>();
  dispatch_logits(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = reinterpret_cast<const T*>(lg.const_data_ptr());
    at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
      std::vector<float> zbuf, ebuf;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = lbp[r];
        if (y == ignore_index) {  // never read: 0 and no gradient, as logprobs_from_logits
          lpp[r] = entp[r] = 0.0f;
          stp[3 * r] = stp[3 * r + 1] = stp[3 * r + 2] = 0.0f;
          continue;
        }
        TORCH_CHECK_INDEX(y >= 0 && y < V, op, ": label ", y, " at row ", r, " is outside [0, ", V, ")");
        const double t = ttp[r];
        TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0, op, ": temperature must be finite and > 0, got ", t,
                          " at row ", r);
        ScoreParams p;
        p.inv_t = static_cast<float>(1.0 / t);
        TORCH_CHECK_VALUE(std::isfinite(p.inv_t), op, ": temperature ", t, " at row ", r,
                          " is too small: 1 / temperature overflows float32");
        p.f = {tkp[r], static_cast<float>(tpp[r]), static_cast<float>(mpp[r])};
        p.filtered = filtered;
        p.entropy = compute_entropy;
        const ScoreResult res = score_row(base + r * stride, V, y, p, zbuf, ebuf);
        lpp[r] = res.logprob;
        entp[r] = res.entropy;
        stp[3 * r] = res.mx;
        stp[3 * r + 1] = res.thr;
        stp[3 * r + 2] = res.log_mass;
      }
    });
  });
  return {lp, ent, stats};
}

// d/dx_j with the kept set fixed, p_j = exp(d_j - log M) on kept tokens:
//   log-prob  inv_t * (1[j = y] - p_j)        (0 for the row if y is not kept)
//   entropy  -inv_t * p_j * (d_j - log M + H)
// Both are 0 outside the kept set and on ignored rows.
at::Tensor processed_logprobs_bwd_cpu(const c10::optional<at::Tensor>& grad_logprobs,
                                      const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                      const at::Tensor& labels, const at::Tensor& temperature,
                                      const at::Tensor& stats, const at::Tensor& entropy, int64_t ignore_index) {
  const char* op = "rlhf_fast::processed_logprobs_bwd";
  check_score_logits(logits, labels, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = at::empty({N, V}, logits.options());
  if (N == 0 || V == 0) return grad;
  const at::Tensor lg = V > 1 && logits.stride(1) != 1 ? logits.contiguous() : logits;
  const at::Tensor lb = labels.to(at::kLong).contiguous();
  const at::Tensor tt = score_param(temperature, N, at::kDouble, "temperature");
  const at::Tensor st = stats.to(at::kFloat).contiguous();
  const at::Tensor en = entropy.to(at::kFloat).contiguous();
  const at::Tensor zero = at::zeros({N}, logits.options().dtype(at::kFloat));
  const at::Tensor glp = grad_logprobs ? grad_logprobs->to(at::kFloat).contiguous() : zero;
  const at::Tensor gen = grad_entropy ? grad_entropy->to(at::kFloat).contiguous() : zero;
  const int64_t stride = lg.stride(0);
  const int64_t* lbp = lb.const_data_ptr<int64_t>();
  const double* ttp = tt.const_data_ptr<double>();
  const float* stp = st.const_data_ptr<float>();
  const float* enp = en.const_data_ptr<float>();
  const float* glpp = glp.const_data_ptr<float>();
  const float* genp = gen.const_data_ptr<float>();
  dispatch_logits(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = reinterpret_cast<const T*>(lg.const_data_ptr());
    T* gbase = reinterpret_cast<T*>(grad.data_ptr());
    at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
      std::vector<float> row(V);
      for (int64_t r = begin; r < end; ++r) {
        const T* x = base + r * stride;
        T* g = gbase + r * V;
        const int64_t y = lbp[r];
        const float inv_t = static_cast<float>(1.0 / ttp[r]);
        const float mx = stp[3 * r], thr = stp[3 * r + 1], log_m = stp[3 * r + 2], h = enp[r];
        float g_lp = glpp[r], g_h = genp[r];
        if (y == ignore_index) g_lp = g_h = 0.0f;
        const bool y_kept = y != ignore_index && (to_acc(x[y]) - mx) * inv_t >= thr;
        if (!y_kept) g_lp = 0.0f;
        float* out = row.data();
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const float d = (to_acc(x[j]) - mx) * inv_t;
          const bool kept = d >= thr;
          const float pj = kept ? exp_nonpos(d - log_m) : 0.0f;
          const float dh = pj > 0.0f ? -pj * (d - log_m + h) : 0.0f;
          out[j] = inv_t * (g_h * dh - g_lp * pj);
        }
        if (y_kept) out[y] += inv_t * g_lp;
        for (int64_t j = 0; j < V; ++j) from_acc(out[j], g + j);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("sample_fwd", &rlhf_fast::cpu::sample_fwd_cpu);
  m.impl("processed_logprobs_fwd", &rlhf_fast::cpu::processed_logprobs_fwd_cpu);
  m.impl("processed_logprobs_bwd", &rlhf_fast::cpu::processed_logprobs_bwd_cpu);
}
