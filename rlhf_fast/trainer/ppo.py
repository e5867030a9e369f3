"""PPOTrainer: policy + critic + frozen reference + reward model or function.

One step (torchtune's PPO recipe, InstructGPT's objective):
  generate (rlhf_fast.generate) -> score -> old / ref log-probs and values ->
  KL-shaped token rewards (kl_penalty) -> gae -> whiten ->
  ppo_epochs x minibatches x grad_accum of ppo_loss + vf_coef * ppo_value_loss.
"""

from __future__ import annotations

import time

import torch

from ..ops import ppo_value_loss
from ..specs import RolloutCorrection
from . import packing
from .config import PPOConfig
from .models import ScalarHeadModel, response_logprobs, response_values
from .optimizer import make_optimizer
from .packing import PackedRollout, packed_logprobs, packed_loss_args, packed_values
from .policy_trainer import PolicyTrainer
from .rollout import (
    CORRECTION_STATS,
    Experience,
    advantages,
    fill_outside_kept,
    masked_mean,
    mismatch_metrics,
    scoring,
    shaped_rewards,
)


class PPOTrainer(PolicyTrainer):
    """policy, ref_policy: HF causal LMs (ref frozen); critic: ScalarHeadModel
    (ScalarHeadModel.from_causal_lm(policy) gives a value head on a copy of its
    trunk); reward: ScalarHeadModel (learned RM) or reward_fn(sequences,
    response_mask, prompt_length) -> (N,). prompt_ids, prompt_mask: (M, P)
    left-padded prompt pool; each step draws config.batch_size of them."""

    name = "ppo"

    def __init__(
        self,
        config: PPOConfig,
        policy,
        ref_policy,
        critic: ScalarHeadModel,
        reward,
        prompt_ids,
        prompt_mask=None,
        *,
        eos_token_id=None,
        pad_token_id=None,
        device=None,
    ):
        super().__init__(config, device or prompt_ids.device)
        self.policy, self.ref, self.critic, self.reward = policy, ref_policy, critic, reward
        self.ref.eval().requires_grad_(False)
        self.wrap(self.ref, trainable=False)
        self.setup_rollout(policy, reward, prompt_ids, prompt_mask, eos_token_id, pad_token_id)
        self.rollout_correction = RolloutCorrection.from_dict(config.rollout_correction)  # None: off
        self.critic_ddp = self.wrap(critic)  # before its optimizer: FSDP2 swaps the parameters
        self.copt, self.csched = make_optimizer(critic.parameters(), config, lr=config.critic_lr)
        self.stateful = {
            "policy": self.model_state(policy),
            "critic": self.model_state(critic),
            "opt": self.optimizer_state(policy, self.opt),
            "sched": self.sched,
            "critic_opt": self.optimizer_state(critic, self.copt),
            "critic_sched": self.csched,
            "kl_ctl": self.kl_ctl,
            "moments": self.moments,
        }
        self.updated = [(policy, self.opt, self.sched), (critic, self.copt, self.csched)]

    def step(self) -> dict:
        """One PPO step: the experience (rollout -> score -> log-probs and
        values -> KL-shaped rewards -> GAE advantages), then ppo_epochs x
        minibatches of micro_step, then the adaptive KL controller sees the
        measured KL."""
        exp = self.make_experience()
        metrics = {**exp.metrics, **self.update(exp, self.micro_step), **self.text_reward_metrics()}
        self.kl_ctl.update(metrics["kl"], self.config.batch_size)
        return metrics

    @torch.no_grad()
    def make_experience(self) -> Experience:
        c = self.config
        # rollout -> score (processed: EOS penalty, normalisation, clipping; non-finite ones zero-weighted)
        ro, _, scores, valid, reward_metrics, any_valid, t0 = self.rollout_and_score()
        t1 = time.perf_counter()
        # log-probs of the old policy and the reference, values of the critic; then
        # rewards: the score on the last token, minus beta * KL per token when kl_in_reward;
        # advantages: GAE (whitened when whiten_advantages). Packed (config.packing): on the packed response stream
        beta = self.kl_ctl.value if c.kl_in_reward else 0.0
        adv_args = {"gamma": c.gamma, "lam": c.lam, "whiten_advantages": c.whiten_advantages}
        pk = PackedRollout.from_rollout(ro) if c.packing else None
        if pk is None:
            args = (ro.sequences, ro.attention_mask, ro.response_mask, ro.prompt_length)
            old_lp, _ = response_logprobs(self.policy, *args, **scoring(c))
            ref_lp, _ = response_logprobs(self.ref, *args, **scoring(c))
            ref_lp, outside = fill_outside_kept(old_lp, ref_lp, ro.response_mask)
            values = response_values(self.critic, ro.sequences, ro.attention_mask, ro.prompt_length)
            t2 = time.perf_counter()
            rewards, kl = shaped_rewards(scores, old_lp, ref_lp, ro.response_mask, beta, c.kl_kind)
            adv, ret = advantages(rewards, values, ro.response_mask, **adv_args)
            seq_kl, mask, mismatch = kl.sum(-1), ro.response_mask, mismatch_metrics(old_lp, ro)
        else:
            old_lp, _ = packed_logprobs(self.policy, pk, **scoring(c))
            ref_lp, _ = packed_logprobs(self.ref, pk, **scoring(c))
            ref_lp, outside = fill_outside_kept(old_lp, ref_lp, pk.mask)
            values = packed_values(self.critic, pk)
            t2 = time.perf_counter()
            rewards, kl = packing.shaped_rewards(pk, scores, old_lp, ref_lp, beta, c.kl_kind)
            adv, ret = packing.advantages(pk, rewards, values, **adv_args)
            seq_kl, mask, mismatch = pk.segment_sum(kl), pk.mask, packing.mismatch_metrics(pk, old_lp)
        n_tok = int(ro.response_mask.sum())
        metrics = {
            **mismatch,  # always: the user sees the rollout/trainer gap
            **outside,
            **reward_metrics,
            "reward_processed": float(scores[valid].mean()) if any_valid else 0.0,
            "kl": float(seq_kl.mean()),
            "kl_token": masked_mean(kl, mask),
            "kl_coef": self.kl_ctl.value,
            "response_length": float(ro.lengths.float().mean()),
            "time/score": t1 - t0,
            "time/logprobs": t2 - t1,
            "tokens_per_s/logprobs": 3 * n_tok / max(t2 - t1, 1e-9),
            **ro.timings,
        }
        return Experience(
            ro, old_lp, adv, metrics, any_valid, ref_logprobs=ref_lp, values=values, returns=ret, packed=pk
        )

    def micro_step(self, mb: Experience, scale: float):
        """The backwards of one micro-batch: ppo_loss on the policy, the
        clipped value loss on the critic. Returns (detached loss, stats)."""
        c = self.config
        ro, pk = mb.rollout, mb.packed
        ploss, pst = self.policy_loss(mb, use_kl=not c.kl_in_reward and self.kl_ctl.value > 0)
        if pk is None:
            v = response_values(self.critic_ddp, ro.sequences, ro.attention_mask, ro.prompt_length)
            mask, layout = ro.response_mask, {}
        else:
            v, mask = packed_values(self.critic_ddp, pk), pk.mask
            layout = packed_loss_args(pk, c.loss_agg, ro.response_mask.shape[1])
        vloss, vst = ppo_value_loss(v, mb.values, mb.returns, mask, clip=c.value_clip, agg=c.loss_agg, **layout)
        stats = {
            "pg_loss": pst["pg_loss"],
            "entropy": pst["entropy"],
            "clipfrac": pst["clipfrac"],
            "approx_kl": pst["approx_kl"],
            "outside_kept_frac": pst["outside_kept_frac"],
            "value_loss": vloss,
            "vf_clipfrac": vst["clipfrac"],
            "explained_variance": vst["explained_variance"],
            **{k: pst[k] for k in CORRECTION_STATS if k in pst},
        }
        vloss = c.vf_coef * vloss
        # two backwards, not one: under DDP the policy's and the critic's gradient
        # all-reduces must reach the process group in the same order on every rank
        (ploss * scale).backward()
        (vloss * scale).backward()
        return ploss.detach() + vloss.detach(), stats
