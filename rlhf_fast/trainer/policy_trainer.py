"""What PPO and GRPO share around their recipes: the prompts, the sampling
streams and the policy's optimizer (setup_rollout), a rollout scored and
cleaned of non-finite rewards (rollout_and_score), the policy's ppo_loss on a
minibatch (policy_loss) and the epochs of minibatch updates (update). Each
trainer's step() reads top to bottom: rollout -> score -> log-probs ->
rewards -> advantages -> update."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..generation.hf_args import check_prompt_rows
from ..ops import linear_ppo_loss, ppo_loss
from .base import Trainer
from .kl_controller import KLController
from .models import _left_padded_positions, head_loss, register_head_loss, response_logprobs
from .optimizer import guarded_step, make_optimizer
from .packing import packed_logprobs, packed_loss_args
from .reward_scaling import RunningMoments, process_scores
from .rewards import TextRewards
from .rollout import ScoredRollout, correction_args, mask_outside_kept, rollout, sample_prompts, score, scoring


class PolicyTrainer(Trainer):
    """A subclass sets `self.updated` ((model, optimizer, scheduler) each)
    and defines step() from these parts."""

    def setup_rollout(self, policy, reward, prompt_ids, prompt_mask, eos_token_id, pad_token_id) -> None:
        """What PPO and GRPO share: a frozen reward model, the prompts, one
        sampling stream per rank (rank 0's equals the single-process run's),
        the policy's DDP wrapper (or FSDP2 shards) and optimizer, KL control,
        reward moments."""
        config = self.config
        from .rewards import check_token_reward

        check_token_reward(reward)  # a wrong type or signature fails here, before the first rollout
        if isinstance(reward, torch.nn.Module):
            reward.eval().requires_grad_(False)
            self.wrap(reward, trainable=False)
        self.prompt_ids = prompt_ids
        self.prompt_mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
        # an empty prompt, or the longest + max_new_tokens past the policy's positions: fail here, not at step 1
        check_prompt_rows(self.name, policy, self.prompt_mask, config.max_new_tokens)
        self.eos, self.pad = eos_token_id, pad_token_id
        self.sample_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1 + 1000003 * self.rank)
        self.generators["sample"] = self.sample_gen
        self.policy_ddp = self.wrap(policy)
        # the update's policy loss straight from hidden states (linear_ppo_loss): the policy's
        # DDP wrapper is then bypassed (its gradients are all-reduced by hand, as DPO's)
        self.fused_policy_loss = config.policy_loss == "fused"
        if self.fused_policy_loss and self.parallel == "fsdp2":
            register_head_loss(self.policy_ddp)
        self.opt, self.sched = make_optimizer(policy.parameters(), config)
        self.kl_ctl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.moments = RunningMoments()

    @property
    def sync_group(self):
        """The process group whose ranks must run the same number of forwards
        (FSDP2 all-gathers weights inside each one); None when they need not."""
        return dist.group.WORLD if self.world_size > 1 and self.parallel == "fsdp2" else None

    def drop_nonfinite(self, ro, raw: torch.Tensor, valid: torch.Tensor):
        """Zero-weight the samples whose reward was NaN/inf: their response
        tokens leave the loss mask (the rows stay, so every DDP rank keeps the
        same shapes and number of optimizer steps). Returns (rollout, metrics,
        any_valid): any_valid is False when no rank has a valid sample, and
        then the update is skipped."""
        import dataclasses

        ro = dataclasses.replace(ro, response_mask=ro.response_mask & valid[:, None])
        n_valid = valid.sum()
        if self.world_size > 1:
            n_valid = n_valid.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(n_valid)
        finite = raw[valid]
        metrics = {
            "nonfinite_rewards": int((~valid).sum()),
            "samples": int(valid.numel()),
            "reward": float(finite.mean()) if finite.numel() else float("nan"),
        }
        return ro, metrics, int(n_valid) > 0

    def rollout_and_score(self, num_samples: int = 1) -> ScoredRollout:
        """What PPO and GRPO share at the start of an experience: draw
        batch_size prompts (this rank's share under torchrun), sample
        num_samples responses each, score them, process the scores and
        zero-weight the non-finite ones (drop_nonfinite). The caller ends
        "time/score" (it may add its own advantage math to it)."""
        c = self.config
        ids, mask, rows = sample_prompts(self.prompt_ids, self.prompt_mask, c.batch_size, self.cpu_gen)
        # under torchrun: this rank's share of the global batch
        ids, mask, rows = self.shard(ids), self.shard(mask), self.shard(rows)
        if isinstance(self.reward, TextRewards):  # its functions read the drawn rows' other dataset columns
            self.reward.set_batch(rows.tolist(), expected_prompt_ids=ids)
            self.reward.metrics = {}
        ro = rollout(
            self.policy,
            ids,
            mask,
            c,
            self.sample_gen,
            num_samples=num_samples,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            sync_group=self.sync_group,
        )
        t0 = time.perf_counter()
        raw = score(self.reward, ro)
        scores, valid = process_scores(raw, c, self.moments, ro.truncated(self.eos))
        ro, reward_metrics, any_valid = self.drop_nonfinite(ro, raw, valid)
        return ScoredRollout(ro, raw, scores, valid, reward_metrics, any_valid, t0)

    def policy_loss(self, mb, use_kl: bool):
        """What PPO and GRPO share in a micro-batch: the policy's log-probs and
        entropy of mb's responses (through the DDP / FSDP2 wrapper) and
        ppo_loss on them, with the KL to mb.ref_logprobs as a loss term when
        use_kl. Returns ppo_loss's (loss, stats)."""
        c = self.config
        ro, pk = mb.rollout, mb.packed
        if self.fused_policy_loss:
            return self.fused_loss(mb, use_kl)
        if pk is None:
            logp, ent = response_logprobs(
                self.policy_ddp,
                ro.sequences,
                ro.attention_mask,
                ro.response_mask,
                ro.prompt_length,
                return_entropy=True,
                **scoring(c),
            )
            mask, layout = ro.response_mask, correction_args(self.rollout_correction, ro)
        else:
            logp, ent = packed_logprobs(self.policy_ddp, pk, return_entropy=True, **scoring(c))
            mask, layout = pk.mask, packed_loss_args(pk, c.loss_agg, ro.response_mask.shape[1])
            if self.rollout_correction is not None and pk.sampler_logprobs is not None:
                layout.update(rollout_logprobs=pk.sampler_logprobs, rollout_correction=self.rollout_correction)
        kw = self.loss_args(mb, use_kl)
        roll = layout.get("rollout_logprobs")
        mask, outside = mask_outside_kept(mask, logp.detach(), mb.old_logprobs, kw["ref_logprobs"], roll)
        loss, stats = ppo_loss(logp, mb.old_logprobs, mb.advantages, mask, entropy=ent, **kw, **layout)
        stats["outside_kept_frac"] = outside
        return loss, stats

    def loss_args(self, mb, use_kl: bool) -> dict:
        """ppo_loss's / linear_ppo_loss's keywords for minibatch mb (besides the tokens)."""
        c = self.config
        return dict(
            ref_logprobs=mb.ref_logprobs if use_kl else None,
            entropy_coef=c.entropy_coef,
            kl_coef=self.kl_ctl.value if use_kl else 0.0,
            kl_kind=c.kl_kind,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            dual_clip=c.dual_clip,
            agg=c.loss_agg,
        )

    def fused_loss(self, mb, use_kl: bool):
        """policy_loss from the trunk's hidden states and the lm_head weight
        (rlhf_fast.linear_ppo_loss): dH and dW in the forward, 3 GEMMs a
        chunk, no (B, R, V) logits. The same loss and stats as the logits
        path to rounding (tests/test_trainer.py). Tokens outside the current
        policy's kept set (logprobs_mode processed with truncation) score
        -inf inside the op: their ratio is clamped, their gradient 0."""
        c = self.config
        ro, pk = mb.rollout, mb.packed
        kw = self.loss_args(mb, use_kl)
        if pk is None:
            P = ro.prompt_length
            labels = ro.sequences[:, P:].masked_fill(~ro.response_mask, -100)
            mask, layout = ro.response_mask, correction_args(self.rollout_correction, ro)
            inputs = dict(
                input_ids=ro.sequences, attention_mask=ro.attention_mask,
                position_ids=_left_padded_positions(ro.attention_mask),
            )  # fmt: skip

            def rows(h):  # position P-1+t predicts response token t
                return h[:, P - 1 : -1]
        else:
            labels = pk.labels.masked_fill(~pk.mask, -100)
            mask, layout = pk.mask, packed_loss_args(pk, c.loss_agg, ro.response_mask.shape[1])
            if self.rollout_correction is not None and pk.sampler_logprobs is not None:
                layout.update(rollout_logprobs=pk.sampler_logprobs, rollout_correction=self.rollout_correction)
            inputs = dict(input_ids=pk.input_ids, position_ids=pk.position_ids)

            def rows(h):
                return h[0][pk.logit_index]

        mask, _ = mask_outside_kept(mask, mb.old_logprobs, kw["ref_logprobs"], layout.get("rollout_logprobs"))

        def loss_fn(h, weight, bias):
            return linear_ppo_loss(
                rows(h), weight, labels, mb.old_logprobs, mb.advantages, mask, bias=bias, **kw, **layout,
                **scoring(c),
            )  # fmt: skip

        loss, stats, logp, _ = head_loss(self.policy, loss_fn, **inputs)
        stats["outside_kept_frac"] = mask_outside_kept(mask, logp)[1]
        return loss, stats

    def minibatch_epochs(self, exp, optimizers, micro_step) -> tuple[dict, list[float], int]:
        """What PPO and GRPO share: ppo_epochs x shuffled minibatches x
        grad_accum micro-batches of micro_step(minibatch, scale) -> (detached
        loss, stats of 0-d tensors), the trainer's backward(s), one guarded optimizer step
        per minibatch. Stats are summed as tensors, so a micro-batch costs no
        host sync; the only one is guarded_step's norm. Returns (mean stats,
        grad norms, skipped steps)."""
        c = self.config
        n_rows = exp.rollout.sequences.shape[0]
        sums, norms, skipped = {}, [], 0
        for _ in range(c.ppo_epochs):
            perm = torch.randperm(n_rows, generator=self.cpu_gen).to(self.device)
            for mb in perm.split(c.minibatch_size):
                micro = mb.chunk(min(c.grad_accum, mb.numel()))
                total = torch.zeros((), device=self.device)
                for mi in micro:
                    loss, stats = micro_step(exp.minibatch(mi), 1.0 / len(micro))
                    total = total + loss / len(micro)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().double() / len(micro)
                if self.fused_policy_loss:  # the policy's DDP wrapper was bypassed
                    self.all_reduce_grads(self.policy.parameters())
                norm, skip = guarded_step(optimizers, [], c.max_grad_norm, total)
                norms.append(norm)
                skipped += int(skip)
        return {k: float(v) / max(len(norms), 1) for k, v in sums.items()}, norms, skipped

    def update(self, exp, micro_step) -> dict:
        """PPO / GRPO: minibatch_epochs over `exp` for every (model, optimizer,
        scheduler) in self.updated, then one scheduler step each (also when
        every reward was NaN/inf and there is nothing to learn from)."""
        c = self.config
        models, opts, scheds = zip(*self.updated)
        if not exp.any_valid:
            for sch in scheds:
                sch.step()
            return {"skipped": 1, "applied": 0, "lr": scheds[0].get_last_lr()[0]}
        t0 = time.perf_counter()
        for m in models:
            m.train()
        out, norms, skipped = self.minibatch_epochs(exp, list(opts), micro_step)
        for sch in scheds:
            sch.step()
        n_tok = int(exp.rollout.response_mask.sum())
        dt = time.perf_counter() - t0
        out.update(
            {
                "grad_norm": sum(norms) / max(len(norms), 1),
                "skipped": skipped,
                "applied": len(norms) - skipped,
                "time/update": dt,
                "tokens_per_s/update": c.ppo_epochs * n_tok / max(dt, 1e-9),
                "lr": scheds[0].get_last_lr()[0],
            }
        )
        return out

    def text_reward_metrics(self) -> dict:
        """A TextRewards reward's metrics of this step (per reward function, as TRL logs them)."""
        return dict(self.reward.metrics) if isinstance(self.reward, TextRewards) else {}
