// CPU per-token KL estimators (rlhf_fast::kl_penalty_fwd / _bwd): one
// elementwise sweep, the math in rlhf_fast/kl_estimators.h (shared with the
// fused policy loss's KL term). Elementwise, so every ISA copy gives the
// same bits.

#include <string>
#include <type_traits>

#include "../acc_dtype.h"
#include "aten_lite.h"
#include "kernels.h"
#include "parallel.h"
#include "ppo_glue.h"
#include "rlhf_fast/cpu_isa.h"
#include "rlhf_fast/kl_estimators.h"

namespace rlhf_fast {
namespace cpu {
namespace {

// BWD = false: out = kl(lp, ref); true: out = g * d kl / d lp.
template <typename acc_t, int KL, bool BWD>
struct KlSweep {
  template <int W>
  static RLHF_FAST_INLINE void run(const acc_t* g, const acc_t* lp, const acc_t* ref, acc_t* out, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      acc_t v, d;
      kl_term<KL>(lp[i], ref[i], v, d);
      out[i] = BWD ? g[i] * d : v;
    }
  }
};

template <typename F>
void dispatch_kl(int kind, F&& f) {
  switch (kind) {
    case kK1: return f(std::integral_constant<int, kK1>{});
    case kK2: return f(std::integral_constant<int, kK2>{});
    case kK3: return f(std::integral_constant<int, kK3>{});
    default: return f(std::integral_constant<int, kAbs>{});
  }
}

// grad undefined: the forward.
at::Tensor kl_sweep(const char* op, const at::Tensor& grad, const at::Tensor& logprobs,
                    const at::Tensor& ref_logprobs, c10::string_view kind_s) {
  const int kind = parse_kl(std::string(kind_s), op);
  const auto acc = acc_dtype(logprobs.scalar_type());
  const at::Tensor lp = logprobs.to(acc).contiguous();
  const at::Tensor ref = prep(ref_logprobs, logprobs.sizes(), op, "ref_logprobs").to(acc).contiguous();
  const at::Tensor g = grad.defined() ? prep(grad, logprobs.sizes(), op, "grad").to(acc).contiguous() : grad;
  at::Tensor out = lp.new_empty(logprobs.sizes());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(acc, "kl_penalty", [&] {
    const scalar_t *a = lp.const_data_ptr<scalar_t>(), *r = ref.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_kl(kind, [&](auto K) {
      constexpr int kK = decltype(K)::value;
      at::parallel_for(0, n, kTaskElems, [&](int64_t i0, int64_t i1) {
        // fp64 (gradcheck, references): one copy; the ISA copies are for fp32
        auto sweep = [&](auto K_) {
          using Kern = decltype(K_);
          if constexpr (std::is_same_v<scalar_t, float>) isa_call<Kern>(gp ? gp + i0 : gp, a + i0, r + i0, o + i0, i1 - i0);
          else isa_copy_baseline<Kern>(gp ? gp + i0 : gp, a + i0, r + i0, o + i0, i1 - i0);
        };
        if (gp) sweep(KlSweep<scalar_t, kK, true>{});
        else sweep(KlSweep<scalar_t, kK, false>{});
      });
    });
  });
  return out;
}

}  // namespace

at::Tensor kl_penalty_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                              c10::string_view kind_s) {
  const char* op = "rlhf_fast::kl_penalty_fwd";
  check_float(logprobs, op, "logprobs");
  check_float(ref_logprobs, op, "ref_logprobs");
  return kl_sweep(op, at::Tensor(), logprobs, ref_logprobs, kind_s);
}

at::Tensor kl_penalty_bwd_cpu(const at::Tensor& grad, const at::Tensor& logprobs,
                              const at::Tensor& ref_logprobs, c10::string_view kind_s) {
  return kl_sweep("rlhf_fast::kl_penalty_bwd", grad, logprobs, ref_logprobs, kind_s)
      .to(logprobs.scalar_type());
}

}  // namespace cpu
}  // namespace rlhf_fast
