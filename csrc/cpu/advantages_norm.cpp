// CPU whitening and group advantages (rlhf_fast::whiten,
// ::group_advantages): moments over the valid tokens of a batch or over
// the scores of each group, accumulated in double, two passes per chunk
// merged with Chan's formula (never E[x^2] - E[x]^2). One copy for every
// ISA: fp64 reductions over a memory-bound sweep (and a gather per group).

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "../acc_dtype.h"
#include "aten_lite.h"
#include "kernels.h"
#include "advantages_glue.h"
#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = 4096;

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

// Two passes over a chunk that is still in L1 (4096 elements, 16 KiB fp32),
// about a pivot p (the chunk's first valid value): mean = p + sum(x - p) / n.
// Tied values then give x - p = 0 exactly, so mean = p and M2 = 0 exactly;
// sum(x) / n is not exact (7 x -0.1 in fp64 gives a mean 1.4e-17 off, and
// with eps = 0 that whitened to -0.93 instead of 0).
template <typename T, typename M>
RLHF_FAST_INLINE Moments chunk_moments(const T* x, const M* m, M keep, int64_t n) {
  int64_t first = 0;
  while (first < n && (m[first] & mask_keep(keep)) == 0) ++first;
  Moments o;
  if (first == n) return o;
  const double p = static_cast<double>(to_acc(x[first]));
  double cnt = 0, sum = 0;
#pragma omp simd reduction(+ : cnt, sum)
  for (int64_t i = first; i < n; ++i) {
    const bool valid = (m[i] & mask_keep(keep)) != 0;
    const double xi = static_cast<double>(to_acc(x[i])) - p;
    cnt += blend(valid, 1.0, 0.0);
    sum += blend(valid, xi, 0.0);
  }
  const double dmean = sum / cnt;
  double m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = first; i < n; ++i) {
    const double d = (static_cast<double>(to_acc(x[i])) - p) - dmean;
    m2 += blend((m[i] & mask_keep(keep)) != 0, d * d, 0.0);
  }
  return {cnt, p + dmean, m2};
}

// One set of moments over n elements (any length): 4096-element chunks merged.
template <typename T, typename M>
Moments range_moments(const T* x, const M* m, M keep, int64_t n) {
  Moments tot;
  for (int64_t lo = 0; lo < n; lo += kChunkElems)
    tot = merge(tot, chunk_moments(x + lo, m + lo, keep, std::min(kChunkElems, n - lo)));
  return tot;
}

template <typename T, typename M, typename acc_t>
RLHF_FAST_INLINE void whiten_apply(const T* x, const M* m, M keep, acc_t* out,
                                   int64_t n, double mean, double rstd,
                                   double add) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double y = (static_cast<double>(to_acc(x[i])) - mean) * rstd + add;
    out[i] = blend((m[i] & mask_keep(keep)) != 0, static_cast<acc_t>(y), acc_t(0));
  }
}

constexpr int64_t kChunk = kChunkElems;

// n <= 1: variance 0 (verl raises); the valid element maps to 0.
inline double moments_rstd(const Moments& tot, double eps) {
  const double var = tot.n > 1 ? tot.m2 / (tot.n - 1) : 0.0;
  return 1.0 / std::sqrt(var + eps);
}

}  // namespace

at::Tensor whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                      bool shift_mean, double eps,
                      const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "rlhf_fast::whiten";
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected CPU tensors, got ",
              x_in.device());
  TORCH_CHECK(mask_in.sizes() == x_in.sizes(), op, ": mask must have shape ",
              x_in.sizes(), " (x's shape), got ", mask_in.sizes());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const bool per_segment = cu_seqlens.has_value() && cu_seqlens->defined();
  if (per_segment) check_1d(x_in, op, "x", x_in.sizes());
  const std::vector<int64_t> cu =
      per_segment ? read_cu_seqlens(op, *cu_seqlens, x_in.numel()) : std::vector<int64_t>{};
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = mask_for_kernel(mask_in).contiguous();
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor out = x.new_empty(x.sizes(), x.options().dtype(acc));
  const int64_t N = x.numel();
  if (N == 0) return out;
  if (per_segment) {  // one (mean, var) per segment, segments in parallel
    const int64_t S = static_cast<int64_t>(cu.size()) - 1;
    dispatch_value(x.scalar_type(), [&](auto* ttag) {
      using Tv = std::remove_pointer_t<decltype(ttag)>;
      using acc_t = acc_type<Tv>;
      dispatch_mask(m.scalar_type(), [&](auto keep) {
        using M = decltype(keep);
        const Tv* xp = reinterpret_cast<const Tv*>(x.const_data_ptr());
        const M* mp = reinterpret_cast<const M*>(m.const_data_ptr());
        acc_t* op_ = out.data_ptr<acc_t>();
        const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, N / std::max<int64_t>(S, 1)));
        at::parallel_for(0, S, grain, [&](int64_t b, int64_t e) {
          for (int64_t s = b; s < e; ++s) {
            const int64_t lo = cu[s], n = cu[s + 1] - cu[s];
            const Moments tot = range_moments(xp + lo, mp + lo, keep, n);
            whiten_apply(xp + lo, mp + lo, keep, op_ + lo, n, tot.mean, moments_rstd(tot, eps),
                         shift_mean ? 0.0 : tot.mean);
          }
        });
      });
    });
    return out;
  }
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  std::vector<Moments> parts(nchunks);
  dispatch_value(x.scalar_type(), [&](auto* ttag) {
    using Tv = std::remove_pointer_t<decltype(ttag)>;
    using acc_t = acc_type<Tv>;
    dispatch_mask(m.scalar_type(), [&](auto keep) {
      using M = decltype(keep);
      const Tv* xp = reinterpret_cast<const Tv*>(x.const_data_ptr());
      const M* mp = reinterpret_cast<const M*>(m.const_data_ptr());
      at::parallel_for(0, nchunks, 4, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          const int64_t lo = c * kChunk, len = std::min(kChunk, N - lo);
          parts[c] = chunk_moments(xp + lo, mp + lo, keep, len);
        }
      });
      Moments tot;  // serial merge: N / 4096 chunks, 512 at 2M elements
      for (const Moments& p : parts) tot = merge(tot, p);
      const double rstd = moments_rstd(tot, eps);
      const double add = shift_mean ? 0.0 : tot.mean;
      acc_t* op_ = out.data_ptr<acc_t>();
      at::parallel_for(0, nchunks, 4, [&](int64_t b, int64_t e) {
        const int64_t lo = b * kChunk, hi = std::min(e * kChunk, N);
        whiten_apply(xp + lo, mp + lo, keep, op_ + lo, hi - lo, tot.mean, rstd, add);
      });
    });
  });
  return out;
}

namespace {

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
  // about a pivot (the group's first score), as chunk_moments: tied scores
  // give exactly 0 deviations, so exactly 0 advantages
  const double p = static_cast<double>(to_acc(s[at_(0)]));
  double sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(to_acc(s[at_(k)])) - p;
  const double dmean = sum / n;
  double m2 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = (static_cast<double>(to_acc(s[at_(k)])) - p) - dmean;
    m2 += d * d;
  }
  const double nd = static_cast<double>(n);
  const double scale = est == 0 ? 1.0 / (std::sqrt(m2 / (nd - 1)) + eps)
                       : est == 2 ? nd / (nd - 1) : 1.0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = (static_cast<double>(to_acc(s[at_(k)])) - p) - dmean;
    out[at_(k)] = static_cast<acc_t>(d * scale);
  }
}

}  // namespace

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
  at::Tensor out = s.new_empty({N}, s.options().dtype(acc_dtype(s.scalar_type())));
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
    using acc_t = acc_type<Tv>;
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

}  // namespace cpu
}  // namespace rlhf_fast
