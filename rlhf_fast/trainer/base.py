"""The outer loop shared by the trainers: steps, logging, checkpoints.

A subclass defines step() -> dict of metrics and sets `self.stateful` (name
-> object with state_dict) and `self.generators`. PPO and GRPO build theirs
on policy_trainer.PolicyTrainer; the reward-model and DPO trainers on
`accumulate` + `optimizer_step` here."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .metrics_logger import MetricsLogger
from .optimizer import guarded_step
from .parallel import ModelState, OptimizerState, check_mode, fsdp2_shard, is_sharded


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

    def autocast(self):
        """bf16 autocast on the trainer's device when config.autocast == "bf16"."""
        mode = getattr(self.config, "autocast", None)
        if mode not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {mode!r}")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

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
