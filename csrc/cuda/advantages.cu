// CUDA GAE / discounted-return scan. A row is (offset, length): padded row b
// is (b * stride, T), packed segment s is (cu[s], cu[s + 1] - cu[s]); the
// same kernel body walks both. Padded rows get a block each, the row cut
// into chunks of 2048 positions (256 threads x 8) walked right to left.
// Packed segments get a warp each (8 per block, chunks of 256 positions):
// a packed batch is thousands of segments of ~200 tokens, and a block per
// 8-token segment would idle 255 of its 256 threads, so per token a short
// segment costs what a long one does. (A few very long segments use few
// warps: 8 segments of 10,000 tokens occupy 8 warps of the GPU.)
//
// Per chunk: coalesced loads into shared memory; each thread owns 8
// consecutive positions (thread 0 the rightmost); two block-wide exclusive
// scans over the threads (the "next valid value", then the affine carry map
// of GAE) seeded with the carries left by the chunk to the right; each thread
// finishes its 8 positions sequentially and the results leave through shared
// memory with coalesced stores. Every input byte is read once and every
// output byte written once: 17 bytes per position for fp32 rewards/values and
// a bool mask, 143 MB at (1024, 8192), so the kernel is bandwidth-bound.
// See rlhf_fast/advantages.cuh for the recurrence.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rlhf_fast/advantages.cuh"

namespace rlhf_fast {
namespace cuda {
namespace {

constexpr int kThreads = kScanThreads;  // per block, in both modes
constexpr int kItems = kScanItems;
static_assert(kThreads / 32 <= 32, "the warp-aggregate scan runs in one warp");

// Shared-memory index with one pad word per 32: thread j reading positions
// 8j .. 8j+7 would otherwise hit 8-way bank conflicts.
__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t load_acc(const T* p) { return static_cast<acc_t>(*p); }
template <>
__device__ __forceinline__ float load_acc<__nv_bfloat16, float>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ float load_acc<__half, float>(const __half* p) {
  return __half2float(*p);
}

template <typename M>
__device__ __forceinline__ bool load_valid(const M* p) { return *p != M(0); }

// ---------------- scan elements and block scan ----------------

template <typename acc_t>
struct Affine {  // carry -> a * carry + b
  acc_t a, b;
};
template <typename acc_t>
struct LastValid {  // the value at the valid position nearest the left end
  int has;
  acc_t v;
};

// `earlier` is the part to the right (applied first), `later` to its left.
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> combine(const Affine<acc_t>& earlier, const Affine<acc_t>& later) {
  return {later.a * earlier.a, later.a * earlier.b + later.b};
}
template <typename acc_t>
__device__ __forceinline__ LastValid<acc_t> combine(const LastValid<acc_t>& earlier, const LastValid<acc_t>& later) {
  return later.has ? later : earlier;
}

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> shfl_up(const Affine<acc_t>& x, int d) {
  return {__shfl_up_sync(0xffffffffu, x.a, d), __shfl_up_sync(0xffffffffu, x.b, d)};
}
template <typename acc_t>
__device__ __forceinline__ LastValid<acc_t> shfl_up(const LastValid<acc_t>& x, int d) {
  return {__shfl_up_sync(0xffffffffu, x.has, d), __shfl_up_sync(0xffffffffu, x.v, d)};
}
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> shfl_last(const Affine<acc_t>& x) {
  return {__shfl_sync(0xffffffffu, x.a, 31), __shfl_sync(0xffffffffu, x.b, 31)};
}
template <typename acc_t>
__device__ __forceinline__ LastValid<acc_t> shfl_last(const LastValid<acc_t>& x) {
  return {__shfl_sync(0xffffffffu, x.has, 31), __shfl_sync(0xffffffffu, x.v, 31)};
}

// The threads that share a row: the block (THREADS = 256) or one warp (32).
template <int THREADS>
__device__ __forceinline__ void row_sync() {
  if constexpr (THREADS == 32) __syncwarp(); else __syncthreads();
}

// Exclusive scan over a row's THREADS threads in thread order (thread 0
// first), seeded with `identity`; `total` gets the combination of all of
// them. `warp_buf` holds 32 elements of shared memory (block mode only).
template <int THREADS, typename S>
__device__ __forceinline__ S row_exclusive_scan(S x, const S& identity, S* warp_buf, S& total) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x % THREADS) >> 5;
  S inc = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const S y = shfl_up(inc, d);
    if (lane >= d) inc = combine(y, inc);
  }
  S excl = shfl_up(inc, 1);
  if (lane == 0) excl = identity;
  if constexpr (kWarps == 1) {
    total = shfl_last(inc);
    return excl;
  } else {
    if (lane == 31) warp_buf[warp] = inc;
    __syncthreads();
    if (warp == 0) {
      S w = lane < kWarps ? warp_buf[lane] : identity;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const S y = shfl_up(w, d);
        if (lane >= d) w = combine(y, w);
      }
      if (lane < kWarps) warp_buf[lane] = w;  // inclusive prefix over warps
    }
    __syncthreads();
    if (warp > 0) excl = combine(warp_buf[warp - 1], excl);
    total = warp_buf[kWarps - 1];
    __syncthreads();  // warp_buf is reused by the next scan
    return excl;
  }
}

// ---------------- the kernel ----------------

// THREADS = 256: a block per row (padded, cu == nullptr); 32: a warp per
// row (packed: row s is segment s, its offsets clamped into [0, total], so
// bad offsets never read out of bounds; a segment whose offsets are out of
// order writes NaN over the tokens between them).
template <int THREADS, bool HAS_V, typename T, typename M, typename acc_t, typename C>
__global__ void __launch_bounds__(kThreads) advantage_scan_kernel(
    const T* __restrict__ rewards, const T* __restrict__ values, const M* __restrict__ mask,
    int64_t stride_r, int64_t stride_v, int64_t stride_m, const acc_t* __restrict__ gamma_rows,
    const acc_t* __restrict__ lam_rows, acc_t gamma_s, acc_t lam_s, acc_t* __restrict__ adv,
    acc_t* __restrict__ ret, int64_t n_cols, const C* __restrict__ cu, int64_t n_rows) {
  constexpr int kRowsPerBlock = kThreads / THREADS;
  constexpr int kRowChunk = THREADS * kItems;
  constexpr int kRowPadded = kRowChunk + kRowChunk / 32;
  __shared__ acc_t sh_r_all[kRowsPerBlock * kRowPadded];  // rewards in, advantages out
  __shared__ acc_t sh_v_all[HAS_V ? kRowsPerBlock * kRowPadded : 1];  // values in, returns out
  __shared__ unsigned char sh_m_all[kRowsPerBlock * kRowChunk];
  __shared__ Affine<acc_t> aff_buf[32];
  __shared__ LastValid<acc_t> nv_buf[32];

  const int group = threadIdx.x / THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + group;
  if (row >= n_rows) return;  // warp mode only: whole warps leave, no block barrier follows
  acc_t* sh_r = sh_r_all + group * kRowPadded;
  acc_t* sh_v = HAS_V ? sh_v_all + group * kRowPadded : sh_v_all;
  unsigned char* sh_m = sh_m_all + group * kRowChunk;
  int64_t off_r = row * stride_r, off_v = row * stride_v, off_m = row * stride_m, off_o = row * n_cols;
  int64_t n_pos = n_cols;
  if (cu != nullptr) {  // packed: n_cols is the stream's length (total)
    const int64_t a = min(max(static_cast<int64_t>(cu[row]), int64_t(0)), n_cols);
    const int64_t b = min(max(static_cast<int64_t>(cu[row + 1]), int64_t(0)), n_cols);
    if (b < a) {
      for (int64_t i = b + (threadIdx.x % THREADS); i < a; i += THREADS) {
        adv[i] = acc_t(NAN);
        if (HAS_V) ret[i] = acc_t(NAN);
      }
      return;
    }
    off_r = off_v = off_m = off_o = a;
    n_pos = b - a;
  }
  const T* r_row = rewards + off_r;
  const T* v_row = HAS_V ? values + off_v : nullptr;
  const M* m_row = mask + off_m;
  acc_t* adv_row = adv + off_o;
  acc_t* ret_row = HAS_V ? ret + off_o : nullptr;
  const acc_t gamma = gamma_rows ? gamma_rows[row] : gamma_s;
  const acc_t gl = HAS_V ? gamma * (lam_rows ? lam_rows[row] : lam_s) : gamma;

  acc_t carry = 0;     // advantage at the next valid position right of the chunk
  acc_t nv_carry = 0;  // value at that position (verl starts nextvalues at 0)
  const int tid = threadIdx.x % THREADS;

  for (int64_t hi = n_pos; hi > 0; hi -= kRowChunk) {
    const int64_t lo = hi > kRowChunk ? hi - kRowChunk : 0;
    const int len = static_cast<int>(hi - lo);
    for (int i = tid; i < len; i += THREADS) {  // coalesced loads
      const bool valid = load_valid(m_row + lo + i);
      sh_m[i] = valid;
      sh_r[pad(i)] = load_acc<T, acc_t>(r_row + lo + i);
      if (HAS_V) sh_v[pad(i)] = load_acc<T, acc_t>(v_row + lo + i);
    }
    row_sync<THREADS>();

    // Thread tid owns local positions [seg_lo, seg_hi), rightmost for tid 0.
    const int seg_hi = len - tid * kItems;
    const int seg_lo = seg_hi - kItems;

    // 1. next-valid value entering my segment from the right
    acc_t nv_in = nv_carry;
    if (HAS_V) {
      LastValid<acc_t> mine{0, acc_t(0)};
#pragma unroll
      for (int k = 0; k < kItems; ++k) {  // leftmost valid value wins
        const int i = seg_hi - 1 - k;
        if (i >= 0 && sh_m[i]) mine = {1, sh_v[pad(i)]};
      }
      LastValid<acc_t> total;
      const LastValid<acc_t> in = row_exclusive_scan<THREADS>(mine, LastValid<acc_t>{0, acc_t(0)}, nv_buf, total);
      if (in.has) nv_in = in.v;
      if (total.has) nv_carry = total.v;  // every thread computes the same
    }

    // 2. deltas and my segment's affine map, right to left
    acc_t delta[kItems];
    Affine<acc_t> map{acc_t(1), acc_t(0)};
    acc_t nv = nv_in;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = seg_hi - 1 - k;
      const bool valid = i >= 0 && sh_m[i];
      const acc_t vt = (HAS_V && i >= 0) ? sh_v[pad(i)] : acc_t(0);
      const acc_t d = (i >= 0 ? sh_r[pad(i)] : acc_t(0)) + gamma * nv - vt;
      delta[k] = d;
      if (valid) {
        map = {gl * map.a, gl * map.b + d};
        nv = vt;
      }
    }

    // 3. carry entering my segment
    Affine<acc_t> total_map;
    const Affine<acc_t> in_map = row_exclusive_scan<THREADS>(map, Affine<acc_t>{acc_t(1), acc_t(0)}, aff_buf, total_map);
    acc_t c = in_map.a * carry + in_map.b;

    // 4. outputs of my segment into shared memory (only my own slots)
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int i = seg_hi - 1 - k;
      if (i < 0 || i < seg_lo) continue;
      const bool valid = sh_m[i];
      if (valid) c = gl * c + delta[k];
      const acc_t vt = HAS_V ? sh_v[pad(i)] : acc_t(0);
      sh_r[pad(i)] = valid ? c : acc_t(0);
      if (HAS_V) sh_v[pad(i)] = valid ? c + vt : acc_t(0);
    }
    carry = total_map.a * carry + total_map.b;
    row_sync<THREADS>();
    for (int i = tid; i < len; i += THREADS) {  // coalesced stores
      adv_row[lo + i] = sh_r[pad(i)];
      if (HAS_V) ret_row[lo + i] = sh_v[pad(i)];
    }
    row_sync<THREADS>();  // shared memory is refilled by the next chunk
  }
}

// ---------------- dispatch ----------------

template <int THREADS, bool HAS_V, typename T, typename M, typename acc_t, typename C>
cudaError_t launch_rows(const ScanArgs& a, const C* cu, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / THREADS;
  const int64_t rows = cu ? a.S : a.B;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x limit
  advantage_scan_kernel<THREADS, HAS_V, T, M, acc_t, C><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.rewards), static_cast<const T*>(a.values), static_cast<const M*>(a.mask),
      a.stride_r, a.stride_v, a.stride_m, static_cast<const acc_t*>(a.gamma_rows),
      static_cast<const acc_t*>(a.lam_rows), static_cast<acc_t>(a.gamma), static_cast<acc_t>(a.lam),
      static_cast<acc_t*>(a.advantages), static_cast<acc_t*>(a.returns), a.T, cu, rows);
  return cudaGetLastError();
}

template <bool HAS_V, typename T, typename M, typename acc_t>
cudaError_t launch_typed(const ScanArgs& a, cudaStream_t stream) {
  if (a.cu_seqlens == nullptr)
    return launch_rows<kThreads, HAS_V, T, M, acc_t, int32_t>(a, nullptr, stream);
  if (a.cu_int64)
    return launch_rows<32, HAS_V, T, M, acc_t, int64_t>(a, static_cast<const int64_t*>(a.cu_seqlens), stream);
  return launch_rows<32, HAS_V, T, M, acc_t, int32_t>(a, static_cast<const int32_t*>(a.cu_seqlens), stream);
}

template <bool HAS_V, typename T, typename acc_t>
cudaError_t launch_mask(const ScanArgs& a, cudaStream_t s) {
  switch (a.mask_type) {
    case MaskType::kU8: return launch_typed<HAS_V, T, uint8_t, acc_t>(a, s);
    case MaskType::kI8: return launch_typed<HAS_V, T, int8_t, acc_t>(a, s);
    case MaskType::kI32: return launch_typed<HAS_V, T, int32_t, acc_t>(a, s);
    case MaskType::kI64: return launch_typed<HAS_V, T, int64_t, acc_t>(a, s);
    case MaskType::kF32: return launch_typed<HAS_V, T, float, acc_t>(a, s);
    case MaskType::kF64: return launch_typed<HAS_V, T, double, acc_t>(a, s);
  }
  return cudaErrorInvalidValue;
}

template <bool HAS_V>
cudaError_t launch_value(const ScanArgs& a, cudaStream_t s) {
  switch (a.value_type) {
    case ValueType::kF32: return launch_mask<HAS_V, float, float>(a, s);
    case ValueType::kBF16: return launch_mask<HAS_V, __nv_bfloat16, float>(a, s);
    case ValueType::kF16: return launch_mask<HAS_V, __half, float>(a, s);
    case ValueType::kF64: return launch_mask<HAS_V, double, double>(a, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_advantage_scan(const ScanArgs& args, cudaStream_t stream) {
  if (args.cu_seqlens ? (args.S == 0 || args.T == 0) : (args.B == 0 || args.T == 0)) return cudaSuccess;
  return args.values ? launch_value<true>(args, stream) : launch_value<false>(args, stream);
}

}  // namespace cuda
}  // namespace rlhf_fast
