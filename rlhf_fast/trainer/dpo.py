"""DPOTrainer: sigmoid (Rafailov et al.) and IPO (Azar et al.) losses.

Sequence log-probs come from rlhf_fast.linear_logprobs on the trunk's final
hidden states and the lm_head weight, so the (B, T, V) logits are never
materialised: at V=152k and 2 x 16 x 2048 tokens that is 20 GB of fp32 logits
a plain forward would hold for the backward.
  sigmoid: -log sigmoid(beta * h)  (with label smoothing eps: conservative DPO)
  ipo:     (h / (n tokens average) - 1 / (2 beta))^2 on length-normalised log-probs
  h = (pi_c - ref_c) - (pi_r - ref_r)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Trainer
from .config import DPOConfig
from .data import cat_right_padded
from .models import register_fused_logprobs, sequence_logprobs_linear
from .optimizer import make_optimizer


class DPOTrainer(Trainer):
    """policy, ref_policy: HF causal LMs. chosen_ids, rejected_ids: (M, T)
    full sequences with attention masks and loss masks (1 on response tokens)."""

    name = "dpo"

    def __init__(
        self,
        config: DPOConfig,
        policy,
        ref_policy,
        chosen_ids,
        chosen_mask,
        chosen_loss_mask,
        rejected_ids,
        rejected_mask,
        rejected_loss_mask,
        *,
        device=None,
    ):
        super().__init__(config, device or chosen_ids.device)
        if config.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"DPOTrainer: loss_type must be 'sigmoid' or 'ipo', got {config.loss_type!r}")
        if config.beta <= 0:
            raise ValueError(f"DPOTrainer: beta must be > 0, got {config.beta}")
        self.policy, self.ref = policy, ref_policy
        ref_policy.eval().requires_grad_(False)
        # DDP: not wrapped (the fused path bypasses forward; all_reduce_grads instead).
        # FSDP2: sharded, then the fused path registered as a forward method.
        if self.parallel == "fsdp2":
            register_fused_logprobs(self.wrap(policy))
            register_fused_logprobs(self.wrap(ref_policy, trainable=False))
        self.data = (chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids, rejected_mask, rejected_loss_mask)
        self.opt, self.sched = make_optimizer(policy.parameters(), config)
        self.stateful = {
            "policy": self.model_state(policy),
            "opt": self.optimizer_state(policy, self.opt),
            "sched": self.sched,
        }

    def _logps(self, model, idx):
        cid, cm, cl, rid, rm, rl = (t[idx] for t in self.data)
        ids, mask, lmask = cat_right_padded(cid, rid), cat_right_padded(cm, rm), cat_right_padded(cl, rl)
        lp, n = sequence_logprobs_linear(model, ids, mask, lmask)
        k = idx.numel()
        return lp[:k], lp[k:], n[:k].clamp_min(1), n[k:].clamp_min(1)

    def loss(self, idx):
        c = self.config
        pc, pr, nc, nr = self._logps(self.policy, idx)
        with torch.no_grad():
            rc, rr, _, _ = self._logps(self.ref, idx)
        if c.loss_type == "ipo":
            h = (pc - rc) / nc - (pr - rr) / nr
            losses = (h - 1.0 / (2.0 * c.beta)) ** 2
        else:
            h = (pc - rc) - (pr - rr)
            eps = c.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(c.beta * h) - eps * F.logsigmoid(-c.beta * h)
        reward_c, reward_r = c.beta * (pc - rc).detach(), c.beta * (pr - rr).detach()
        return losses.mean(), {
            "reward_margin": (reward_c - reward_r).mean(),
            "reward_accuracy": (reward_c > reward_r).float().mean(),
        }

    def step(self) -> dict:
        self.policy.train()
        M = self.data[0].shape[0]
        pick = self.shard(torch.randperm(M, generator=self.cpu_gen)[: self.config.batch_size].to(self.data[0].device))
        loss, stats = self.accumulate(pick, self.loss)
        self.all_reduce_grads(self.policy.parameters())
        return self.optimizer_step(loss, stats)
