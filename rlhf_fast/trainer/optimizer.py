"""AdamW with the LR schedule, and the optimizer step that skips a NaN/inf
loss or gradient norm."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, config, lr: float | None = None):
    params = [p for p in params if p.requires_grad]
    lr = config.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    total, warm, kind = max(config.steps, 1), config.warmup_steps, config.lr_schedule
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be constant, linear or cosine, got {kind!r}")

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        frac = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        if kind == "linear":
            return 1.0 - frac
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def guarded_step(optimizers, schedulers, max_grad_norm, loss: torch.Tensor) -> tuple[float, bool]:
    """Clip, then step every optimizer unless the loss or the gradient norm is
    NaN/inf: then the gradients are dropped and the step is skipped (the
    scheduler still advances, so the LR curve does not shift).
    The norm is over the optimizers' own parameters, not a module's: an
    FSDP2 root left unsharded by a no_grad forward lists its gathered copies,
    which never receive gradients (the sharded ones in the optimizer do).
    Returns (grad_norm, skipped)."""
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if max_grad_norm is not None and max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
    norm = float(norm)
    skipped = not (math.isfinite(norm) and bool(torch.isfinite(loss).all()))
    if not skipped:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    for sch in schedulers:
        sch.step()
    return norm, skipped
