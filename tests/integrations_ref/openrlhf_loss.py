"""Oracle for openrlhf.models.loss PolicyLoss / ValueLoss (test-only re-implementation)."""
import torch
import torch.nn as nn

from integrations_ref.openrlhf_utils import masked_mean


class PolicyLoss(nn.Module):
    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo"):
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.dual_clip, self.token_level_loss, self.policy_loss_type = dual_clip, token_level_loss, policy_loss_type

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None):
        log_ratio = log_probs - old_log_probs
        ratio = log_ratio.exp()  # unclamped
        s1 = ratio * advantages
        s2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        best = torch.min(s1, s2)
        if self.dual_clip is not None:
            best = torch.where(advantages < 0, torch.max(best, self.dual_clip * advantages), best)
        loss = -best
        if self.token_level_loss:
            loss = masked_mean(loss, action_mask, dim=None)
        else:
            loss = masked_mean(loss, action_mask, dim=-1).mean()
        clip_ratio = masked_mean((s2 < s1).float(), action_mask, dim=None)
        ppo_kl = masked_mean(-log_ratio.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl


class ValueLoss(nn.Module):
    def __init__(self, clip_eps=None, token_level_loss=True):
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values, old_values, returns, action_mask=None):
        if self.clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
        else:
            loss = (values - returns) ** 2
        if self.token_level_loss:
            loss = masked_mean(loss, action_mask, dim=None)
        else:
            loss = masked_mean(loss, action_mask, dim=-1).mean()
        return 0.5 * loss
