"""rlhf_fast.gae / discounted_returns / whiten / group_advantages: validation,
backend dispatch and fake (meta) registration. No autograd: advantages are
constants in PPO, so the ops have no backward.

Naming chain: gae_cpu (csrc/cpu/advantages_gae.cpp), gae_cuda
(csrc/cuda/advantages_ops.cpp -> csrc/cuda/advantages.cu) ->
torch.ops.rlhf_fast.gae -> rlhf_fast.gae -> reference.gae ->
tests/test_advantages.py -> benchmarks/bench_advantages.py; likewise
discounted_returns (discounted_returns_cpu beside gae_cpu), whiten
(whiten_cpu in csrc/cpu/advantages_norm.cpp, _whiten_stats_kernel /
_whiten_merge_kernel / _whiten_apply_kernel and their launcher whiten_triton)
and group_advantages (group_advantages_cpu, _group_advantages_fwd_kernel,
group_advantages_triton), kernels and launchers in triton/advantages.py.

Dtypes: rewards / values / x / scores float32, bfloat16, float16 or float64;
outputs float32, or float64 when an input is float64 (the reference-grade
path). Masks: bool, or 0/1 in any numeric dtype (nonzero = valid).
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference, specs
from .._dtypes import acc_dtype
from ._common import FLOAT_DTYPES, check_same_device, check_tensor, host_value_checks
from ._packing import check_packed_tokens

ESTIMATORS = specs.ESTIMATORS
SCAN_IMPLEMENTED = ("cuda", "cpp")  # gae, discounted_returns
STATS_IMPLEMENTED = ("triton", "cpp")  # whiten, group_advantages


# ---------------------------------------------------------------- validation


def _check_mask(op: str, mask, shape) -> None:
    check_tensor(op, "mask", mask)
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool or a real 0/1 tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def _check_rows(op: str, rewards, cu_seqlens=None) -> int:
    """The padded (B, T) or packed (total,) + cu_seqlens layout
    (docs/packing.md); returns the number of rows B or segments S."""
    if cu_seqlens is not None:
        return check_packed_tokens(op, "rewards", rewards, cu_seqlens, dtypes=FLOAT_DTYPES)
    check_tensor(op, "rewards", rewards, FLOAT_DTYPES)
    if rewards.dim() != 2:
        raise ValueError(f"{op}: rewards must be 2-D (B, T), got shape {tuple(rewards.shape)}")
    return rewards.shape[0]


def _no_gradient(op: str, *tensors) -> None:
    """The estimators have no backward (advantages and returns are constants
    of the PPO / GRPO losses). A gradient request is refused on every
    backend, the reference included, instead of being dropped silently."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is not differentiable (advantages are constants of the loss), but an input requires grad: "
            "pass detached tensors (x.detach()) or call it under torch.no_grad()"
        )


def _discount(op: str, name: str, value, B: int, device):
    """A float in [0, 1] -> (float, None); a tensor of B (or 1) values in
    [0, 1] -> (1.0, (B,) tensor)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{op}: {name} must be a float or a float tensor, got dtype {value.dtype}")
        if value.numel() not in (1, B) or value.dim() > 1:
            raise ValueError(f"{op}: {name} as a tensor must have shape ({B},) (one per row), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but rewards are on {device}")
        if host_value_checks(device) and value.numel() > 0:
            lo, hi = float(value.min()), float(value.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"{op}: {name} must lie in [0, 1], got values from {lo} to {hi}")
        elif value.numel() > 0:
            # GPU, no host sync: a row whose value is outside [0, 1] gets
            # NaN (its advantages and returns become NaN), never a silent
            # result for a discount that means nothing
            value = value if value.is_floating_point() else value.double()
            value = torch.where((value >= 0) & (value <= 1), value, torch.full_like(value, float("nan")))
        return 1.0, value.reshape(-1).expand(B)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{op}: {name} must be a float in [0, 1] or a (B,) tensor, got {type(value).__name__}")
    if isinstance(value, torch.SymFloat):
        return value, None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must lie in [0, 1], got {value}")
    return value, None


# ---------------------------------------------------------------- public API


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma=1.0, lam=1.0, cu_seqlens=None):
    """Generalized advantage estimation in one pass per row.

    rewards, values, mask: (B, T), or packed (total,) with cu_seqlens ((S + 1,)
    offsets, docs/packing.md): the carries reset at every segment, and each
    segment gives the same bits as the padded op on that row. gamma, lam:
    floats in [0, 1] or (B,) / (S,) tensors (one per row or segment).
    Semantics are verl's compute_gae_advantage_return without the whitening:
    masked positions are skipped (the advantage carry and the next value pass
    through them unchanged, so observation tokens inside a multi-turn
    response work); rewards and values there are never used. Returns
    (advantages, returns) in the inputs' layout, float32 (float64 if an input
    is float64), 0 at masked positions, returns = advantages + values
    elsewhere. For right-padded masks this equals OpenRLHF's and TRL's loops.
    Not differentiable: an input that requires grad (in grad mode) raises.
    """
    op = "rlhf_fast.gae"
    B = _check_rows(op, rewards, cu_seqlens)
    check_tensor(op, "values", values, FLOAT_DTYPES)
    if tuple(values.shape) != tuple(rewards.shape):
        raise ValueError(f"{op}: values must have the rewards' shape {tuple(rewards.shape)}, got {tuple(values.shape)}")
    _check_mask(op, mask, rewards.shape)
    check_same_device(op, "rewards", rewards, values=values, mask=mask)
    _no_gradient(op, rewards, values, gamma, lam)
    g, g_rows = _discount(op, "gamma", gamma, B, rewards.device)
    lam_, l_rows = _discount(op, "lam", lam, B, rewards.device)
    backend = _backend.choose("gae", rewards.device, SCAN_IMPLEMENTED)
    if backend == "reference":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
    return torch.ops.rlhf_fast.gae(rewards, values, mask, g, lam_, g_rows, l_rows, cu_seqlens)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma=1.0, cu_seqlens=None):
    """Reverse discounted cumulative sum G_t = r_t + gamma * G_next, skipping
    masked positions (the running return passes through them; output 0
    there). REINFORCE / REINFORCE++ returns; equals gae(rewards, 0, mask,
    gamma=gamma, lam=1)[0]. rewards, mask: (B, T), or packed (total,) with
    cu_seqlens (the sum resets at every segment); gamma: float or (B,) / (S,).
    Not differentiable: a rewards tensor that requires grad raises."""
    op = "rlhf_fast.discounted_returns"
    B = _check_rows(op, rewards, cu_seqlens)
    _check_mask(op, mask, rewards.shape)
    check_same_device(op, "rewards", rewards, mask=mask)
    _no_gradient(op, rewards, gamma)
    g, g_rows = _discount(op, "gamma", gamma, B, rewards.device)
    backend = _backend.choose("discounted_returns", rewards.device, SCAN_IMPLEMENTED)
    if backend == "reference":
        return reference.discounted_returns(rewards, mask, gamma=gamma, cu_seqlens=cu_seqlens)
    return torch.ops.rlhf_fast.discounted_returns(rewards, mask, g, g_rows, cu_seqlens)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    cu_seqlens=None,
    per_segment: bool = False,
):
    """Masked whitening over every valid element of x (any shape, mask the
    same shape): (x - mean) * rsqrt(var + eps), + mean again if not
    shift_mean, with var the unbiased variance (as verl's masked_whiten).
    Statistics in float64, two passes per chunk about a pivot, merged by
    Chan's formula. 0 at masked positions. With one valid element var is
    taken as 0 (verl raises), so that element becomes 0 (x itself if not
    shift_mean); with none the output is all zeros. Never NaN for finite x:
    with eps=0 and variance 0 (tied values, one valid element) an element
    equal to the mean gives 0 (x itself if not shift_mean), not 0 * rsqrt(0).
    Packed x (total,) with cu_seqlens: the statistics run over the whole
    stream (the same as whiten on the (1, total) view), or with
    per_segment=True one mean / var per segment. Not differentiable: an x
    that requires grad (in grad mode) raises."""
    op = "rlhf_fast.whiten"
    if cu_seqlens is not None:
        check_packed_tokens(op, "x", x, cu_seqlens, dtypes=FLOAT_DTYPES)
    else:
        check_tensor(op, "x", x, FLOAT_DTYPES)
        if per_segment:
            raise ValueError(f"{op}: per_segment=True needs cu_seqlens (the packed layout)")
    _check_mask(op, mask, x.shape)
    check_same_device(op, "x", x, mask=mask)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"{op}: shift_mean must be a bool, got {type(shift_mean).__name__}")
    if not isinstance(per_segment, bool):
        raise TypeError(f"{op}: per_segment must be a bool, got {type(per_segment).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= float(eps) < float("inf")):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    _no_gradient(op, x)
    seg = cu_seqlens if per_segment else None
    backend = _backend.choose("whiten", x.device, STATS_IMPLEMENTED)
    if backend == "reference":
        return reference.whiten(x, mask, shift_mean=shift_mean, eps=float(eps), cu_seqlens=seg)
    fn = torch.ops.rlhf_fast.whiten_triton if backend == "triton" else torch.ops.rlhf_fast.whiten
    out = fn(x, mask, shift_mean, float(eps), seg)
    if float(eps) == 0.0:
        # The kernels compute (x - mean) * rsqrt(var + eps): 0 * inf = NaN when
        # var = 0. A probe with eps = 1 (rsqrt finite and > 0) is 0 exactly
        # where x == mean; there the answer is 0 (x itself if not shift_mean).
        # One more pass over x, for eps=0 callers only; no host sync.
        at_mean = (fn(x, mask, True, 1.0, seg) == 0) & (mask != 0)
        out = torch.where(at_mean, torch.zeros_like(out) if shift_mean else x.to(out.dtype), out)
    return out


def group_advantages(scores: torch.Tensor, groups, *, estimator: str = "grpo", eps: float = 1e-6):
    """Outcome advantages against the other samples of the same prompt.

    scores: (N,). groups: an int (contiguous groups of that size, which must
    divide N) or an (N,) integer tensor of group ids (any values, any order).
    estimator: "grpo" (s - mean) / (std + eps) with unbiased std;
    "dr_grpo" s - mean; "rloo" s - mean of the other n - 1;
    "reinforce_baseline" s - mean (whiten over the batch afterwards for
    REINFORCE++). Singleton groups give 0 (verl's GRPO gives s / (1 + eps)).
    grpo with eps=0: a score equal to its group's mean gives 0, so a group
    of tied scores (std 0) gives 0 rather than 0 / 0 = NaN.
    Returns (N,) float32 (float64 for float64 scores). Not differentiable:
    scores that require grad (in grad mode) raise. On a packed stream,
    rlhf_fast.expand_to_tokens(out, cu_seqlens, total) puts each
    sequence's advantage on its tokens.
    """
    op = "rlhf_fast.group_advantages"
    check_tensor(op, "scores", scores, FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{op}: unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= float(eps) < float("inf")):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    _no_gradient(op, scores)
    N = scores.shape[0]
    if isinstance(groups, torch.Tensor):
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise TypeError(f"{op}: groups as a tensor must hold integer group ids, got dtype {groups.dtype}")
        if tuple(groups.shape) != (N,):
            raise ValueError(
                f"{op}: groups as a tensor must have shape ({N},) (one id per score), got {tuple(groups.shape)}"
            )
        check_same_device(op, "scores", scores, groups=groups)
        ids, size = groups, 0
    elif isinstance(groups, numbers.Integral) and not isinstance(groups, bool):
        size = int(groups)
        if size <= 0:
            raise ValueError(f"{op}: group size must be > 0, got {size}")
        if N % size:
            raise ValueError(f"{op}: group size {size} does not divide the number of scores N={N}")
        ids = None
    else:
        raise TypeError(
            f"{op}: groups must be an int group size or an (N,) integer tensor of ids, got {type(groups).__name__}"
        )
    backend = _backend.choose("group_advantages", scores.device, STATS_IMPLEMENTED)
    if backend == "reference":
        return reference.group_advantages(scores, groups, estimator=estimator, eps=float(eps))
    fn = torch.ops.rlhf_fast.group_advantages_triton if backend == "triton" else torch.ops.rlhf_fast.group_advantages
    out = fn(scores, ids, size, estimator, float(eps))
    if estimator == "grpo" and float(eps) == 0.0:
        # (s - mean) / std is 0 / 0 = NaN for tied scores; dr_grpo's s - mean
        # (the same mean, the same subtraction) is 0 exactly there.
        out = torch.where(fn(scores, ids, size, "dr_grpo", 0.0) == 0, torch.zeros_like(out), out)
    return out


# ---------------------------------------------------------------- fake (meta)


def _fake_gae(rewards, values, mask, gamma, lam, gamma_rows, lam_rows, cu_seqlens=None):
    acc = acc_dtype(rewards.dtype, values.dtype)
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


def _fake_discounted_returns(rewards, mask, gamma, gamma_rows, cu_seqlens=None):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


def _fake_whiten(x, mask, shift_mean, eps, cu_seqlens=None):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


def _fake_group_advantages(scores, group_ids, group_size, estimator, eps):
    return scores.new_empty(scores.shape, dtype=acc_dtype(scores.dtype))


if _backend.has_cpp():
    torch.library.register_fake("rlhf_fast::gae")(_fake_gae)
    torch.library.register_fake("rlhf_fast::discounted_returns")(_fake_discounted_returns)
    torch.library.register_fake("rlhf_fast::whiten")(_fake_whiten)
    torch.library.register_fake("rlhf_fast::group_advantages")(_fake_group_advantages)


# ---------------------------------------------------------------- triton


if _backend.HAVE_TRITON:
    from ..triton import advantages as kernels  # noqa: F401  (registers the *_triton ops; no autograd)
