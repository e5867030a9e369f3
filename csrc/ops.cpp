// Every rlhf_fast schema, declared once. Kernels register against these names
// from csrc/cpu/*.cpp (CPU) and csrc/cuda/*_ops.cpp (CUDA); Python adds
// register_fake / register_autograd in rlhf_fast/ops/.
#include <torch/library.h>

TORCH_LIBRARY(rlhf_fast, m) {
  // ---- log-probs and entropy from logits (rlhf_fast/ops/_logprobs.py) ----
  // logits: (A, B, V), any strides on A and B, stride 1 on V; labels: (A, B).
  // Returns fp32 (fp64 for fp64 logits) log p(label), entropy, and the row
  // statistics the backward reuses: row_max = max(logits) (raw, before 1/T)
  // and log_s = log sum exp(d), d = (logits - row_max) / T, so that
  // lse = row_max / T + log_s. Rows whose label == ignore_index are never
  // read and give 0. compute_entropy=False leaves the entropy output 0 (the
  // Triton kernel skips its w sums; the C++ and CUDA kernels still form them
  // in the same sweep, as the sampler's shared row statistics do).
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float temperature, "
      "int ignore_index, bool compute_entropy) -> (Tensor logprobs, Tensor entropy, "
      "Tensor row_max, Tensor log_s)");
  // d logits = (g_lp * (onehot - p) - g_H * p * (d - E_p[d])) / T, one pass,
  // with d = (x - row_max) / T, p = exp(d - log_s), E_p[d] = log_s - entropy:
  // every term is of the row's spread, not of its offset (p from an absolute
  // lse lost 0.29 of the gradient at logits of 1e7 in fp32). row_max may be
  // any shift >= the row's max whose log_s matches (vocab-parallel passes the
  // global one). grad_entropy may be None.
  m.def(
      "logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor row_max, Tensor log_s, Tensor entropy, float temperature, "
      "int ignore_index) -> Tensor");

  // ---- advantage estimators (rlhf_fast/ops/_advantages.py) ----
  // No backward: advantages are constants in PPO. Outputs fp32 (fp64 when an
  // input is fp64). Masks: bool or 0/1 of any dtype; masked positions are
  // skipped by the carries and give 0.
  // rewards, values, mask: (B, T), stride 1 on T, or with cu_seqlens packed
  // (total,) streams of S segments (docs/packing.md; the carries reset at
  // every segment). gamma_rows / lam_rows: optional (B,) or (S,) per-row
  // values that override the floats.
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, "
      "Tensor? gamma_rows, Tensor? lam_rows, Tensor? cu_seqlens=None) -> (Tensor advantages, Tensor returns)");
  m.def(
      "discounted_returns(Tensor rewards, Tensor mask, float gamma, "
      "Tensor? gamma_rows, Tensor? cu_seqlens=None) -> Tensor");
  // x, mask: same shape; whitened over every valid element, unbiased var.
  // With cu_seqlens: x, mask packed (total,), one mean / var per segment.
  m.def("whiten(Tensor x, Tensor mask, bool shift_mean, float eps, Tensor? cu_seqlens=None) -> Tensor");
  // scores: (N,); group_ids (N,) integer ids, or None and group_size > 0.
  m.def(
      "group_advantages(Tensor scores, Tensor? group_ids, int group_size, "
      "str estimator, float eps) -> Tensor");

  // ---- sampling (rlhf_fast/ops/_sampling.py) ----
  // logits: (B, V), stride 1 on V; seeds: (B,) int64, one counter-based
  // noise stream per row; temperature / top_p / min_p: (B,) float64; top_k:
  // (B,) int64. filtered=false skips top-k/top-p/min-p entirely. Returns the
  // sampled tokens (B,) int64, their fp32 log-prob under softmax(logits / T)
  // and under the truncated, renormalised distribution. temperature 0: greedy.
  m.def(
      "sample_fwd(Tensor logits, Tensor seeds, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, bool filtered) -> (Tensor tokens, "
      "Tensor logprobs, Tensor processed_logprobs)");
  // Scoring given labels (N,) under the sampler's truncation: logits (N, V),
  // per-row parameters (N,) as sample_fwd's (temperature > 0). Returns fp32
  // log-probs (-inf outside the kept set; 0 where label == ignore_index),
  // the truncated distribution's entropy (0 unless compute_entropy) and
  // stats (N, 3) = (max logit, threshold on (x - max) / T, log kept mass)
  // for the backward, which holds the kept set fixed.
  m.def(
      "processed_logprobs_fwd(Tensor logits, Tensor labels, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor min_p, int ignore_index, bool filtered, "
      "bool compute_entropy) -> (Tensor logprobs, Tensor entropy, Tensor stats)");
  m.def(
      "processed_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor temperature, Tensor stats, Tensor entropy, int ignore_index) "
      "-> Tensor");
  // ---- fused linear log-probs (rlhf_fast/ops/_linear_logprobs.py) ----
  // hidden: (N, H), weight: (V, H), bias: (V,) or None, labels: (N,).
  // Same outputs as logprobs_fwd(hidden @ weight.T + bias, ...) without the
  // (N, V) logits: CPU runs chunk_size tokens at a time (matmul + the fused
  // row pass), so the scratch is chunk_size * V floats. The CPU kernels are
  // Python compositions of logprobs_fwd / logprobs_bwd and at::mm, registered
  // from rlhf_fast/ops/_linear_logprobs.py.
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, float temperature, int ignore_index, int chunk_size) "
      "-> (Tensor logprobs, Tensor entropy, Tensor row_max, Tensor log_s)");
  // Recomputes each chunk's logits; grad_weight / grad_bias are accumulated
  // over tokens in fp32 and cast once. grad_bias is (0,) when bias is None.
  m.def(
      "linear_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, "
      "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor row_max, "
      "Tensor log_s, Tensor entropy, float temperature, int ignore_index, int chunk_size) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // ---- PPO losses (rlhf_fast/ops/_ppo_loss.py) ----
  // Token tensors (B, T), any float dtype, math in fp32 (fp64 for fp64
  // logprobs / values); mask (B, T) bool or uint8, valid where != 0. With
  // cu_seqlens ((S + 1,) int32 / int64, docs/packing.md) every token tensor
  // is packed (total,), the rows are its S segments and row_scale is (S,);
  // agg_norm = 0 then means the longest segment (seq-mean-token-sum-norm).
  // Forward returns the loss (0-dim), the stats (1-D, see ops/_ppo_loss.py),
  // dtok = d loss_tok / d logprobs (B, T) in the accumulation dtype, 0 where
  // masked, and row_scale (B,): the aggregation weight of each row, so that
  // d loss / d logprobs = row_scale[:, None] * dtok.
  // Rollout correction (rlhf_fast/reference/_rollout_correction.py): weights
  // of old vs rollout_logprobs (rc_is: none / token / sequence / geometric;
  // TIS at rc_is_upper, IcePop when rc_is_lower is given) scale the clipped
  // term; rc_rs (verl's rollout_rs option or "none") rejects tokens, and
  // keep (B, T) bool is the mask after rejection ((0,) without rc_rs).
  // stats gains 18 rollout_corr/* metrics (0 without rollout_logprobs).
  m.def(
      "ppo_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
      "Tensor mask, Tensor? entropy, Tensor? ref_logprobs, float entropy_coef, "
      "float kl_coef, str kl_kind, float clip_low, float clip_high, "
      "float? dual_clip, str agg, float agg_norm, Tensor? rollout_logprobs=None, "
      "str rc_is=\"none\", float rc_is_upper=2.0, float? rc_is_lower=None, "
      "str rc_rs=\"none\", float rc_rs_lower=0.0, float rc_rs_upper=0.0, "
      "Tensor? cu_seqlens=None) -> (Tensor loss, "
      "Tensor stats, Tensor dtok, Tensor row_scale, Tensor keep)");
  // grad_logprobs = g * row_scale[b] * dtok; grad_entropy =
  // -entropy_coef * g * row_scale[b] * mask (a (0,) tensor unless has_entropy).
  // Also the backward of ppo_value_loss_fwd (has_entropy = false).
  m.def(
      "ppo_loss_bwd(Tensor grad_loss, Tensor dtok, Tensor row_scale, Tensor mask, "
      "float entropy_coef, bool has_entropy, ScalarType logp_dtype, "
      "ScalarType entropy_dtype, Tensor? cu_seqlens=None) -> (Tensor grad_logprobs, "
      "Tensor grad_entropy)");
  // 0.5 * agg(max((v - R)^2, (clamp(v, v_old -+ clip) - R)^2)); stats =
  // (clipfrac, explained_variance); dtok = d loss_tok / d values.
  m.def(
      "ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, "
      "Tensor mask, float? clip, str agg, float agg_norm, Tensor? cu_seqlens=None) "
      "-> (Tensor loss, "
      "Tensor stats, Tensor dtok, Tensor row_scale)");
  // Per-token KL estimate (k1, k2, k3, abs) in the accumulation dtype.
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, str kind) -> Tensor");
  m.def(
      "kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, "
      "str kind) -> Tensor");
}

