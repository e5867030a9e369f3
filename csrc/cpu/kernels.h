// The CPU kernels of the advantage and PPO-loss families, declared once for
// register_cpu.cpp, which registers them against ops.cpp's schemas. Their
// files then need no <torch/library.h> (3.7 s of parsing each, GCC 12).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace rlhf_fast {
namespace cpu {

// advantages_gae.cpp
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam,
                                           const std::optional<at::Tensor>& gamma_rows,
                                           const std::optional<at::Tensor>& lam_rows,
                                           const std::optional<at::Tensor>& cu_seqlens);
at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask, double gamma,
                                  const std::optional<at::Tensor>& gamma_rows,
                                  const std::optional<at::Tensor>& cu_seqlens);

// advantages_norm.cpp
at::Tensor whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean, double eps,
                      const std::optional<at::Tensor>& cu_seqlens);
at::Tensor group_advantages_cpu(const at::Tensor& scores_in, const std::optional<at::Tensor>& group_ids,
                                int64_t group_size, std::string estimator, double eps);

// ppo_policy_loss.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& ref_logprobs, double entropy_coef, double kl_coef,
    c10::string_view kl_kind, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg_s, double agg_norm, const std::optional<at::Tensor>& rollout_logprobs,
    c10::string_view rc_is, double rc_is_upper, std::optional<double> rc_is_lower, c10::string_view rc_rs,
    double rc_rs_lower, double rc_rs_upper, const std::optional<at::Tensor>& cu_seqlens);
std::tuple<at::Tensor, at::Tensor> ppo_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& dtok,
                                                    const at::Tensor& row_scale, const at::Tensor& mask,
                                                    double entropy_coef, bool has_entropy,
                                                    at::ScalarType logp_dtype, at::ScalarType entropy_dtype,
                                                    const std::optional<at::Tensor>& cu_seqlens);

// ppo_value_loss.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& mask, std::optional<double> clip, c10::string_view agg_s, double agg_norm,
    const std::optional<at::Tensor>& cu_seqlens);

// kl_penalty.cpp
at::Tensor kl_penalty_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                              c10::string_view kind_s);
at::Tensor kl_penalty_bwd_cpu(const at::Tensor& grad, const at::Tensor& logprobs,
                              const at::Tensor& ref_logprobs, c10::string_view kind_s);

}  // namespace cpu
}  // namespace rlhf_fast
