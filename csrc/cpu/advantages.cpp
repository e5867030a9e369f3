// CPU advantage estimators. GAE and discounted returns are one reverse sweep
// per row: on a CPU the sequential loop is already O(T) and needs no scan, so
// the work is to keep the carry's dependency chain and the memory system busy.
//
// With fp32 accumulation, rows go W to a vector (one lane per row; W = 16 on
// AVX-512, 8 on AVX2): a W-step tile of each row is loaded, converted and
// blended on whole vectors, the W x W tile is transposed in registers so the
// recurrence runs W rows per multiply-add chain, and the outputs go back the
// same way. At (512, 4096) on one EPYC core: ~3 ms with AVX-512, against
// 14 ms for the first version, which walked 4 rows side by side with scalar
// code. (Staging 256 steps per row through scratch first was slower: ~5 ms.)
// On baseline x86-64, for fp64, and for the B % W rows left over, that scalar
// loop remains. Rows are split across threads with at::parallel_for.
// Whitening and group statistics accumulate in double, two passes per chunk
// merged with Chan's formula (never E[x^2] - E[x]^2).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows walked together (independent carry chains)

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

template <bool HAS_V, typename T, typename M, typename acc_t>
RLHF_FAST_INLINE void gae_rows(const T* const* r, const T* const* v,
                               const M* const* m, int64_t n,
                               const acc_t* g, const acc_t* gl,
                               acc_t* const* adv, acc_t* const* ret) {
  acc_t nv[kRows] = {}, carry[kRows] = {};
  for (int64_t t = n - 1; t >= 0; --t) {
#pragma GCC unroll 4
    for (int j = 0; j < kRows; ++j) {
      const bool valid = m[j][t] != M(0);
      const acc_t w = valid ? acc_t(1) : acc_t(0);
      const acc_t rt = blend(valid, to_acc(r[j][t]), acc_t(0));
      const acc_t vt = HAS_V ? blend(valid, to_acc(v[j][t]), acc_t(0)) : acc_t(0);
      acc_t a_out, r_out;
      gae_step<HAS_V>(w, valid ? gl[j] : acc_t(1), rt, vt, g[j], nv[j], carry[j], a_out, r_out);
      adv[j][t] = a_out;
      if (HAS_V) ret[j][t] = r_out;
    }
  }
}

// ---------------- W rows per vector, W-step tiles ----------------
// W = 16 on AVX-512 (one zmm of fp32), 8 on AVX2 (one ymm). A tile is W rows
// x W steps: each row's W steps are one vector load (one 64-byte line of fp32
// on AVX-512), and a W x W transpose in registers turns rows into steps.
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
  transpose_stage<W, 4>(x);
  transpose_stage<W, 2>(x);
  transpose_stage<W, 1>(x);
}

// A full tile's inputs on whole vectors (cpu_math.h's Vec<W> and load<W>):
// the mask compared in its own dtype, inputs at masked steps zeroed by AND
// (NaN-safe).
// Written as a per-element loop GCC left it scalar (a cmpb per element):
// 2.6 -> 1.3 ns per element with the tile in cache.
template <int W, typename M>
RLHF_FAST_INLINE typename Vec<W>::i load_valid(const M* p) {
  typedef M MV __attribute__((vector_size(W * sizeof(M))));
  MV x;
  std::memcpy(&x, p, sizeof(x));
  return __builtin_convertvector(x != M(0), typename Vec<W>::i);  // -1 where valid
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
                                const M* const* m, int64_t n,
                                const float* g_rows, const float* gl_rows,
                                float* const* adv, float* const* ret) {
  using V = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  // xr[j] = row j's tile (W steps); after transpose, xr[k] = step k's W rows
  V xr[W], xv[W], xw[W];
  V g, gl, nv = {}, carry = {};
  for (int j = 0; j < W; ++j) { g[j] = g_rows[j]; gl[j] = gl_rows[j]; }
  for (int64_t t1 = n; t1 > 0; t1 -= W) {
    const int64_t t0 = std::max<int64_t>(t1 - W, 0);
    const int len = static_cast<int>(t1 - t0);
    // in: a short first tile (len < W, the row's first steps) is padded
    // with masked steps, which change nothing
    for (int j = 0; j < W; ++j) {
      const T* rj = r[j] + t0; const T* vj = v[j] + t0; const M* mj = m[j] + t0;
      if (t0 >= kPrefetch) {
        __builtin_prefetch(rj - kPrefetch); if (HAS_V) __builtin_prefetch(vj - kPrefetch); __builtin_prefetch(mj - kPrefetch);
        __builtin_prefetch(adv[j] + t0 - kPrefetch, 1); if (HAS_V) __builtin_prefetch(ret[j] + t0 - kPrefetch, 1);
      }
      if (len == W) {
        const I valid = load_valid<W>(mj);
        xw[j] = __builtin_convertvector(-valid, V);
        xr[j] = and_bits<W>(load<W>(rj), valid);
        if (HAS_V) xv[j] = and_bits<W>(load<W>(vj), valid);
      } else {
        V w = {}, rr = {}, vv = {};
        for (int k = 0; k < len; ++k) {
          const bool ok = mj[k] != M(0);
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
      float* aj = adv[j] + t0;
      float* qj = HAS_V ? ret[j] + t0 : nullptr;
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

// One out-of-line copy per (values?, dtype, mask dtype): the 4-row scalar
// loop cloned for AVX-512 / AVX2 / baseline, and for fp32 accumulation the
// tile kernel at 16 lanes (AVX-512) and 8 lanes (AVX2). Baseline x86-64 and
// fp64 take the scalar loop only. (16-wide shuffles written once for every
// target made GCC take minutes per copy lowering them for narrower ones.)
#define RLHF_FAST_GAE_KERNEL(HV, T, M, acc_t)                                      \
  RLHF_FAST_CPU_CLONES void gae_rows_k(                                          \
      std::integral_constant<bool, HV>, const T* const* r, const T* const* v,    \
      const M* const* m, int64_t n, const acc_t* g, const acc_t* gl,             \
      acc_t* const* adv, acc_t* const* ret) {                                    \
    gae_rows<HV, T, M, acc_t>(r, v, m, n, g, gl, adv, ret);                      \
  }                                                                              \
  RLHF_FAST_GAE_LANES_##acc_t(HV, T, M)
#define RLHF_FAST_GAE_LANES_double(HV, T, M)
#define RLHF_FAST_GAE_LANES_float(HV, T, M)                                      \
  RLHF_FAST_TARGET_AVX512 void gae_lanes_k(                                      \
      std::integral_constant<int, 16>, std::integral_constant<bool, HV>,         \
      const T* const* r, const T* const* v, const M* const* m, int64_t n,        \
      const float* g, const float* gl, float* const* adv, float* const* ret) {   \
    gae_lanes<16, HV, T, M>(r, v, m, n, g, gl, adv, ret);                        \
  }                                                                              \
  RLHF_FAST_TARGET_AVX2 void gae_lanes_k(                                        \
      std::integral_constant<int, 8>, std::integral_constant<bool, HV>,          \
      const T* const* r, const T* const* v, const M* const* m, int64_t n,        \
      const float* g, const float* gl, float* const* adv, float* const* ret) {   \
    gae_lanes<8, HV, T, M>(r, v, m, n, g, gl, adv, ret);                         \
  }
#define RLHF_FAST_GAE_MASKS(HV, T, acc_t)          \
  RLHF_FAST_GAE_KERNEL(HV, T, uint8_t, acc_t)      \
  RLHF_FAST_GAE_KERNEL(HV, T, int8_t, acc_t)       \
  RLHF_FAST_GAE_KERNEL(HV, T, int32_t, acc_t)      \
  RLHF_FAST_GAE_KERNEL(HV, T, int64_t, acc_t)      \
  RLHF_FAST_GAE_KERNEL(HV, T, float, acc_t)        \
  RLHF_FAST_GAE_KERNEL(HV, T, double, acc_t)
RLHF_FAST_GAE_MASKS(true, float, float)
RLHF_FAST_GAE_MASKS(true, bf16_bits, float)
RLHF_FAST_GAE_MASKS(true, fp16_bits, float)
RLHF_FAST_GAE_MASKS(true, double, double)
RLHF_FAST_GAE_MASKS(false, float, float)
RLHF_FAST_GAE_MASKS(false, bf16_bits, float)
RLHF_FAST_GAE_MASKS(false, fp16_bits, float)
RLHF_FAST_GAE_MASKS(false, double, double)
#undef RLHF_FAST_GAE_MASKS
#undef RLHF_FAST_GAE_KERNEL

// ---------------- dtype dispatch ----------------

template <typename F>
void dispatch_value(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<bf16_bits*>(nullptr));
    case at::kHalf: return f(static_cast<fp16_bits*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", dt);
  }
}

// Masks are read in their own dtype (bool, int8/uint8, int32, int64, fp32,
// fp64: no conversion pass); any other dtype is converted to bool once.
at::Tensor mask_for_kernel(const at::Tensor& mask) {
  switch (mask.scalar_type()) {
    case at::kBool: case at::kByte: case at::kChar: case at::kInt:
    case at::kLong: case at::kFloat: case at::kDouble:
      return mask;
    default:
      return mask.ne(0);
  }
}

template <typename F>
void dispatch_mask(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kBool: case at::kByte: return f(static_cast<uint8_t*>(nullptr));
    case at::kChar: return f(static_cast<int8_t*>(nullptr));
    case at::kInt: return f(static_cast<int32_t*>(nullptr));
    case at::kLong: return f(static_cast<int64_t*>(nullptr));
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    default: TORCH_CHECK(false, "rlhf_fast: unsupported mask dtype ", dt);
  }
}

// Inner dim contiguous; any row stride is read in place.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

void check_2d(const at::Tensor& t, const char* op, const char* name,
              at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name,
              " on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (B, T), got ",
              t.sizes());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape,
              " (the rewards' shape), got ", t.sizes());
}

// Per-row gamma / lam: a (B,) tensor overrides the float; both in [0, 1].
at::Tensor per_row(double scalar, const std::optional<at::Tensor>& rows,
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
  return at::full({B}, scalar, at::TensorOptions().dtype(acc));
}

at::ScalarType acc_of(at::ScalarType a) {
  return a == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per task: at least ~16k elements each, or forking costs more.
int64_t row_grain(int64_t T) {
  return std::max<int64_t>(kRows, 16384 / std::max<int64_t>(T, 1));
}

template <bool HAS_V>
std::tuple<at::Tensor, at::Tensor> scan_cpu(
    const char* op, const at::Tensor& rewards_in, const at::Tensor* values_in,
    const at::Tensor& mask_in, double gamma, double lam,
    const std::optional<at::Tensor>& gamma_rows,
    const std::optional<at::Tensor>& lam_rows) {
  check_2d(rewards_in, op, "rewards", rewards_in.sizes());
  const auto shape = rewards_in.sizes();
  check_2d(mask_in, op, "mask", shape);
  at::ScalarType vt = rewards_in.scalar_type();
  if (HAS_V) {
    check_2d(*values_in, op, "values", shape);
    if (values_in->scalar_type() != vt)  // mixed dtypes: one common type
      vt = (vt == at::kDouble || values_in->scalar_type() == at::kDouble)
               ? at::kDouble : at::kFloat;
  }
  const at::ScalarType acc = acc_of(vt);
  const int64_t B = shape[0], T = shape[1];
  const at::Tensor g = per_row(gamma, gamma_rows, B, acc, op, "gamma");
  const at::Tensor l = HAS_V ? per_row(lam, lam_rows, B, acc, op, "lam")
                             : at::ones({B}, g.options());
  const at::Tensor gl = g * l;
  const at::Tensor r = inner_contiguous(rewards_in.to(vt));
  const at::Tensor v = HAS_V ? inner_contiguous(values_in->to(vt)) : r;
  const at::Tensor m = inner_contiguous(mask_for_kernel(mask_in));
  const auto opts = rewards_in.options().dtype(acc);
  at::Tensor adv = at::empty({B, T}, opts);
  at::Tensor ret = HAS_V ? at::empty({B, T}, opts) : adv;
  if (adv.numel() == 0) return {adv, ret};
  const int64_t sr = r.stride(0), sv = v.stride(0), sm = m.stride(0);
  dispatch_value(vt, [&](auto* ttag) {
    using Tv = std::remove_pointer_t<decltype(ttag)>;
    using acc_t = std::conditional_t<std::is_same_v<Tv, double>, double, float>;
    dispatch_mask(m.scalar_type(), [&](auto* mtag) {
      using M = std::remove_pointer_t<decltype(mtag)>;
      const Tv* rp = reinterpret_cast<const Tv*>(r.const_data_ptr());
      const Tv* vp = reinterpret_cast<const Tv*>(v.const_data_ptr());
      const M* mp = reinterpret_cast<const M*>(m.const_data_ptr());
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const acc_t* glp = gl.const_data_ptr<acc_t>();
      acc_t* ap = adv.data_ptr<acc_t>();
      acc_t* qp = ret.data_ptr<acc_t>();
      // The pointers and parameters of rows b0 .. b0 + n - 1; past `count`
      // rows the last one repeats: same inputs, same outputs written twice
      // by one thread, no branch in the kernels.
      auto rows_at = [&](auto n, int64_t b0, int64_t count) {
        constexpr int kN = decltype(n)::value;
        struct { const Tv* r[kN]; const Tv* v[kN]; const M* m[kN]; acc_t* adv[kN]; acc_t* ret[kN];
                 acc_t g[kN], gl[kN]; } rows;  // fmt: skip
        for (int j = 0; j < kN; ++j) {
          const int64_t b = b0 + std::min<int64_t>(j, count - 1);
          rows.r[j] = rp + b * sr; rows.v[j] = vp + b * sv; rows.m[j] = mp + b * sm;
          rows.adv[j] = ap + b * T; rows.ret[j] = qp + b * T;
          rows.g[j] = gp[b]; rows.gl[j] = glp[b];
        }
        return rows;
      };
      // Whole groups of W rows in lanes (fp32 accumulation: W = 16 on AVX-512,
      // 8 on AVX2); the B % W rest, and everything else, 4 rows at a time.
      constexpr bool kHasLanes = std::is_same_v<acc_t, float>;
      const Isa isa = active_isa();
      const int W = !kHasLanes ? 0 : isa == Isa::kAvx512 ? 16 : isa == Isa::kAvx2 ? 8 : 0;
      const int64_t n_groups = W > 0 ? B / W : 0;
      const int64_t lane_rows = n_groups * W;
      if constexpr (kHasLanes) {
        auto run_groups = [&](auto width) {
          constexpr int kW = decltype(width)::value;
          at::parallel_for(0, n_groups, std::max<int64_t>(1, row_grain(T) / kW), [&](int64_t begin, int64_t end) {
            for (int64_t grp = begin; grp < end; ++grp) {
              const auto x = rows_at(width, grp * kW, kW);
              gae_lanes_k(width, std::integral_constant<bool, HAS_V>{}, x.r, x.v, x.m, T, x.g, x.gl, x.adv, x.ret);
            }
          });
        };
        if (W == 16) run_groups(std::integral_constant<int, 16>{});
        if (W == 8) run_groups(std::integral_constant<int, 8>{});
      }
      at::parallel_for(lane_rows, B, row_grain(T), [&](int64_t begin, int64_t end) {
        for (int64_t b0 = begin; b0 < end; b0 += kRows) {
          const auto x = rows_at(std::integral_constant<int, kRows>{}, b0, end - b0);
          gae_rows_k(std::integral_constant<bool, HAS_V>{}, x.r, x.v, x.m, T, x.g, x.gl, x.adv, x.ret);
        }
      });
    });
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
    double gamma, double lam, const std::optional<at::Tensor>& gamma_rows,
    const std::optional<at::Tensor>& lam_rows) {
  return scan_cpu<true>("rlhf_fast::gae", rewards, &values, mask, gamma, lam,
                        gamma_rows, lam_rows);
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards,
                                  const at::Tensor& mask, double gamma,
                                  const std::optional<at::Tensor>& gamma_rows) {
  return std::get<0>(scan_cpu<false>("rlhf_fast::discounted_returns", rewards,
                                     nullptr, mask, gamma, 1.0, gamma_rows,
                                     std::nullopt));
}

// ---------------- whitening ----------------

struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

// Chan et al.: merge two (n, mean, M2) without cancellation.
Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Moments o;
  o.n = a.n + b.n;
  const double d = b.mean - a.mean;
  o.mean = a.mean + d * (b.n / o.n);
  o.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / o.n);
  return o;
}

// Two passes over a chunk that is still in L1 (4096 elements, 16 KiB fp32).
template <typename T, typename M>
RLHF_FAST_INLINE Moments chunk_moments(const T* x, const M* m, int64_t n) {
  double cnt = 0, sum = 0;
#pragma omp simd reduction(+ : cnt, sum)
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = m[i] != M(0);
    const double xi = static_cast<double>(to_acc(x[i]));
    cnt += blend(valid, 1.0, 0.0);
    sum += blend(valid, xi, 0.0);
  }
  Moments o;
  if (cnt == 0) return o;
  const double mean = sum / cnt;
  double m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(to_acc(x[i])) - mean;
    m2 += blend(m[i] != M(0), d * d, 0.0);
  }
  return {cnt, mean, m2};
}

template <typename T, typename M, typename acc_t>
RLHF_FAST_INLINE void whiten_apply(const T* x, const M* m, acc_t* out,
                                   int64_t n, double mean, double rstd,
                                   double add) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double y = (static_cast<double>(to_acc(x[i])) - mean) * rstd + add;
    out[i] = blend(m[i] != M(0), static_cast<acc_t>(y), acc_t(0));
  }
}

constexpr int64_t kChunk = 4096;

at::Tensor whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                      bool shift_mean, double eps) {
  const char* op = "rlhf_fast::whiten";
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected CPU tensors, got ",
              x_in.device());
  TORCH_CHECK(mask_in.sizes() == x_in.sizes(), op, ": mask must have shape ",
              x_in.sizes(), " (x's shape), got ", mask_in.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = mask_for_kernel(mask_in).contiguous();
  const at::ScalarType acc = acc_of(x.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(acc));
  const int64_t N = x.numel();
  if (N == 0) return out;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  std::vector<Moments> parts(nchunks);
  dispatch_value(x.scalar_type(), [&](auto* ttag) {
    using Tv = std::remove_pointer_t<decltype(ttag)>;
    using acc_t = std::conditional_t<std::is_same_v<Tv, double>, double, float>;
    dispatch_mask(m.scalar_type(), [&](auto* mtag) {
      using M = std::remove_pointer_t<decltype(mtag)>;
      const Tv* xp = reinterpret_cast<const Tv*>(x.const_data_ptr());
      const M* mp = reinterpret_cast<const M*>(m.const_data_ptr());
      at::parallel_for(0, nchunks, 4, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          const int64_t lo = c * kChunk, len = std::min(kChunk, N - lo);
          parts[c] = chunk_moments(xp + lo, mp + lo, len);
        }
      });
      Moments tot;  // serial merge: N / 4096 chunks, 512 at 2M elements
      for (const Moments& p : parts) tot = merge(tot, p);
      // n <= 1: variance 0 (verl raises); the valid element maps to 0.
      const double var = tot.n > 1 ? tot.m2 / (tot.n - 1) : 0.0;
      const double rstd = 1.0 / std::sqrt(var + eps);
      const double add = shift_mean ? 0.0 : tot.mean;
      acc_t* op_ = out.data_ptr<acc_t>();
      at::parallel_for(0, nchunks, 4, [&](int64_t b, int64_t e) {
        const int64_t lo = b * kChunk, hi = std::min(e * kChunk, N);
        whiten_apply(xp + lo, mp + lo, op_ + lo, hi - lo, tot.mean, rstd, add);
      });
    });
  });
  return out;
}

// ---------------- group advantages ----------------

int estimator_code(const std::string& name, const char* op) {
  if (name == "grpo") return 0;
  if (name == "dr_grpo") return 1;
  if (name == "rloo") return 2;
  if (name == "reinforce_baseline") return 3;
  TORCH_CHECK(false, op, ": unknown estimator '", name,
              "'; choose one of grpo, dr_grpo, rloo, reinforce_baseline");
}

// One group: indices idx[0..n) into s / out (idx == nullptr: contiguous).
template <typename T, typename acc_t>
void group_one(const T* s, const int64_t* idx, int64_t base, int64_t n,
               int est, double eps, acc_t* out) {
  auto at_ = [&](int64_t k) { return idx ? idx[k] : base + k; };
  if (n <= 1) {  // singleton: no baseline exists, advantage 0
    for (int64_t k = 0; k < n; ++k) out[at_(k)] = acc_t(0);
    return;
  }
  double sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(to_acc(s[at_(k)]));
  const double mean = sum / n;
  double m2 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(to_acc(s[at_(k)])) - mean;
    m2 += d * d;
  }
  const double nd = static_cast<double>(n);
  const double scale = est == 0 ? 1.0 / (std::sqrt(m2 / (nd - 1)) + eps)
                       : est == 2 ? nd / (nd - 1) : 1.0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(to_acc(s[at_(k)])) - mean;
    out[at_(k)] = static_cast<acc_t>(d * scale);
  }
}

at::Tensor group_advantages_cpu(const at::Tensor& scores_in,
                                const std::optional<at::Tensor>& group_ids,
                                int64_t group_size, std::string estimator,
                                double eps) {
  const char* op = "rlhf_fast::group_advantages";
  TORCH_CHECK(scores_in.device().is_cpu(), op, ": expected CPU tensors, got ",
              scores_in.device());
  TORCH_CHECK(scores_in.dim() == 1, op, ": scores must be 1-D (N,), got ",
              scores_in.sizes());
  const int est = estimator_code(estimator, op);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor s = scores_in.contiguous();
  const int64_t N = s.size(0);
  at::Tensor out = at::empty({N}, s.options().dtype(acc_of(s.scalar_type())));
  const bool by_id = group_ids.has_value() && group_ids->defined();
  std::vector<int64_t> order, starts;  // segments of `order` (by_id)
  if (by_id) {
    TORCH_CHECK(!at::isFloatingType(group_ids->scalar_type()) &&
                    group_ids->scalar_type() != at::kBool,
                op, ": group ids must be an integer tensor, got ",
                group_ids->scalar_type());
    TORCH_CHECK(group_ids->dim() == 1 && group_ids->size(0) == N, op,
                ": group ids must have shape (", N, ",), got ",
                group_ids->sizes());
    const at::Tensor ids = group_ids->to(at::kCPU, at::kLong).contiguous();
    const int64_t* ip = ids.const_data_ptr<int64_t>();
    order.resize(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
    for (int64_t k = 0; k < N; ++k)
      if (k == 0 || ip[order[k]] != ip[order[k - 1]]) starts.push_back(k);
    starts.push_back(N);
  } else {
    TORCH_CHECK(group_size > 0, op, ": group size must be > 0, got ",
                group_size);
    TORCH_CHECK(N % group_size == 0, op, ": group size ", group_size,
                " does not divide the number of scores N=", N);
  }
  if (N == 0) return out;
  const int64_t G = by_id ? static_cast<int64_t>(starts.size()) - 1 : N / group_size;
  dispatch_value(s.scalar_type(), [&](auto* ttag) {
    using Tv = std::remove_pointer_t<decltype(ttag)>;
    using acc_t = std::conditional_t<std::is_same_v<Tv, double>, double, float>;
    const Tv* sp = reinterpret_cast<const Tv*>(s.const_data_ptr());
    acc_t* op_ = out.data_ptr<acc_t>();
    at::parallel_for(0, G, 256, [&](int64_t b, int64_t e) {
      for (int64_t gi = b; gi < e; ++gi) {
        if (by_id)
          group_one(sp, order.data() + starts[gi], 0,
                    starts[gi + 1] - starts[gi], est, eps, op_);
        else
          group_one(sp, static_cast<const int64_t*>(nullptr), gi * group_size,
                    group_size, est, eps, op_);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &rlhf_fast::cpu::gae_cpu);
  m.impl("discounted_returns", &rlhf_fast::cpu::discounted_returns_cpu);
  m.impl("whiten", &rlhf_fast::cpu::whiten_cpu);
  m.impl("group_advantages", &rlhf_fast::cpu::group_advantages_cpu);
}
