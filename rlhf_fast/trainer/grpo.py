"""GRPOTrainer: critic-free, n samples per prompt, group-relative advantages.

One step: draw B prompts -> generate n responses each (prefilled once) ->
score -> group_advantages (GRPO / Dr.GRPO / RLOO / REINFORCE++ baseline) ->
broadcast over the response tokens -> ppo_epochs x minibatches x grad_accum
of ppo_loss, with KL to the reference as a loss term (k3 by default) or none.
"""

from __future__ import annotations

import time

import torch

from ..ops import expand_to_tokens, group_advantages, kl_penalty
from ..specs import RolloutCorrection
from . import packing
from .config import GRPOConfig
from .models import response_logprobs
from .packing import PackedRollout, packed_logprobs
from .policy_trainer import PolicyTrainer
from .rollout import CORRECTION_STATS, Experience, fill_outside_kept, mismatch_metrics, scoring


class GRPOTrainer(PolicyTrainer):
    """policy, ref_policy (None when kl_coef == 0): HF causal LMs; reward:
    ScalarHeadModel or reward_fn(sequences, response_mask, prompt_length)."""

    name = "grpo"

    def __init__(
        self,
        config: GRPOConfig,
        policy,
        ref_policy,
        reward,
        prompt_ids,
        prompt_mask=None,
        *,
        eos_token_id=None,
        pad_token_id=None,
        device=None,
    ):
        super().__init__(config, device or prompt_ids.device)
        if config.kl_coef > 0 and ref_policy is None:
            raise ValueError("GRPOTrainer: kl_coef > 0 needs ref_policy")
        self.policy, self.ref, self.reward = policy, ref_policy, reward
        if ref_policy is not None:
            ref_policy.eval().requires_grad_(False)
            self.wrap(ref_policy, trainable=False)
        self.setup_rollout(policy, reward, prompt_ids, prompt_mask, eos_token_id, pad_token_id)
        self.rollout_correction = RolloutCorrection.from_dict(config.rollout_correction)  # None: off
        self.stateful = {
            "policy": self.model_state(policy),
            "opt": self.optimizer_state(policy, self.opt),
            "sched": self.sched,
            "kl_ctl": self.kl_ctl,
            "moments": self.moments,
        }
        self.updated = [(policy, self.opt, self.sched)]

    def step(self) -> dict:
        """One GRPO step: the experience (rollout of num_samples per prompt ->
        score -> group advantages -> log-probs), then ppo_epochs x minibatches
        of micro_step, then the adaptive KL controller sees the measured KL
        (none without a reference)."""
        exp = self.make_experience()
        metrics = {**exp.metrics, **self.update(exp, self.micro_step), **self.text_reward_metrics()}
        if "kl" in metrics:
            self.kl_ctl.update(metrics["kl"], self.config.batch_size)
        return metrics

    @torch.no_grad()
    def make_experience(self) -> Experience:
        c = self.config
        # rollout -> score (processed; non-finite ones zero-weighted)
        ro, raw, scores, valid, reward_metrics, any_valid, t0 = self.rollout_and_score(c.num_samples)
        # a NaN/inf sample takes its group's mean of valid scores, so it moves
        # neither the group's baseline; its advantage is then masked out
        scores, raw_filled = _fill_group_mean(scores, valid, c.num_samples), _fill_group_mean(raw, valid, c.num_samples)
        # advantages: against the other samples of the same prompt, on every response token
        adv_seq = group_advantages(scores, c.num_samples, estimator=c.estimator)  # rows are prompt-major
        t1 = time.perf_counter()
        # log-probs of the old policy and the reference. Packed (config.packing): on the packed response stream
        pk = PackedRollout.from_rollout(ro) if c.packing else None
        if pk is None:
            adv = adv_seq[:, None].expand_as(ro.response_mask).float() * ro.response_mask
            args = (ro.sequences, ro.attention_mask, ro.response_mask, ro.prompt_length)
            old_lp, _ = response_logprobs(self.policy, *args, **scoring(c))
            ref_lp = response_logprobs(self.ref, *args, **scoring(c))[0] if self.ref is not None else None
            ref_lp, outside = fill_outside_kept(old_lp, ref_lp, ro.response_mask)
            mask, per_sample_sum, mismatch = ro.response_mask, (lambda x: x.sum(-1)), mismatch_metrics(old_lp, ro)
        else:
            adv = expand_to_tokens(adv_seq.float(), pk.cu_seqlens) * pk.mask
            old_lp, _ = packed_logprobs(self.policy, pk, **scoring(c))
            ref_lp = packed_logprobs(self.ref, pk, **scoring(c))[0] if self.ref is not None else None
            ref_lp, outside = fill_outside_kept(old_lp, ref_lp, pk.mask)
            mask, per_sample_sum, mismatch = pk.mask, pk.segment_sum, packing.mismatch_metrics(pk, old_lp)
        t2 = time.perf_counter()
        metrics = {
            **reward_metrics,
            "reward_std_in_group": float(raw_filled.view(-1, c.num_samples).std(-1).mean()),
            "response_length": float(ro.lengths.float().mean()),
            "time/score": t1 - t0,
            "time/logprobs": t2 - t1,
            **ro.timings,
        }
        metrics.update(mismatch)  # always: the user sees the rollout/trainer gap
        metrics.update(outside)
        if ref_lp is not None:
            metrics["kl"] = float(per_sample_sum(kl_penalty(old_lp, ref_lp, kind=c.kl_kind) * mask).mean())
        return Experience(ro, old_lp, adv, metrics, any_valid, ref_logprobs=ref_lp, packed=pk)

    def micro_step(self, mb: Experience, scale: float):
        """The backward of one micro-batch: ppo_loss, with the KL to the
        reference as a loss term. Returns (detached loss, stats)."""
        use_kl = mb.ref_logprobs is not None and self.kl_ctl.value > 0
        loss, st = self.policy_loss(mb, use_kl)
        (loss * scale).backward()
        return loss.detach(), {
            k: st[k]
            for k in ("pg_loss", "entropy", "clipfrac", "approx_kl", "outside_kept_frac") + CORRECTION_STATS
            if k in st
        }


def _fill_group_mean(x: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """x (B*n,) with the invalid entries replaced by their group's mean of valid ones (0 if none)."""
    g, v = x.view(-1, n), valid.view(-1, n)
    g0 = torch.where(v, g, torch.zeros_like(g))
    mean = g0.sum(-1, keepdim=True) / v.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(v, g, mean).view(-1)
