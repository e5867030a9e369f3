// Torch-free CUDA launcher for the GAE and discounted-return scans.
// Raw pointers, sizes, a stream; the torch glue (csrc/cuda/advantages_ops.cpp)
// does the checks and picks the dtypes. Kernels in csrc/cuda/advantages.cu.
//
// The recurrence per row, walked from t = T-1 down to 0, skipping masked t:
//   nv_t    = value at the next valid position after t (0 if none)
//   delta_t = r_t + gamma * nv_t - v_t
//   A_t     = delta_t + gamma * lam * A_(next valid)     (0 if none)
// As a scan over t: carry_t = a_t * carry_(t+1) + b_t with (a, b) =
// (gamma*lam, delta_t) at valid t and (1, 0) at masked t; maps compose as
// (a1, b1) then (a2, b2) = (a1*a2, a2*b1 + b2). nv is itself a reverse
// "last valid value" scan. Discounted returns: values 0, lam 1.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rlhf_fast {
namespace cuda {

enum class ValueType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };
enum class MaskType : int { kU8 = 0, kI8 = 1, kI32 = 2, kI64 = 3, kF32 = 4, kF64 = 5 };

struct ScanArgs {
  const void* rewards;  // (B, T), element stride 1, row stride stride_r
  const void* values;   // (B, T) or nullptr (discounted returns)
  const void* mask;     // (B, T); nonzero = valid
  int64_t stride_r, stride_v, stride_m;  // row strides, in elements
  ValueType value_type;  // of rewards and values (the glue makes them equal)
  MaskType mask_type;
  // Per-row discounts (B,) in the accumulation type, or nullptr to use the
  // scalars. lam is ignored without values.
  const void* gamma_rows;
  const void* lam_rows;
  double gamma, lam;
  void* advantages;  // (B, T) contiguous, float (double for kF64 values)
  void* returns;     // (B, T) contiguous, same type; nullptr without values
  int64_t B, T;
  // Packed layout (docs/packing.md): cu_seqlens (S + 1,) int32 (int64 when
  // cu_int64) offsets into 1-D streams of T tokens (B unused, row strides 0,
  // per-row discounts (S,)); nullptr for the padded layout.
  const void* cu_seqlens;
  bool cu_int64;
  int64_t S;
};

// Padded: one block per row, chunks of kScanThreads * kScanItems positions
// walked right to left with the carries kept between chunks; any T (tested
// to 128k). Packed: one warp per segment, chunks of 32 * kScanItems.
constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;

// Launches on `stream`; returns the launch error (cudaSuccess if none).
cudaError_t launch_advantage_scan(const ScanArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlhf_fast
