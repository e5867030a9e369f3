// Every rlhf_fast schema, declared once. Kernels register against these names
// from csrc/cpu/*.cpp (CPU) and csrc/cuda/*_ops.cpp (CUDA); Python adds
// register_fake / register_autograd in rlhf_fast/ops/.
#include <torch/library.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(rlhf_fast, m) {
  // ---- log-probs and entropy from logits (rlhf_fast/ops/logprobs.py) ----
  // logits: (A, B, V), any strides on A and B, stride 1 on V; labels: (A, B).
  // Returns fp32 (fp64 for fp64 logits) log p(label), entropy and the per-row
  // log-sum-exp of logits / temperature, which backward reuses. Rows whose
  // label == ignore_index are never read and give 0.
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float temperature, "
      "int ignore_index) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  // d logits = (g_lp * (onehot - p) - g_H * p * (z - E_p[z])) / T, one pass,
  // p recomputed from lse; E_p[z] = lse - entropy. grad_entropy may be None.
  m.def(
      "logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor lse, Tensor entropy, float temperature, "
      "int ignore_index) -> Tensor");

  // ---- PPO losses (rlhf_fast/ops/ppo_loss.py) ----
  // Token tensors (B, T), any float dtype, math in fp32 (fp64 for fp64
  // logprobs / values); mask (B, T) bool or uint8, valid where != 0.
  // Forward returns the loss (0-dim), the stats (1-D, see ops/ppo_loss.py),
  // dtok = d loss_tok / d logprobs (B, T) in the accumulation dtype, 0 where
  // masked, and row_scale (B,): the aggregation weight of each row, so that
  // d loss / d logprobs = row_scale[:, None] * dtok.
  m.def(
      "ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
      "Tensor mask, Tensor? entropy, Tensor? ref_logprobs, float entropy_coef, "
      "float kl_coef, str kl_kind, float clip_low, float clip_high, "
      "float? dual_clip, str agg, float agg_norm) -> (Tensor loss, Tensor stats, "
      "Tensor dtok, Tensor row_scale)");
  // grad_logprobs = g * row_scale[b] * dtok; grad_entropy =
  // -entropy_coef * g * row_scale[b] * mask (a (0,) tensor unless has_entropy).
  // Also the backward of ppo_value_loss_fwd (has_entropy = false).
  m.def(
      "ppo_loss_bwd(Tensor grad_loss, Tensor dtok, Tensor row_scale, Tensor mask, "
      "float entropy_coef, bool has_entropy, ScalarType logp_dtype, "
      "ScalarType entropy_dtype) -> (Tensor grad_logprobs, Tensor grad_entropy)");
  // 0.5 * agg(max((v - R)^2, (clamp(v, v_old -+ clip) - R)^2)); stats =
  // (clipfrac, explained_variance); dtok = d loss_tok / d values.
  m.def(
      "ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, "
      "Tensor mask, float? clip, str agg, float agg_norm) -> (Tensor loss, "
      "Tensor stats, Tensor dtok, Tensor row_scale)");
  // Per-token KL estimate (k1, k2, k3, abs) in the accumulation dtype.
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, str kind) -> Tensor");
  m.def(
      "kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, "
      "str kind) -> Tensor");
}

namespace {

// Facts about this build, shown by rlhf_fast.info() / `rlhf-fast info`.
pybind11::dict build_info() {
  pybind11::dict info;
  std::vector<std::string> backends{"cpp"};
#ifdef RLHF_FAST_WITH_CUDA
  backends.push_back("cuda");
  info["cuda_archs"] = std::string(RLHF_FAST_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string("");
#endif
  info["backends"] = backends;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#if defined(__x86_64__)
  __builtin_cpu_init();
  info["cpu_avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  info["cpu_avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast compiled kernels; the ops live under torch.ops.rlhf_fast";
  m.def("build_info", &build_info, "Facts about how this extension was built");
}
