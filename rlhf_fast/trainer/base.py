"""The outer loop shared by the trainers: steps, logging, checkpoints.

A subclass sets `self.stateful` (name -> object with state_dict) and
`self.generators`. PPO / GRPO also set `self.updated` ((model, optimizer,
scheduler) each) and implement `make_experience` (starting from
`rollout_and_score`) and `micro_step` (around `policy_loss`); `step` then
runs `update(experience)`, the minibatch loop. The reward-model and DPO
trainers implement `step() -> dict of metrics` through `accumulate` +
`optimizer_step`."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from ..generation.hf_args import check_prompt_rows
from ..ops import ppo_loss
from .checkpoint import load_checkpoint, save_checkpoint
from .kl_controller import KLController
from .metrics_logger import MetricsLogger
from .models import response_logprobs
from .optimizer import guarded_step, make_optimizer
from .packing import packed_logprobs, packed_loss_args
from .parallel import ModelState, OptimizerState, check_mode, fsdp2_shard, is_sharded
from .reward_scaling import RunningMoments, process_scores
from .rewards import TextRewards
from .rollout import ScoredRollout, correction_args, rollout, sample_prompts, score


class Trainer:
    name = "train"

    def __init__(self, config, device=None):
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.step_count = 0
        self.cpu_gen = torch.Generator().manual_seed(config.seed)  # shuffling, prompt draws
        self.generators = {"cpu": self.cpu_gen}
        self.stateful: dict = {}
        self.logger = MetricsLogger(
            config.out_dir, self.name, config.progress, config.steps, tensorboard=getattr(config, "tensorboard", False)
        )
        self.skipped_steps = 0  # steps with any update skipped, over the run
        self.dead_steps = 0  # consecutive steps without an optimizer step (max_skipped_steps), checkpointed
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.parallel = check_mode(getattr(config, "parallel", "ddp"))
        if self.rank != 0:  # one writer: rank 0 logs and checkpoints
            self.logger.close()
            self.logger.path, self.logger.progress = None, False
        self.callbacks: list = []  # f(trainer, metrics) -> dict of extra metrics, run after each step

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
        self.opt, self.sched = make_optimizer(policy.parameters(), config)
        self.kl_ctl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.moments = RunningMoments()

    @property
    def sync_group(self):
        """The process group whose ranks must run the same number of forwards
        (FSDP2 all-gathers weights inside each one); None when they need not."""
        return dist.group.WORLD if self.world_size > 1 and self.parallel == "fsdp2" else None

    def wrap(self, module, trainable: bool = True):
        """Under torchrun: "ddp" wraps a trained module in DistributedDataParallel
        (gradients all-reduced by torch.distributed) and leaves frozen ones
        alone; "fsdp2" shards either kind in place (parallel.fsdp2_shard). One
        process: the module itself. Build optimizers after this: FSDP2 swaps
        the parameters for sharded DTensors."""
        if self.world_size == 1:
            return module
        if self.parallel == "fsdp2":
            return fsdp2_shard(module)
        if not trainable:
            return module
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: the only buffers (rotary inv_freq) are constants; it saves a collective per forward
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
        )

    def all_reduce_grads(self, params) -> None:
        """Mean of the gradients over ranks, for a model used outside its
        forward (DPO reads the trunk and the lm_head weight separately, so a
        DDP wrapper would never see the backward)."""
        if self.world_size == 1 or self.parallel == "fsdp2":  # FSDP2 reduce-scatters them itself
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a batch drawn identically on every rank (the
        CPU generator is seeded alike), so DDP's gradient mean over ranks is
        the mean over the global batch when the slices are equal."""
        return idx[self.rank :: self.world_size]

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
        if pk is None:
            logp, ent = response_logprobs(
                self.policy_ddp,
                ro.sequences,
                ro.attention_mask,
                ro.response_mask,
                ro.prompt_length,
                temperature=c.temperature,
                return_entropy=True,
            )
            mask, layout = ro.response_mask, correction_args(self.rollout_correction, ro)
        else:
            logp, ent = packed_logprobs(self.policy_ddp, pk, temperature=c.temperature, return_entropy=True)
            mask, layout = pk.mask, packed_loss_args(pk, c.loss_agg, ro.response_mask.shape[1])
            if self.rollout_correction is not None and pk.sampler_logprobs is not None:
                layout.update(rollout_logprobs=pk.sampler_logprobs, rollout_correction=self.rollout_correction)
        return ppo_loss(
            logp,
            mb.old_logprobs,
            mb.advantages,
            mask,
            entropy=ent,
            ref_logprobs=mb.ref_logprobs if use_kl else None,
            entropy_coef=c.entropy_coef,
            kl_coef=self.kl_ctl.value if use_kl else 0.0,
            kl_kind=c.kl_kind,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            dual_clip=c.dual_clip,
            agg=c.loss_agg,
            **layout,
        )

    def accumulate(self, pick: torch.Tensor, loss_fn) -> tuple[torch.Tensor, dict]:
        """What the reward-model and DPO trainers share: the rows `pick` in
        grad_accum micro-batches; loss_fn(idx) -> (loss, stats of 0-d tensors,
        each a mean over idx's rows). Backward of loss / n_micro each; the
        loss and the stats are summed on device (no host sync per
        micro-batch). Returns (mean loss, stats as means over all rows), 0-d
        tensors: the caller reads them once per step."""
        micro = pick.chunk(min(self.config.grad_accum, pick.numel()))
        total, sums = torch.zeros((), device=self.device), {}
        for mi in micro:
            loss, stats = loss_fn(mi)
            (loss / len(micro)).backward()
            total = total + loss.detach() / len(micro)
            w = mi.numel() / pick.numel()  # row weights: chunks may differ in size by one
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * w
        return total, sums

    def optimizer_step(self, loss: torch.Tensor, stats: dict) -> dict:
        """After accumulate: one guarded step of self.opt and self.sched, and
        the step's metrics as floats, read from the device in one transfer."""
        norm, skip = guarded_step([self.opt], [self.sched], self.config.max_grad_norm, loss)
        values = torch.stack([loss.float(), *stats.values()]).tolist()
        return {
            **dict(zip(["loss", *stats], values)),
            "grad_norm": norm,
            "skipped": int(skip),
            "applied": int(not skip),
            "lr": self.sched.get_last_lr()[0],
        }

    def micro_step(self, mb, scale: float) -> tuple[torch.Tensor, dict]:
        """PPO / GRPO: the backward(s) of one micro-batch `mb` (an
        Experience.minibatch), scaled by `scale`; returns (detached loss,
        stats of 0-d tensors)."""
        raise NotImplementedError

    def minibatch_epochs(self, exp, optimizers) -> tuple[dict, list[float], int]:
        """What PPO and GRPO share: ppo_epochs x shuffled minibatches x
        grad_accum micro-batches of self.micro_step, one guarded optimizer step
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
                    loss, stats = self.micro_step(exp.minibatch(mi), 1.0 / len(micro))
                    total = total + loss / len(micro)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().double() / len(micro)
                norm, skip = guarded_step(optimizers, [], c.max_grad_norm, total)
                norms.append(norm)
                skipped += int(skip)
        return {k: float(v) / max(len(norms), 1) for k, v in sums.items()}, norms, skipped

    def update(self, exp) -> dict:
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
        out, norms, skipped = self.minibatch_epochs(exp, list(opts))
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

    def autocast(self):
        """bf16 autocast on the trainer's device when config.autocast == "bf16"."""
        mode = getattr(self.config, "autocast", None)
        if mode not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {mode!r}")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def make_experience(self):  # PPO / GRPO: -> rollout.Experience
        raise NotImplementedError

    def step(self) -> dict:
        """PPO / GRPO: one rollout + update, then the adaptive KL controller
        sees the measured KL (GRPO without a reference measures none). The
        reward-model and DPO trainers override it with one batch."""
        exp = self.make_experience()
        metrics = exp.metrics
        metrics.update(self.update(exp))
        if "kl" in metrics:
            self.kl_ctl.update(metrics["kl"], self.config.batch_size)
        if isinstance(self.reward, TextRewards):
            metrics.update(self.reward.metrics)  # per reward function, as TRL logs them
        return metrics

    def train(self, steps: int | None = None) -> list[dict]:
        """Run until `steps` total steps (default config.steps), logging every
        log_every and checkpointing every checkpoint_every steps."""
        end = self.config.steps if steps is None else steps
        rows = []
        while self.step_count < end:
            t0 = time.perf_counter()
            with self.autocast():
                metrics = self.step()
            self.step_count += 1
            metrics["time/step"] = time.perf_counter() - t0
            for cb in self.callbacks:
                metrics.update(cb(self, metrics) or {})
            self.skipped_steps += int(metrics.get("skipped", 0) > 0)
            rows.append(metrics)
            if self.step_count % max(self.config.log_every, 1) == 0:
                self.logger.log(self.step_count, metrics)
            # a step that took no optimizer step at all ("applied" 0): every update non-finite, or every reward
            dead = metrics.get("skipped", 0) > 0 and metrics.get("applied", 1) == 0
            self.dead_steps = self.dead_steps + 1 if dead else 0
            limit = self.config.max_skipped_steps
            if limit and self.dead_steps >= limit:  # before the checkpoint: never save the state that got here
                raise RuntimeError(_dead_message(self, self.dead_steps, metrics))
            every = self.config.checkpoint_every
            if every and self.config.out_dir and self.step_count % every == 0:  # every rank: a collective
                self.save(os.path.join(self.config.out_dir, "checkpoint.pt"))
        return rows

    def model_state(self, model):
        """What goes in `stateful` for a model: full weights even when sharded."""
        return ModelState(model) if is_sharded(model) else model

    def optimizer_state(self, model, optimizer):
        return OptimizerState(model, optimizer) if is_sharded(model) else optimizer

    def save(self, path: str) -> None:
        """Everything that decides the rest of the run: models, optimizers,
        schedulers, controllers, every rank's RNGs, the step and the skip
        counters (max_skipped_steps counts across a resume). Under torchrun
        every rank must call it (sharded weights are gathered); rank 0 writes
        the file."""
        save_checkpoint(path, self.step_count, {**self.stateful, **self._counters()}, self.generators)

    def load(self, path: str) -> None:
        """Every rank reads the file; each takes its own RNG streams."""
        self.step_count = load_checkpoint(path, {**self.stateful, **self._counters()}, self.generators)

    def _counters(self) -> dict:
        return {"skipped": Attrs(self, v="skipped_steps", consecutive="dead_steps")}


def _dead_message(trainer, n: int, m: dict) -> str:
    bad, total = m.get("nonfinite_rewards", 0), m.get("samples", 0)
    if total and bad == total:
        cause = f"every reward was NaN/inf ({bad} of {total} non-finite rewards in step {trainer.step_count})"
    else:
        cause = (
            f"the loss or the gradient norm was NaN/inf in every update of step {trainer.step_count} "
            f"({bad} of {total} non-finite rewards; check lr, max_grad_norm, the inputs)"
        )
        cause = cause if total else cause.replace(f"({bad} of {total} non-finite rewards; ", "(")
    return (
        f"{trainer.name}: {n} consecutive steps skipped without an optimizer step: {cause}. Stopped "
        f"(max_skipped_steps={trainer.config.max_skipped_steps}; 0 disables this check); "
        "this step was not checkpointed."
    )


class Attrs:
    """state_dict adaptor for plain attributes of obj (ints, floats,
    tensors), saved under the given keys: Attrs(trainer, v="skipped_steps").
    A key or the whole entry missing from an older checkpoint leaves the
    attribute as built (what that checkpoint's run resumed with); a tensor
    goes back to its device."""

    optional = True  # load_checkpoint: an older checkpoint may lack the entry

    def __init__(self, obj, **keys):
        self.obj, self.keys = obj, keys

    def state_dict(self):
        return {k: getattr(self.obj, a) for k, a in self.keys.items()}

    def load_state_dict(self, s):
        for k, a in self.keys.items():
            if k in s:
                old = getattr(self.obj, a)
                setattr(self.obj, a, s[k].to(old.device) if isinstance(old, torch.Tensor) else s[k])
