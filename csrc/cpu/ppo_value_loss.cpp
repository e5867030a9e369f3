// CPU clipped value loss (rlhf_fast::ppo_value_loss_fwd): one sweep over the
// token tensors, rows ((B, T) rows or packed segments, ppo_glue.h Rows) in
// parallel, producing the per-token gradient
// d loss_tok / d values (0 where masked) and fp64 row sums that a serial
// epilogue folds in row order (the same bits for any thread count); the
// backward is grad * row_scale[b] * dtok, done by the caller.
// Block sums use `omp simd` reductions, whose order follows the vector
// width: the ISA copies (baseline and AVX2, which AVX-512 CPUs run too)
// agree on dtok bit for bit, on the loss to rounding.

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../acc_dtype.h"
#include "aten_lite.h"
#include "kernels.h"
#include "parallel.h"
#include "ppo_glue.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/cpu_math.h"

namespace rlhf_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;  // tokens per acc_t partial sum, then fp64

// Gradient of max(a, b) as torch gives it: all to the winner, half to each on a tie.
template <typename acc_t>
RLHF_FAST_INLINE acc_t dmax(acc_t a, acc_t b, acc_t ga, acc_t gb) {
  return a > b ? ga : (b > a ? gb : acc_t(0.5) * (ga + gb));
}

struct ValueRow {
  double loss = 0, n = 0, clip = 0, mean_r = 0, m2_r = 0, mean_e = 0, m2_e = 0;
};

template <typename acc_t, bool CLIP>
struct ValueRowKernel {
  template <int W>
  static RLHF_FAST_INLINE void run(const acc_t* v, const acc_t* vo, const acc_t* ret, const uint8_t* mk,
                                   int64_t T, acc_t cr, acc_t* dtok, ValueRow* out) {
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
    *out = {loss, n, clip, mr, m2r, me, m2e};
  }
};

// The row kernel on two ISA copies, not three: in a same-run A/B (one Xeon
// core, (64, 4096) fp32, medians of 9 interleaved rounds) the AVX-512 copy
// took 0.63 ms and the AVX2 one 0.55 ms, so AVX-512 CPUs run the AVX2 copy;
// baseline x86-64 keeps its own (0.64 ms). fp64 (gradcheck, references)
// has one copy.
template <typename K, typename acc_t, typename... A>
RLHF_FAST_INLINE void value_row(A&&... a) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (active_isa() != Isa::kBaseline) return isa_copy_avx2<K>(std::forward<A>(a)...);
  }
  isa_copy_baseline<K>(std::forward<A>(a)...);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& mask, std::optional<double> clip, c10::string_view agg_s, double agg_norm,
    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "rlhf_fast::ppo_value_loss_fwd";
  check_float(values, op, "values");
  check_float(old_values, op, "old_values");
  check_float(returns, op, "returns");
  const Rows R = rows_of(values, cu_seqlens, op, "values");
  const auto shape = values.sizes();
  const at::Tensor v = values.contiguous();
  const at::Tensor vo = prep(old_values, shape, op, "old_values");
  const at::Tensor ret = prep(returns, shape, op, "returns");
  const at::Tensor mk = prep_mask(mask, shape, op);
  TORCH_CHECK(!clip.has_value() || *clip > 0, op, ": clip must be > 0 or None");
  const Agg agg = parse_agg(std::string(agg_s), op);
  const double norm = packed_norm(R, agg_norm, op);
  const int64_t B = R.n, L = R.max_len;
  const auto acc = acc_dtype(v.scalar_type());
  at::Tensor dtok = v.new_empty(shape, v.options().dtype(acc));
  std::vector<ValueRow> rows(B);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mk.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_value_loss_fwd", [&] {
    using acc_t = scalar_t;
    const auto s_v = src_of<acc_t>(v), s_vo = src_of<acc_t>(vo), s_r = src_of<acc_t>(ret);
    const acc_t cr = acc_t(clip.value_or(0.0));
    acc_t* dp = dtok.data_ptr<acc_t>();
    if (R.total > 0)
      at::parallel_for(0, B, rows_per_task(R.mean_len()), [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> buf(3 * L);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t o = R.start(b), T = R.len(b);
          const acc_t* pv = s_v.row(o, T, buf.data());
          const acc_t* pvo = s_vo.row(o, T, buf.data() + L);
          const acc_t* pr = s_r.row(o, T, buf.data() + 2 * L);
          if (clip.has_value())
            value_row<ValueRowKernel<acc_t, true>, acc_t>(pv, pvo, pr, m + o, T, cr, dp + o, &rows[b]);
          else
            value_row<ValueRowKernel<acc_t, false>, acc_t>(pv, pvo, pr, m + o, T, cr, dp + o, &rows[b]);
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
    scale[b] = row_scale_of(agg, r.n, N, S, norm);
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
  at::Tensor stats = tensor_of(v, {N > 0 ? clipn / N : 0.0, ev}, acc);
  at::Tensor loss_t = scalar_of(v, loss, acc);
  at::Tensor row_scale = tensor_of(v, scale, acc);
  return {loss_t, stats, dtok, row_scale};
}

}  // namespace cpu
}  // namespace rlhf_fast
