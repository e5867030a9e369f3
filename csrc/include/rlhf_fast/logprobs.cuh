// Log-probs and entropy of softmax(logits / T) on the GPU, torch-free.
//
// One thread block per row (one token position), one pass over the row:
// each thread keeps an online (max m of the raw logits x, s = sum e^d,
// w = sum d e^d with d = (x - m) / T) over 16-byte vectors, then the block
// merges the states (warp shuffles, then shared memory). The row's outputs:
// m and log s (lse = m / T + log s, which the backward never forms),
// entropy = log s - w/s, logprob = (x_y - m) / T - log s. The max is
// subtracted before scaling: exact to the row's spread at any offset (x / T
// first rounds at the offset's scale, 0.5 at 1e7 with T != 1), for the same
// FADD + FMUL per element.
// No (N, V) intermediate exists; DRAM sees the logits once per direction:
//   V = 151936 (Qwen2): 297 KiB per bf16 row, 594 KiB per fp32 row;
//   8 x 4096 tokens of bf16 logits are 9.96 GB, ~3 ms at 3.35 TB/s (H100).
//
// This header is two halves. The first (declarations: acc_type_t and the two
// launchers) is plain C++ that a host compiler can parse, so the torch glue
// (csrc/cuda/logprobs_ops.cpp, compiled by g++) includes it for the
// prototypes. The second (kernels and launcher bodies) exists only under
// nvcc; csrc/cuda/logprobs.cu includes it and explicitly instantiates the
// launchers for float, __nv_bfloat16, __half and double.
//
// The namespace is rlhf_fast::gpu, not rlhf_fast::cuda, so that code inside
// it never shadows libcu++'s ::cuda namespace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_fast {
namespace gpu {

// Accumulation type: float for fp32 / bf16 / fp16 logits, double for fp64
// (fp64 is the gradcheck / reference path, so it must not lose precision).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type_t = typename AccType<scalar_t>::type;

// In-row indices are 32-bit (fewer registers, see FwdMinBlocks); the launchers
// return cudaErrorInvalidValue above this V, 2^30, which also leaves room for
// `j + BLOCK` without overflow. Vocabularies are ~1e5 (151936 for Qwen2).
constexpr int64_t kLogprobsMaxVocab = int64_t(1) << 30;

// logits: (A, B, V), element (a, b, j) at a*stride_a + b*stride_b + j.
// labels: (A, B) int64, contiguous. logprobs / entropy / row_max / log_s:
// (A, B) contiguous, acc_type_t; row_max = max x (raw), log_s = log sum
// exp((x - row_max) * inv_t). inv_temperature = 1 / T, rounded to acc_t
// once, as the CPU kernel does. compute_entropy = false writes 0 for the
// entropy (w is still summed: 2 FLOPs per element of a bandwidth-bound
// sweep). Rows whose label is ignore_index are never read and get 0 in all
// four outputs. Labels outside [0, V) must be rejected by the caller; here
// they give a NaN logprob instead of an out-of-bounds read.
template <typename scalar_t>
cudaError_t launch_logprobs_fwd(const scalar_t* logits, const int64_t* labels,
                                acc_type_t<scalar_t>* logprobs,
                                acc_type_t<scalar_t>* entropy,
                                acc_type_t<scalar_t>* row_max,
                                acc_type_t<scalar_t>* log_s, int64_t A, int64_t B,
                                int64_t V, int64_t stride_a, int64_t stride_b,
                                double inv_temperature, int64_t ignore_index,
                                bool compute_entropy, cudaStream_t stream);

// grad_logits: (A, B, V) contiguous, in the logits dtype:
//   d_j = (x_j - row_max) * inv_t, p_j = exp(d_j - log_s),
//   mu = log_s - entropy (= E_p[d]),
//   dz_j = g_lp * ([j == y] - p_j) - g_H * (p_j > 0 ? p_j * (d_j - mu) : 0),
//   dlogit_j = dz_j * inv_t.
// Every term is of the row's spread: p from z - lse would cancel two numbers
// of the logits' offset (0.5 absolute at 1e7 in fp32).
// grad_logprobs / row_max / log_s / entropy: (A, B) contiguous acc_t;
// grad_entropy may be nullptr (no entropy term; a separate kernel without
// that work). Ignored rows get zeros.
template <typename scalar_t>
cudaError_t launch_logprobs_bwd(const acc_type_t<scalar_t>* grad_logprobs,
                                const acc_type_t<scalar_t>* grad_entropy,
                                const scalar_t* logits, const int64_t* labels,
                                const acc_type_t<scalar_t>* row_max,
                                const acc_type_t<scalar_t>* log_s,
                                const acc_type_t<scalar_t>* entropy,
                                scalar_t* grad_logits, int64_t A, int64_t B,
                                int64_t V, int64_t stride_a, int64_t stride_b,
                                double inv_temperature, int64_t ignore_index,
                                cudaStream_t stream);

}  // namespace gpu
}  // namespace rlhf_fast

#if defined(__CUDACC__)

namespace rlhf_fast {
namespace gpu {
namespace logprobs_detail {

// ---------------- dtype plumbing ----------------

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Cvt<double> {
  static __device__ __forceinline__ double to(double x) { return x; }
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) {
    return __float2bfloat16_rn(x);
  }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) {
    return __float2half_rn(x);
  }
};

// Overloads rather than std:: so nothing beyond the CUDA headers is needed.
// setup.py builds with --use_fast_math, which turns expf / logf into
// __expf / __logf (ex2.approx: ~2 ulp near 0, and exp(-inf) is still +0).
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
// fmax returns the other operand when one is NaN, so a running max is never
// NaN; NaN logits reach the result through s instead (see update()).
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000ll);
}
template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ll);
}

// 16 bytes = one LDG.128 / STG.128 per thread: 8 bf16/fp16, 4 fp32, 2 fp64.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

// Vectors a thread has in flight per loop trip. 2 x 16 B x 2048 threads =
// 64 KiB per SM, past the ~25 KiB per SM that Little's law asks for at
// 3.35 TB/s and ~1 us DRAM latency on 132 SMs. fp64 (gradcheck only) takes
// one: its exp() alone needs ~60 registers, and with two the 1024-thread
// kernels (64 registers at most) spilled.
template <typename T>
struct Unroll {
  static constexpr int value = sizeof(T) == 8 ? 1 : 2;
};

// __launch_bounds__ min blocks per SM, which caps registers per thread at
// 65536 / (min_blocks * BLOCK):
//  * forward: all 2048 threads of an A100 / H100 SM, so <= 32 registers,
//    which it meets without spilling on sm_80 and sm_90, with or without
//    --use_fast_math (checked with -Xptxas -warn-spills);
//  * backward: 1536 threads (75%), <= 40 registers. Capped at 32 it spilled
//    up to 124 bytes on sm_80 with --use_fast_math; without any hint ptxas
//    took 56-96 registers, i.e. 25-50% occupancy. Its blocks stop at 512
//    threads (it has no reduction, so wider rows only mean more trips per
//    thread) so that 1536 is a whole number of blocks.
//  * fp64 needs ~60 registers for exp() and asks for nothing.
template <typename T, int BLOCK>
struct FwdMinBlocks {
  static constexpr int value = sizeof(T) == 8 ? 1 : 2048 / BLOCK;
};
template <typename T, int BLOCK>
struct BwdMinBlocks {
  static_assert(BLOCK <= 512, "backward blocks stop at 512 threads");
  static constexpr int value = sizeof(T) == 8 ? 1 : 1536 / BLOCK;
};

// Elements before the first 16-byte boundary of p, capped at V. Rows start
// anywhere: with contiguous bf16 logits and V = 32003 every other row is
// misaligned, so a scalar head (< 8 elements) keeps the body vectorised for
// every row instead of dropping whole rows to scalar loads.
template <typename T>
__device__ __forceinline__ int vec_head(const T* p, int V) {
  constexpr int kN = Vec16<T>::kN;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  // Torch storage is always element-aligned; if not, stay scalar (correct).
  if (addr % sizeof(T) != 0) return V;
  const int head = (kN - static_cast<int>((addr % 16) / sizeof(T))) % kN;
  return head < V ? head : V;
}

// ---------------- online softmax state ----------------

// All relative to the running max m of the raw logits x, in z = x / T:
//   s = sum_j exp(d_j),  w = sum_j d_j exp(d_j),  d_j = (x_j - m) * inv_t.
// Invariants that keep -inf / NaN honest:
//   * m is never NaN (fmax drops NaN); it is -inf until a finite or +inf z.
//   * s == 0 exactly when no finite z has been seen and no NaN either; then
//     w == 0 too. (The max element contributes exp(0) = 1, so s >= 1 after
//     any finite z.)
//   * a NaN z makes s NaN, and NaN survives every later rescale and merge.
template <typename acc_t>
struct OnlineState {
  acc_t m, s, w;
};

// Re-express (s, w) relative to m_new >= m_old, with d = (m_old - m_new) / T
// <= 0:  w' = (w + d s) e^d,  s' = s e^d.
template <typename acc_t>
__device__ __forceinline__ void rescale(acc_t m_old, acc_t m_new, acc_t& s,
                                        acc_t& w, acc_t inv_t) {
  // Nothing seen yet: leave (0, 0). Without this, m_old = -inf gives
  // d = -inf and d * s = -inf * 0 = NaN.
  if (s == acc_t(0)) return;
  const acc_t d = (m_old - m_new) * inv_t;  // NaN only if both are +inf: row is NaN
  const acc_t e = exp_(d);
  if (e == acc_t(0)) {
    // Too far below the new max to matter (d < -104 in fp32, or m_old - m_new
    // overflowed to -inf for |logits| ~ 1e38). The exact answer is 0, but
    // (w + d s) * 0 could be -inf * 0 = NaN. Multiplying by 0 keeps a NaN
    // s or w NaN, and turns finite ones into 0.
    s *= acc_t(0);
    w *= acc_t(0);
    return;
  }
  w = (w + d * s) * e;
  s *= e;
}

template <typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> merge(OnlineState<acc_t> a,
                                                    OnlineState<acc_t> b, acc_t inv_t) {
  const acc_t m = max_(a.m, b.m);
  rescale(a.m, m, a.s, a.w, inv_t);
  rescale(b.m, m, b.s, b.w, inv_t);
  return {m, a.s + b.s, a.w + b.w};
}

// Folds K raw logits x into the state: one max and at most one rescale per
// K elements (K = 16 for bf16), then one exp per element.
template <typename acc_t, int K>
__device__ __forceinline__ void update(OnlineState<acc_t>& st, const acc_t (&z)[K], acc_t inv_t) {
  acc_t cmax = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cmax = max_(cmax, z[k]);
  if (cmax > st.m) {  // false for NaN or all -inf chunks
    rescale(st.m, cmax, st.s, st.w, inv_t);
    st.m = cmax;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t t = (z[k] - st.m) * inv_t;  // <= 0 unless z is NaN
    const acc_t e = exp_(t);
    // A -inf logit (masked token) weighs exactly 0. Selecting instead of
    // trusting exp: if m is still -inf, t = -inf - -inf = NaN, and if m is
    // finite, t * e = -inf * 0 = NaN. A NaN z is live and poisons s.
    const bool live = z[k] != neg_inf<acc_t>();
    st.s += live ? e : acc_t(0);
    st.w += live ? t * e : acc_t(0);
  }
}

// Block-wide merge; the result is valid in thread 0. Ends with a barrier so
// the caller may reuse `smem` for the next row.
template <typename acc_t, int BLOCK>
__device__ __forceinline__ OnlineState<acc_t> block_reduce(
    OnlineState<acc_t> st, OnlineState<acc_t>* smem, acc_t inv_t) {
  constexpr int kWarps = BLOCK / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    OnlineState<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    st = merge(st, o, inv_t);
  }
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    // The identity (-inf, 0, 0) pads warps past kWarps: rescale leaves it 0.
    st = lane < kWarps ? smem[lane]
                       : OnlineState<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      OnlineState<acc_t> o;
      o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
      o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
      o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
      st = merge(st, o, inv_t);
    }
  }
  __syncthreads();
  return st;
}

// ---------------- forward ----------------

// Rows are handed out grid-stride, so N may exceed the 2^31 - 1 blocks of a
// grid; in practice gridDim.x == N and each block does one row.
template <typename scalar_t, typename acc_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK, (FwdMinBlocks<scalar_t, BLOCK>::value))
    logprobs_fwd_kernel(const scalar_t* __restrict__ logits,
                        const int64_t* __restrict__ labels,
                        acc_t* __restrict__ logprobs, acc_t* __restrict__ entropy,
                        acc_t* __restrict__ row_max, acc_t* __restrict__ log_s_out,
                        int64_t N, int64_t B, int V, int64_t stride_a,
                        int64_t stride_b, acc_t inv_t, int64_t ignore_index,
                        bool compute_entropy) {
  using V16 = Vec16<scalar_t>;
  constexpr int kN = V16::kN;
  constexpr int kUnroll = Unroll<scalar_t>::value;
  __shared__ OnlineState<acc_t> smem[BLOCK / 32];

  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const int64_t y = labels[r];  // same address for all threads: one broadcast
    if (y == ignore_index) {      // padding: never read (block-uniform branch)
      if (threadIdx.x == 0) logprobs[r] = entropy[r] = row_max[r] = log_s_out[r] = acc_t(0);
      continue;
    }
    const scalar_t* row = logits + (r / B) * stride_a + (r % B) * stride_b;
    const int head = vec_head(row, V);
    const int nvec = (V - head) / kN;
    const int body_end = head + nvec * kN;

    OnlineState<acc_t> st{neg_inf<acc_t>(), acc_t(0), acc_t(0)};
    // Scalar head (< kN elements) before the first 16-byte boundary.
    for (int j = threadIdx.x; j < head; j += BLOCK) {
      const acc_t z[1] = {Cvt<scalar_t>::to(row[j])};
      update(st, z, inv_t);
    }
    // Vector body: consecutive threads read consecutive 16 B, so each warp
    // load is 512 contiguous bytes.
    const V16* vrow = reinterpret_cast<const V16*>(row + head);
    int i = threadIdx.x;
    for (; i + (kUnroll - 1) * BLOCK < nvec; i += kUnroll * BLOCK) {
      V16 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = vrow[i + u * BLOCK];
      acc_t z[kUnroll * kN];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < kN; ++k) z[u * kN + k] = Cvt<scalar_t>::to(v[u].v[k]);
      }
      update(st, z, inv_t);
    }
    for (; i < nvec; i += BLOCK) {  // at most one vector per thread left
      const V16 v = vrow[i];
      acc_t z[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) z[k] = Cvt<scalar_t>::to(v.v[k]);
      update(st, z, inv_t);
    }
    // Scalar tail (< kN elements): V not a multiple of the vector width.
    for (int j = body_end + threadIdx.x; j < V; j += BLOCK) {
      const acc_t z[1] = {Cvt<scalar_t>::to(row[j])};
      update(st, z, inv_t);
    }

    st = block_reduce<acc_t, BLOCK>(st, smem, inv_t);
    if (threadIdx.x == 0) {
      // The caller rejects labels outside [0, V); a NaN here beats reading
      // out of bounds if one slips through.
      const acc_t x_y = (y >= 0 && y < V) ? Cvt<scalar_t>::to(row[y])
                                          : quiet_nan<acc_t>();
      // s == 0 only for a row of all -inf: NaN for the whole row (log 0 would
      // give lse = -inf but logprob = entropy = NaN; NaN everywhere is what
      // the CPU kernel gives). A NaN s falls through to NaN as well, and so
      // does a row whose lse = m / T + log s overflows (as on CPU).
      acc_t log_s = st.s > acc_t(0) ? log_(st.s) : quiet_nan<acc_t>();
      if (isinf(st.m * inv_t + log_s)) log_s = quiet_nan<acc_t>();  // lse overflows
      row_max[r] = st.m;
      log_s_out[r] = log_s;
      // H = log s - w / s: no cancellation between two large terms even with
      // logits of 1e4 (s >= 1, -w/s in [0, log V]).
      entropy[r] = compute_entropy ? log_s - st.w / st.s : acc_t(0);
      // (x_y - m) / T - log s == z_y - lse, but x_y - m is exact when x_y is
      // near the max, so no ulp of the offset is lost (0.5 at 1e7).
      logprobs[r] = (x_y - st.m) * inv_t - log_s;
    }
  }
}

// ---------------- backward ----------------

template <typename scalar_t, int BLOCK>
__device__ __forceinline__ void zero_row(scalar_t* out, int V) {
  using V16 = Vec16<scalar_t>;
  constexpr int kN = V16::kN;
  const int head = vec_head(out, V);
  const int nvec = (V - head) / kN;
  // All-zero bits are +0 in every float format.
  for (int j = threadIdx.x; j < head; j += BLOCK) out[j] = Cvt<scalar_t>::from(0.0f);
  uint4* vout = reinterpret_cast<uint4*>(out + head);
  for (int i = threadIdx.x; i < nvec; i += BLOCK) vout[i] = make_uint4(0u, 0u, 0u, 0u);
  for (int j = head + nvec * kN + threadIdx.x; j < V; j += BLOCK)
    out[j] = Cvt<scalar_t>::from(0.0f);
}

template <typename acc_t, bool HAS_GH>
struct BwdRow {
  acc_t m, log_s, mu, g_lp, g_h, inv_t;  // mu = E_p[d]

  // d logit for one raw logit x; is_y: this is the label's column.
  // d = (x - m) / T, not x / T - lse: one FADD more, exact to the spread.
  __device__ __forceinline__ acc_t operator()(acc_t x, bool is_y) const {
    const acc_t d = (x - m) * inv_t;
    const acc_t p = exp_(d - log_s);  // x = -inf: exp(-inf) = 0
    acc_t dz = (is_y ? g_lp : acc_t(0)) - g_lp * p;
    if (HAS_GH) {
      // p == 0 (x = -inf, or underflow): the term is 0, but d - mu may be
      // -inf and 0 * -inf = NaN. A NaN p skips this too but is already in dz.
      dz -= g_h * (p > acc_t(0) ? p * (d - mu) : acc_t(0));
    }
    return dz * inv_t;
  }
};

// The vector body of a backward row: nvec 16-byte vectors from vrow to
// vout. VEC_OUT = false when vout is not 16-byte aligned (see below): the
// same loads, scalar stores. A template rather than a branch in the loop, so
// each copy keeps only its own addresses live.
template <bool VEC_OUT, int BLOCK, typename scalar_t, typename F>
__device__ __forceinline__ void bwd_body(const Vec16<scalar_t>* __restrict__ vrow,
                                         scalar_t* __restrict__ vout, int nvec,
                                         const F& f) {
  using V16 = Vec16<scalar_t>;
  using C = Cvt<scalar_t>;
  constexpr int kN = V16::kN;
  constexpr int kUnroll = Unroll<scalar_t>::value;
  auto grad = [&](const V16& v, int idx) {
    V16 o;
#pragma unroll
    for (int k = 0; k < kN; ++k) o.v[k] = C::from(f(C::to(v.v[k]), false));
    if (VEC_OUT) {
      reinterpret_cast<V16*>(vout)[idx] = o;
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) vout[idx * kN + k] = o.v[k];
    }
  };
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * BLOCK < nvec; i += kUnroll * BLOCK) {
    V16 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = vrow[i + u * BLOCK];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) grad(v[u], i + u * BLOCK);
  }
  for (; i < nvec; i += BLOCK) grad(vrow[i], i);  // at most one left per thread
}

// Reads the row once and writes grad once: 2 x 297 KiB per bf16 row at
// V = 151936. p is recomputed from the saved m and log s, so no softmax is
// stored.
template <typename scalar_t, typename acc_t, int BLOCK, bool HAS_GH>
__global__ void __launch_bounds__(BLOCK, (BwdMinBlocks<scalar_t, BLOCK>::value))
    logprobs_bwd_kernel(const acc_t* __restrict__ grad_logprobs,
                        const acc_t* __restrict__ grad_entropy,
                        const scalar_t* __restrict__ logits,
                        const int64_t* __restrict__ labels,
                        const acc_t* __restrict__ row_max,
                        const acc_t* __restrict__ log_s,
                        const acc_t* __restrict__ entropy,
                        scalar_t* __restrict__ grad_logits, int64_t N, int64_t B,
                        int V, int64_t stride_a, int64_t stride_b, acc_t inv_t,
                        int64_t ignore_index) {
  using V16 = Vec16<scalar_t>;
  using C = Cvt<scalar_t>;
  constexpr int kN = V16::kN;

  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    scalar_t* out = grad_logits + r * V;  // (A, B, V) contiguous
    const int64_t y = labels[r];
    if (y == ignore_index) {
      zero_row<scalar_t, BLOCK>(out, V);
      continue;
    }
    const scalar_t* row = logits + (r / B) * stride_a + (r % B) * stride_b;
    BwdRow<acc_t, HAS_GH> f;
    f.m = row_max[r];
    f.log_s = log_s[r];
    f.mu = HAS_GH ? f.log_s - entropy[r] : acc_t(0);
    f.g_lp = grad_logprobs[r];
    f.g_h = HAS_GH ? grad_entropy[r] : acc_t(0);
    f.inv_t = inv_t;

    // Every element first as a non-label one; the label's column is
    // rewritten below. Keeping "j == y" out of the loop saves a 64-bit
    // compare per element and the registers that made ptxas spill.
    const int head = vec_head(row, V);
    const int nvec = (V - head) / kN;
    const int body_end = head + nvec * kN;

    for (int j = threadIdx.x; j < head; j += BLOCK)
      out[j] = C::from(f(C::to(row[j]), false));
    const V16* vrow = reinterpret_cast<const V16*>(row + head);
    // Vector stores need out + head on a 16-byte boundary too. True whenever
    // the logits are contiguous (same offset r * V); a strided view (e.g. a
    // slice of a wider buffer) may land on another phase: scalar stores then.
    if (reinterpret_cast<uintptr_t>(out + head) % 16 == 0) {
      bwd_body<true, BLOCK>(vrow, out + head, nvec, f);
    } else {
      bwd_body<false, BLOCK>(vrow, out + head, nvec, f);
    }
    for (int j = body_end + threadIdx.x; j < V; j += BLOCK)
      out[j] = C::from(f(C::to(row[j]), false));

    // The label's column in full, computed once from the logit, so a bf16
    // gradient is rounded once (as on the CPU). __syncthreads orders this
    // store after the block's own store of the non-label value to the same
    // address; the other threads do not wait for the rewrite.
    __syncthreads();
    if (threadIdx.x == 0 && y >= 0 && y < V)  // range: see the forward
      out[y] = C::from(f(C::to(row[y]), true));
  }
}

// ---------------- launch configuration ----------------

// Threads per row from the row's size in 16-byte vectors, so every thread
// gets a few vectors: V = 151936 bf16 is 18992 vectors -> 1024 threads x
// ~18.5 (the backward takes 512 x ~37); V = 32000 bf16 is 4000 -> 512 x
// ~7.8; V = 1003 bf16 is 125 -> 128 x ~1. Smaller rows (V < ~1000) still get
// 128 threads, mostly idle; a warp-per-row kernel would serve them better.
template <typename scalar_t>
inline int pick_block(int V) {
  const int nvec = V / Vec16<scalar_t>::kN;
  if (nvec <= 512) return 128;
  if (nvec <= 2048) return 256;
  if (nvec <= 8192) return 512;
  return 1024;
}

// gridDim.x may be up to 2^31 - 1; rows beyond that loop inside the kernel.
inline unsigned grid_for(int64_t N) {
  constexpr int64_t kMaxGrid = 2147483647;
  return static_cast<unsigned>(N < kMaxGrid ? N : kMaxGrid);
}

template <typename scalar_t, int BLOCK>
void launch_fwd_block(const scalar_t* logits, const int64_t* labels,
                      acc_type_t<scalar_t>* logprobs, acc_type_t<scalar_t>* entropy,
                      acc_type_t<scalar_t>* row_max, acc_type_t<scalar_t>* log_s,
                      int64_t N, int64_t B, int V, int64_t stride_a, int64_t stride_b,
                      acc_type_t<scalar_t> inv_t, int64_t ignore_index,
                      bool compute_entropy, cudaStream_t stream) {
  logprobs_fwd_kernel<scalar_t, acc_type_t<scalar_t>, BLOCK>
      <<<grid_for(N), BLOCK, 0, stream>>>(logits, labels, logprobs, entropy, row_max,
                                          log_s, N, B, V, stride_a, stride_b, inv_t,
                                          ignore_index, compute_entropy);
}

template <typename scalar_t, int BLOCK, bool HAS_GH>
void launch_bwd_block(const acc_type_t<scalar_t>* grad_logprobs,
                      const acc_type_t<scalar_t>* grad_entropy,
                      const scalar_t* logits, const int64_t* labels,
                      const acc_type_t<scalar_t>* row_max,
                      const acc_type_t<scalar_t>* log_s,
                      const acc_type_t<scalar_t>* entropy, scalar_t* grad_logits,
                      int64_t N, int64_t B, int V, int64_t stride_a,
                      int64_t stride_b, acc_type_t<scalar_t> inv_t,
                      int64_t ignore_index, cudaStream_t stream) {
  logprobs_bwd_kernel<scalar_t, acc_type_t<scalar_t>, BLOCK, HAS_GH>
      <<<grid_for(N), BLOCK, 0, stream>>>(grad_logprobs, grad_entropy, logits,
                                          labels, row_max, log_s, entropy,
                                          grad_logits, N, B, V, stride_a, stride_b,
                                          inv_t, ignore_index);
}

template <typename scalar_t, bool HAS_GH>
void launch_bwd_gh(const acc_type_t<scalar_t>* grad_logprobs,
                   const acc_type_t<scalar_t>* grad_entropy, const scalar_t* logits,
                   const int64_t* labels, const acc_type_t<scalar_t>* row_max,
                   const acc_type_t<scalar_t>* log_s,
                   const acc_type_t<scalar_t>* entropy, scalar_t* grad_logits,
                   int64_t N, int64_t B, int V, int64_t stride_a,
                   int64_t stride_b, acc_type_t<scalar_t> inv_t,
                   int64_t ignore_index, cudaStream_t stream) {
#define RLHF_FAST_LOGPROBS_BWD(BLOCK)                                              \
  launch_bwd_block<scalar_t, BLOCK, HAS_GH>(grad_logprobs, grad_entropy, logits,  \
                                            labels, row_max, log_s, entropy,       \
                                            grad_logits, N, B, V, stride_a,        \
                                            stride_b, inv_t, ignore_index, stream)
  switch (pick_block<scalar_t>(V)) {  // 1024 -> 512: see BwdMinBlocks
    case 128: RLHF_FAST_LOGPROBS_BWD(128); break;
    case 256: RLHF_FAST_LOGPROBS_BWD(256); break;
    default: RLHF_FAST_LOGPROBS_BWD(512); break;
  }
#undef RLHF_FAST_LOGPROBS_BWD
}

}  // namespace logprobs_detail

template <typename scalar_t>
cudaError_t launch_logprobs_fwd(const scalar_t* logits, const int64_t* labels,
                                acc_type_t<scalar_t>* logprobs,
                                acc_type_t<scalar_t>* entropy,
                                acc_type_t<scalar_t>* row_max,
                                acc_type_t<scalar_t>* log_s, int64_t A, int64_t B,
                                int64_t V, int64_t stride_a, int64_t stride_b,
                                double inv_temperature, int64_t ignore_index,
                                bool compute_entropy, cudaStream_t stream) {
  using namespace logprobs_detail;
  using acc_t = acc_type_t<scalar_t>;
  if (V < 0 || V > kLogprobsMaxVocab) return cudaErrorInvalidValue;
  const int64_t N = A * B;
  if (N <= 0) return cudaSuccess;  // a 0-block grid is a launch error
  const int Vi = static_cast<int>(V);
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
#define RLHF_FAST_LOGPROBS_FWD(BLOCK)                                            \
  launch_fwd_block<scalar_t, BLOCK>(logits, labels, logprobs, entropy, row_max,   \
                                    log_s, N, B, Vi, stride_a, stride_b, inv_t,   \
                                    ignore_index, compute_entropy, stream)
  switch (pick_block<scalar_t>(Vi)) {
    case 128: RLHF_FAST_LOGPROBS_FWD(128); break;
    case 256: RLHF_FAST_LOGPROBS_FWD(256); break;
    case 512: RLHF_FAST_LOGPROBS_FWD(512); break;
    default: RLHF_FAST_LOGPROBS_FWD(1024); break;
  }
#undef RLHF_FAST_LOGPROBS_FWD
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_logprobs_bwd(const acc_type_t<scalar_t>* grad_logprobs,
                                const acc_type_t<scalar_t>* grad_entropy,
                                const scalar_t* logits, const int64_t* labels,
                                const acc_type_t<scalar_t>* row_max,
                                const acc_type_t<scalar_t>* log_s,
                                const acc_type_t<scalar_t>* entropy,
                                scalar_t* grad_logits, int64_t A, int64_t B,
                                int64_t V, int64_t stride_a, int64_t stride_b,
                                double inv_temperature, int64_t ignore_index,
                                cudaStream_t stream) {
  using namespace logprobs_detail;
  using acc_t = acc_type_t<scalar_t>;
  if (V < 0 || V > kLogprobsMaxVocab) return cudaErrorInvalidValue;
  const int64_t N = A * B;
  if (N <= 0 || V == 0) return cudaSuccess;  // nothing to write
  const int Vi = static_cast<int>(V);
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  // Without grad_entropy the p * (z - mu) term is compiled out, not
  // multiplied by zero: a loss on logprobs alone is the common case.
  if (grad_entropy != nullptr) {
    launch_bwd_gh<scalar_t, true>(grad_logprobs, grad_entropy, logits, labels,
                                  row_max, log_s, entropy, grad_logits, N, B, Vi,
                                  stride_a, stride_b, inv_t, ignore_index, stream);
  } else {
    launch_bwd_gh<scalar_t, false>(grad_logprobs, nullptr, logits, labels, row_max,
                                   log_s, entropy, grad_logits, N, B, Vi, stride_a,
                                   stride_b, inv_t, ignore_index, stream);
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace rlhf_fast

#endif  // defined(__CUDACC__)
