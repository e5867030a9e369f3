// CPU GAE and discounted returns (rlhf_fast::gae, ::discounted_returns). Both are one reverse sweep
// per row: on a CPU the sequential loop is already O(T) and needs no scan, so
// the work is to keep the carry's dependency chain and the memory system busy.
//
// With fp32 accumulation on AVX2 or AVX-512 CPUs, rows go W = 8 to a vector
// (one lane per row, one ymm): a W-step tile of each row is loaded, converted
// and blended on whole vectors, the W x W tile is transposed in registers so
// the recurrence runs W rows per multiply-add chain, and the outputs go back
// the same way. At (512, 4096) on one EPYC core: ~3 ms with 16-lane AVX-512
// tiles, against 14 ms for the first version, which walked 4 rows side by
// side with scalar code (staging 256 steps per row through scratch first was
// slower: ~5 ms); on a Xeon core the 8-lane tiles beat the 16-lane ones for
// GAE, 3.6 ms against 4.9 ms, so only they are compiled for it (discounted
// returns keep 16 lanes on AVX-512, GaeTiles below). On baseline x86-64, for
// fp64, and for the B % W rows left over, that scalar loop remains (one copy:
// it is scalar code on every ISA). Rows are split across threads with at::parallel_for.
// Every copy (scalar loop or tiles, any ISA) does the same arithmetic in the
// same order: the outputs are the same bits on every ISA.

#include <algorithm>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../acc_dtype.h"
#include "aten_lite.h"
#include "kernels.h"
#include "advantages_glue.h"
#include "parallel.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows walked together (independent carry chains)

// ---------------- GAE / discounted-return row kernels ----------------
// HAS_V = false: discounted returns (values 0, lam 1, no returns output).
// Masked positions: both carries pass through unchanged; outputs 0.

// One step of the masked recurrence, for one row (X a scalar) or a vector of
// rows: the scalar loop and the row tiles share it, so they agree bit for
// bit. Arithmetic with w in {0, 1} keeps the carry chain free of selects;
// inputs arrive already zeroed where masked, so garbage (NaN) never enters.
// a = valid ? gamma * lam : 1 (a select for a scalar, w * gl + (1 - w) for
// a vector: equal exactly; the select keeps the scalar loop 25% faster).
template <bool HAS_V, typename X>
RLHF_FAST_INLINE void gae_step(X w, X a, X rt, X vt, X g, X& nv, X& carry,
                               X& adv_out, X& ret_out) {
  const X one = X{} + 1;
  const X delta = rt + g * nv - vt;
  carry = a * carry + w * delta;  // masked: carry * 1 + 0, exact
  if (HAS_V) nv = w * vt + (one - w) * nv;  // exact either way
  adv_out = w * carry;
  if (HAS_V) ret_out = w * (carry + vt);
}

// Row j is n[j] steps long and is walked from its own end: step k is
// position n[j] - 1 - k. Padded rows all have n = T; packed segments have
// their own lengths, and a row that has ended is left alone (a branch that
// is always taken on padded rows: one loop body, no second copy to compile).
template <bool HAS_V, typename T, typename M, typename acc_t>
RLHF_FAST_INLINE void gae_rows(const T* const* r, const T* const* v,
                               const M* const* m, M keep, const int64_t* n,
                               const acc_t* g, const acc_t* gl,
                               acc_t* const* adv, acc_t* const* ret) {
  acc_t nv[kRows] = {}, carry[kRows] = {};
  int64_t hi = n[0];
  for (int j = 1; j < kRows; ++j) hi = std::max(hi, n[j]);
  auto step = [&](int j, int64_t t) {
    const bool valid = (m[j][t] & mask_keep(keep)) != 0;
    const acc_t w = valid ? acc_t(1) : acc_t(0);
    const acc_t rt = blend(valid, to_acc(r[j][t]), acc_t(0));
    const acc_t vt = HAS_V ? blend(valid, to_acc(v[j][t]), acc_t(0)) : acc_t(0);
    acc_t a_out, r_out;
    gae_step<HAS_V>(w, valid ? gl[j] : acc_t(1), rt, vt, g[j], nv[j], carry[j], a_out, r_out);
    adv[j][t] = a_out;
    if (HAS_V) ret[j][t] = r_out;
  };
  for (int64_t k = 0; k < hi; ++k) {
#pragma GCC unroll 4
    for (int j = 0; j < kRows; ++j)
      if (k < n[j]) step(j, n[j] - 1 - k);
  }
}

// ---------------- W rows per vector, W-step tiles ----------------
// W = 8 (one ymm of fp32; 16, one zmm, for discounted returns on AVX-512).
// A tile is W rows x W steps: each row's W steps are one vector load, and a
// W x W transpose in registers turns rows into steps.
// 80 streams (16 rows x 5 arrays) walked backwards are more than the
// hardware prefetchers follow: 3.9 -> 2.8 ns per element at (512, 4096) with
// the outputs preallocated, prefetching 64 steps ahead (16 to 128 measured the same).
constexpr int kPrefetch = 64;

// One butterfly stage of a W x W transpose in registers: rows i and i + b
// trade their lanes whose bit b differs (b = W/2, ..., 1: log2(W) stages of
// W two-source shuffles; 64 vpermt2ps for 16 x 16).
template <int W, int b>
RLHF_FAST_INLINE void transpose_stage(typename Vec<W>::f* x) {
  using V = typename Vec<W>::f;
  typename Vec<W>::i lo, hi;
  for (int c = 0; c < W; ++c) {
    lo[c] = (c & b) ? W + c - b : c;
    hi[c] = (c & b) ? W + c : c + b;
  }
  for (int i = 0; i < W; ++i) {
    if (i & b) continue;
    const V a = __builtin_shuffle(x[i], x[i + b], lo);
    const V d = __builtin_shuffle(x[i], x[i + b], hi);
    x[i] = a;
    x[i + b] = d;
  }
}

template <int W>
RLHF_FAST_INLINE void transpose(typename Vec<W>::f* x) {
  if constexpr (W >= 16) transpose_stage<W, 8>(x);
  if constexpr (W >= 8) transpose_stage<W, 4>(x);
  transpose_stage<W, 2>(x);
  transpose_stage<W, 1>(x);
}

// A full tile's inputs on whole vectors (cpu_math.h's Vec<W> and load<W>):
// the mask compared in its own dtype, inputs at masked steps zeroed by AND
// (NaN-safe).
// Written as a per-element loop GCC left it scalar (a cmpb per element):
// 2.6 -> 1.3 ns per element with the tile in cache.
template <int W, typename M>
RLHF_FAST_INLINE typename Vec<W>::i load_valid(const M* p, M keep) {
  typedef M MV __attribute__((vector_size(W * sizeof(M))));
  MV x;
  std::memcpy(&x, p, sizeof(x));
  return __builtin_convertvector((x & mask_keep(keep)) != 0, typename Vec<W>::i);  // -1 where valid
}
template <int W>
RLHF_FAST_INLINE typename Vec<W>::f and_bits(typename Vec<W>::f x, typename Vec<W>::i keep) {
  typename Vec<W>::i b;
  std::memcpy(&b, &x, sizeof(b));
  b &= keep;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

template <int W, bool HAS_V, typename T, typename M>
RLHF_FAST_INLINE void gae_lanes(const T* const* r, const T* const* v,
                                const M* const* m, M keep, const int64_t* n,
                                const float* g_rows, const float* gl_rows,
                                float* const* adv, float* const* ret) {
  using V = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  int64_t n_max = 0;
  for (int j = 0; j < W; ++j) n_max = std::max(n_max, n[j]);
  // xr[j] = row j's tile (W steps); after transpose, xr[k] = step k's W rows
  V xr[W], xv[W], xw[W];
  V g, gl, nv = {}, carry = {};
  for (int j = 0; j < W; ++j) { g[j] = g_rows[j]; gl[j] = gl_rows[j]; }
  // Tiles are aligned to each row's own end: row j's tile `done` covers
  // positions [t0, t0 + len) with t0 = max(n[j] - done - W, 0). A short tile
  // (the row's first steps, or none once the row has ended: len 0) is padded
  // with masked steps, which change nothing, so rows of other lengths share
  // the vector exactly.
  int64_t t0s[W];
  int lens[W];
  for (int64_t done = 0; done < n_max; done += W) {
    for (int j = 0; j < W; ++j) {
      const int64_t t1 = n[j] - done;
      const int64_t t0 = std::max<int64_t>(t1 - W, 0);
      const int len = t1 > 0 ? static_cast<int>(t1 - t0) : 0;
      t0s[j] = t0;
      lens[j] = len;
      const T* rj = r[j] + t0; const T* vj = v[j] + t0; const M* mj = m[j] + t0;
      if (t0 >= kPrefetch) {
        __builtin_prefetch(rj - kPrefetch); if (HAS_V) __builtin_prefetch(vj - kPrefetch); __builtin_prefetch(mj - kPrefetch);
        __builtin_prefetch(adv[j] + t0 - kPrefetch, 1); if (HAS_V) __builtin_prefetch(ret[j] + t0 - kPrefetch, 1);
      }
      if (len == W) {
        const I valid = load_valid<W>(mj, keep);
        xw[j] = __builtin_convertvector(-valid, V);
        xr[j] = and_bits<W>(load<W>(rj), valid);
        if (HAS_V) xv[j] = and_bits<W>(load<W>(vj), valid);
      } else {
        V w = {}, rr = {}, vv = {};
        for (int k = 0; k < len; ++k) {
          const bool ok = (mj[k] & mask_keep(keep)) != 0;
          w[k] = ok ? 1.f : 0.f;
          rr[k] = ok ? to_acc(rj[k]) : 0.f;
          if (HAS_V) vv[k] = ok ? to_acc(vj[k]) : 0.f;
        }
        xw[j] = w; xr[j] = rr; if (HAS_V) xv[j] = vv;
      }
    }
    transpose<W>(xw);
    transpose<W>(xr);
    if (HAS_V) transpose<W>(xv);
    // the scalar loop's step on W rows at once; outputs overwrite the
    // consumed inputs
#pragma GCC unroll 16
    for (int k = W - 1; k >= 0; --k) {
      const V w = xw[k], vk = HAS_V ? xv[k] : V{};
      gae_step<HAS_V>(w, w * gl + (1.f - w), xr[k], vk, g, nv, carry, xr[k], xv[k]);
    }
    transpose<W>(xr);
    if (HAS_V) transpose<W>(xv);
    for (int j = 0; j < W; ++j) {
      const int len = lens[j];
      float* aj = adv[j] + t0s[j];
      float* qj = HAS_V ? ret[j] + t0s[j] : nullptr;
      if (len == W) {
        std::memcpy(aj, &xr[j], sizeof(V));
        if (HAS_V) std::memcpy(qj, &xv[j], sizeof(V));
      } else {
        for (int k = 0; k < len; ++k) aj[k] = xr[j][k];
        if (HAS_V) for (int k = 0; k < len; ++k) qj[k] = xv[j][k];
      }
    }
  }
}

// The tiles' ISA copies: GAE has one, 8 lanes in the AVX2 copy
// (cpu_isa.h's isa_copy_avx2), run on AVX2 and AVX-512 CPUs alike: its
// 16-lane AVX-512 copy was slower in a same-run A/B (one Xeon core,
// (512, 4096) fp32, medians of 9 interleaved rounds: 4.85 ms against 3.62 ms)
// and cost ~7 s of compile. Discounted returns (no values, half the streams)
// keep 16 lanes on AVX-512: 1.31 ms against 1.45 ms for 8 lanes. The
// baseline ISA has no tiles (every row takes the scalar loop).
template <bool HAS_V, typename T, typename M>
struct GaeTiles {
  template <int W>
  static RLHF_FAST_INLINE void run(const T* const* r, const T* const* v, const M* const* m, M keep,
                                   const int64_t* n, const float* g, const float* gl, float* const* adv,
                                   float* const* ret) {
    gae_lanes<W, HAS_V, T, M>(r, v, m, keep, n, g, gl, adv, ret);
  }
};

// ---------------- glue ----------------

// Per-row gamma / lam: a (B,) tensor overrides the float; both in [0, 1].
at::Tensor per_row(const at::Tensor& like, double scalar, const std::optional<at::Tensor>& rows,
                   int64_t B, at::ScalarType acc, const char* op,
                   const char* name) {
  if (rows.has_value() && rows->defined()) {
    TORCH_CHECK(rows->numel() == B, op, ": ", name,
                " as a tensor must have one value per row (", B, "), got shape ",
                rows->sizes());
    at::Tensor out = rows->to(at::kCPU, acc).reshape({B}).contiguous();
    if (B > 0) {
      const at::Tensor d = out.to(at::kDouble);
      TORCH_CHECK(d.ge(0).logical_and(d.le(1)).all().item<bool>(), op, ": ",
                  name, " must lie in [0, 1], got values from ",
                  d.min().item<double>(), " to ", d.max().item<double>());
    }
    return out;
  }
  TORCH_CHECK(scalar >= 0.0 && scalar <= 1.0, op, ": ", name,
              " must lie in [0, 1], got ", scalar);
  return like.new_full({B}, scalar, at::TensorOptions().dtype(acc));
}

template <bool HAS_V>
std::tuple<at::Tensor, at::Tensor> scan_cpu(
    const char* op, const at::Tensor& rewards_in, const at::Tensor* values_in,
    const at::Tensor& mask_in, double gamma, double lam,
    const std::optional<at::Tensor>& gamma_rows,
    const std::optional<at::Tensor>& lam_rows,
    const std::optional<at::Tensor>& cu_seqlens) {
  // Two layouts, one loop: every row is (input pointers, output pointer,
  // length). Padded row b: offset b * stride, length T. Packed segment s:
  // offset cu[s], length cu[s + 1] - cu[s], walked in order of decreasing
  // length so the W rows sharing a vector end within a few steps of each
  // other (lengths 32..1024: ~1% of lane steps wasted, not ~60%).
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  const auto shape = rewards_in.sizes();
  if (packed) {
    check_1d(rewards_in, op, "rewards", shape);
    check_1d(mask_in, op, "mask", shape);
    if (HAS_V) check_1d(*values_in, op, "values", shape);
  } else {
    check_2d(rewards_in, op, "rewards", shape);
    check_2d(mask_in, op, "mask", shape);
    if (HAS_V) check_2d(*values_in, op, "values", shape);
  }
  at::ScalarType vt = rewards_in.scalar_type();
  if (HAS_V && values_in->scalar_type() != vt)  // mixed dtypes: one common type
    vt = (vt == at::kDouble || values_in->scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const std::vector<int64_t> cu = packed ? read_cu_seqlens(op, *cu_seqlens, shape[0]) : std::vector<int64_t>{};
  const at::ScalarType acc = acc_dtype(vt);
  const int64_t B = packed ? static_cast<int64_t>(cu.size()) - 1 : shape[0];
  const int64_t T = packed ? 0 : shape[1];
  const at::Tensor g = per_row(rewards_in, gamma, gamma_rows, B, acc, op, "gamma");
  const at::Tensor l = HAS_V ? per_row(rewards_in, lam, lam_rows, B, acc, op, "lam")
                             : g.new_ones({B});
  const at::Tensor gl = g.mul(l);
  auto prep = [&](const at::Tensor& t) { return packed ? t.contiguous() : inner_contiguous(t); };
  const at::Tensor r = prep(rewards_in.to(vt));
  const at::Tensor v = HAS_V ? prep(values_in->to(vt)) : r;
  const at::Tensor m = prep(mask_for_kernel(mask_in));
  const auto opts = rewards_in.options().dtype(acc);
  at::Tensor adv = rewards_in.new_empty(shape, opts);
  at::Tensor ret = HAS_V ? rewards_in.new_empty(shape, opts) : adv;
  if (adv.numel() == 0 || B == 0) return {adv, ret};
  const int64_t sr = packed ? 0 : r.stride(0), sv = packed ? 0 : v.stride(0), sm = packed ? 0 : m.stride(0);
  // row b -> (segment, offset, length) in the order the kernels walk them
  std::vector<int64_t> order;
  if (packed) {
    order.resize(B);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return cu[a + 1] - cu[a] > cu[b + 1] - cu[b];
    });
  }
  const int64_t mean_len = packed ? std::max<int64_t>(1, shape[0] / B) : T;
  dispatch_value(vt, [&](auto* ttag) {
    using Tv = std::remove_pointer_t<std::remove_cvref_t<decltype(ttag)>>;
    using acc_t = acc_type<Tv>;
    dispatch_mask(m.scalar_type(), [&](auto keep) {
      using M = std::remove_cvref_t<decltype(keep)>;
      const Tv* rp = reinterpret_cast<const Tv*>(r.const_data_ptr());
      const Tv* vp = reinterpret_cast<const Tv*>(v.const_data_ptr());
      const M* mp = reinterpret_cast<const M*>(m.const_data_ptr());
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const acc_t* glp = gl.const_data_ptr<acc_t>();
      acc_t* ap = adv.data_ptr<acc_t>();
      acc_t* qp = ret.data_ptr<acc_t>();
      // The pointers, lengths and parameters of rows b0 .. b0 + n - 1; past
      // `count` rows the last one repeats: same inputs, same outputs written
      // twice by one thread, no branch in the kernels.
      auto rows_at = [&](auto n, int64_t b0, int64_t count) {
        constexpr int kN = decltype(n)::value;
        struct { const Tv* r[kN]; const Tv* v[kN]; const M* m[kN]; acc_t* adv[kN]; acc_t* ret[kN];
                 int64_t n[kN]; acc_t g[kN], gl[kN]; } rows;  // fmt: skip
        for (int j = 0; j < kN; ++j) {
          const int64_t b = b0 + std::min<int64_t>(j, count - 1);
          const int64_t s = packed ? order[b] : b;
          const int64_t off = packed ? cu[s] : 0;
          rows.r[j] = rp + s * sr + off; rows.v[j] = vp + s * sv + off; rows.m[j] = mp + s * sm + off;
          rows.adv[j] = ap + s * T + off; rows.ret[j] = qp + s * T + off;
          rows.n[j] = packed ? cu[s + 1] - cu[s] : T;
          rows.g[j] = gp[s]; rows.gl[j] = glp[s];
        }
        return rows;
      };
      // Whole groups of W rows in lanes (fp32 accumulation, AVX2 or better:
      // W = 8; discounted returns on AVX-512: 16); the B % W rest, and
      // everything else, 4 rows at a time.
      constexpr bool kHasLanes = std::is_same_v<acc_t, float>;
      const Isa isa = active_isa();  // read once: it sizes the groups and picks the copy
      const int W = !kHasLanes || isa == Isa::kBaseline ? 0 : (!HAS_V && isa == Isa::kAvx512 ? 16 : 8);
      const int64_t n_groups = W > 0 ? B / W : 0;
      const int64_t lane_rows = n_groups * W;
      auto run_groups = [&](auto width) {
        constexpr int kW = decltype(width)::value;
        at::parallel_for(0, n_groups, std::max<int64_t>(1, rows_per_task(mean_len, kRows) / kW), [&](int64_t begin, int64_t end) {
          for (int64_t grp = begin; grp < end; ++grp) {
            const auto x = rows_at(width, grp * kW, kW);
            if constexpr (kW == 16) isa_copy_avx512<GaeTiles<HAS_V, Tv, M>>(x.r, x.v, x.m, keep, x.n, x.g, x.gl, x.adv, x.ret);
            else isa_copy_avx2<GaeTiles<HAS_V, Tv, M>>(x.r, x.v, x.m, keep, x.n, x.g, x.gl, x.adv, x.ret);
          }
        });
      };
      if constexpr (kHasLanes) {
        if constexpr (!HAS_V) {
          if (W == 16) run_groups(std::integral_constant<int, 16>{});
        }
        if (W == 8) run_groups(std::integral_constant<int, 8>{});
      }
      at::parallel_for(lane_rows, B, rows_per_task(mean_len, kRows), [&](int64_t begin, int64_t end) {
        for (int64_t b0 = begin; b0 < end; b0 += kRows) {
          const auto x = rows_at(std::integral_constant<int, kRows>{}, b0, end - b0);
          gae_rows<HAS_V, Tv, M, acc_t>(x.r, x.v, x.m, keep, x.n, x.g, x.gl, x.adv, x.ret);
        }
      });
    });
  });
  return {adv, ret};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    double gamma, double lam, const std::optional<at::Tensor>& gamma_rows,
    const std::optional<at::Tensor>& lam_rows, const std::optional<at::Tensor>& cu_seqlens) {
  return scan_cpu<true>("rlhf_fast::gae", rewards, &values, mask, gamma, lam,
                        gamma_rows, lam_rows, cu_seqlens);
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards,
                                  const at::Tensor& mask, double gamma,
                                  const std::optional<at::Tensor>& gamma_rows,
                                  const std::optional<at::Tensor>& cu_seqlens) {
  return std::get<0>(scan_cpu<false>("rlhf_fast::discounted_returns", rewards,
                                     nullptr, mask, gamma, 1.0, gamma_rows,
                                     std::nullopt, cu_seqlens));
}

}  // namespace cpu
}  // namespace rlhf_fast
