"""Oracle for verl.trainer.ppo.core_algos (test-only re-implementation of the
documented semantics: masked positions skipped in GAE, clamped log-ratio, dual
clip, the four loss_agg_modes, the KL estimators)."""
import torch

from integrations_ref import verl_torch_functional as verl_F

ADV_ESTIMATOR_REGISTRY = {}
POLICY_LOSS_REGISTRY = {}


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    with torch.no_grad():
        B, T = values.shape
        nextv = torch.zeros(B, dtype=values.dtype)
        carry = torch.zeros(B, dtype=values.dtype)
        out = [None] * T
        for t in range(T - 1, -1, -1):
            m = response_mask[:, t]
            cand = token_level_rewards[:, t] + gamma * nextv - values[:, t] + gamma * lam * carry
            nextv = values[:, t] * m + (1 - m) * nextv
            carry = cand * m + (1 - m) * carry
            out[t] = carry
        adv = torch.stack(out, dim=1)
        returns = adv + values
        return verl_F.masked_whiten(adv, response_mask), returns


ADV_ESTIMATOR_REGISTRY["gae"] = compute_gae_advantage_return


def agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        return verl_F.masked_mean(loss_mat, loss_mask)
    per_seq = (loss_mat * loss_mask).sum(-1)
    if loss_agg_mode == "seq-mean-token-sum":
        return per_seq.mean()
    if loss_agg_mode == "seq-mean-token-mean":
        return (per_seq / loss_mask.sum(-1)).mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return per_seq.sum() / loss_mask.shape[-1]
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _clipped(old_log_prob, log_prob, advantages, response_mask, low, high, c, mode):
    assert c > 1.0
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = log_ratio.exp()
    ppo_kl = verl_F.masked_mean(-log_ratio, response_mask)
    a = -advantages * ratio
    b = -advantages * ratio.clamp(1 - low, 1 + high)
    worst = torch.maximum(a, b)
    clipfrac = verl_F.masked_mean((b > a).float(), response_mask)
    floor = -advantages * c
    lower = verl_F.masked_mean((worst > floor).float() * (advantages < 0).float(), response_mask)
    per_tok = torch.where(advantages < 0, torch.min(floor, worst), worst)
    return agg_loss(per_tok, response_mask, mode), clipfrac, ppo_kl, lower


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _clipped(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode)


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None):
    assert config is not None
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    c = config.get("clip_ratio_c", 3.0)
    return _clipped(old_log_prob, log_prob, advantages, response_mask, low, high, c, loss_agg_mode)


POLICY_LOSS_REGISTRY["vanilla"] = compute_policy_loss_vanilla


def get_policy_loss_fn(name):
    return POLICY_LOSS_REGISTRY[name]


def kl_penalty(logprob, ref_logprob, kl_penalty):
    d = logprob - ref_logprob
    if kl_penalty in ("kl", "k1"):
        return d
    if kl_penalty == "abs":
        return d.abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * d.square()
    if kl_penalty in ("low_var_kl", "k3"):
        k = torch.clamp(-d, -20, 20)
        return torch.clamp(k.exp() - k - 1, -10, 10)
    raise NotImplementedError
