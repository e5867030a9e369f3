"""rlhf_fast.ppo_policy_loss / ppo_value_loss / kl_penalty / ppo_loss:
validation, backend dispatch, autograd and fake registration.

Naming chain: _ppo_loss_fwd_kernel and its launcher ppo_loss_fwd_triton
(triton/ppo_policy_loss.py, its rollout correction in
triton/rollout_correction.py), ppo_loss_fwd_cpu (csrc/cpu/ppo_policy_loss.cpp)
-> torch.ops.rlhf_fast.ppo_loss_fwd / _bwd (and ppo_loss_fwd_triton /
ppo_loss_bwd_triton) -> rlhf_fast.ppo_loss, ppo_policy_loss
-> reference.ppo_loss -> tests/test_ppo_loss.py -> benchmarks/bench_ppo_loss.py;
likewise _ppo_value_loss_fwd_kernel / ppo_value_loss_fwd_triton
(triton/ppo_value_loss.py), ppo_value_loss_fwd_cpu
(csrc/cpu/ppo_value_loss.cpp) -> rlhf_fast.ppo_value_loss ->
reference.ppo_value_loss, and _kl_penalty_fwd_kernel / kl_penalty_fwd_triton
(triton/kl_penalty.py), kl_penalty_fwd_cpu (csrc/cpu/kl_penalty.cpp) ->
rlhf_fast.kl_penalty -> reference.kl_penalty.

Design: forward computes the per-token gradient d loss_tok / d logprobs in
the same pass as the loss (it needs the same ratio, clip decisions and KL
term), plus row_scale (B,), the aggregation weight of each row, so backward
is one scale-and-cast: ~8 B per token instead of re-reading 13-21 B of
inputs and redoing every exp (csrc/cpu/ppo_policy_loss.cpp has the byte counts).

Packed inputs (cu_seqlens=, docs/packing.md): the same ops with the rows
given as (offset, length) segments instead of b * T, so the padded and the
packed layout run the same row loop on every backend; dtok keeps the
tokens' layout and row_scale is per segment.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype
from ..specs import AGG_MODES, KL_KINDS, RC_STATS, RolloutCorrection
from ._autograd import register_autograd
from ._common import FLOAT_DTYPES, check_positive_float, check_same_device, check_tensor, once_differentiable
from ._packing import check_cu_seqlens

IMPLEMENTED = ("triton", "cpp")
# Order of the stats vector returned by ppo_loss_fwd.
BASE_STATS = ("pg_loss", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")
LOSS_STATS = BASE_STATS + tuple(f"rollout_corr/{k}" for k in RC_STATS)  # the rollout_corr/* ones: 0 without
POLICY_STATS = BASE_STATS[3:]
VALUE_STATS = ("clipfrac", "explained_variance")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64) + FLOAT_DTYPES


# ---------------------------------------------------------------- validation


def _check_tokens(
    op: str, ref_name: str, ref: torch.Tensor, mask: torch.Tensor, cu_seqlens=None, **others
) -> torch.Tensor:
    check_tensor(op, ref_name, ref, FLOAT_DTYPES)
    if cu_seqlens is not None:
        if ref.dim() != 1:
            raise ValueError(
                f"{op}: with cu_seqlens, {ref_name} must be 1-D (total,) packed tokens, got shape {tuple(ref.shape)}"
            )
        check_cu_seqlens(op, cu_seqlens, ref.shape[0], ref.device)
    elif ref.dim() != 2:
        raise ValueError(f"{op}: {ref_name} must be 2-D (B, T), got shape {tuple(ref.shape)}")
    for name, t in others.items():
        if t is None:
            continue
        check_tensor(op, name, t, FLOAT_DTYPES)
        if t.shape != ref.shape:
            raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_tensor(op, "mask", mask, MASK_DTYPES)
    if mask.shape != ref.shape:
        raise ValueError(f"{op}: mask must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(mask.shape)}")
    check_same_device(op, ref_name, ref, mask=mask, **others)
    # valid where != 0; bool / uint8 reach the kernels as they are
    return mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0


def _check_agg(op: str, agg, agg_norm, T: int, packed: bool = False) -> float:
    """agg_norm defaults to T in the padded layout, the longest row the
    batch holds; packed, to the longest segment, which the kernels read from
    cu_seqlens themselves (passed as 0: no host sync)."""
    if agg not in AGG_MODES:
        raise ValueError(f"{op}: agg must be one of {AGG_MODES}, got {agg!r}")
    if agg_norm is None:
        return 0.0 if packed else float(max(T, 1))
    return check_positive_float(op, "agg_norm", agg_norm)


def _check_clips(op: str, clip_low, clip_high, dual_clip):
    clip_low = check_positive_float(op, "clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive_float(op, "clip_high", clip_high)
    if dual_clip is not None:
        dual_clip = check_positive_float(op, "dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"{op}: dual_clip (verl's clip_ratio_c) must be > 1, got {dual_clip}")
    return clip_low, clip_high, dual_clip


def _check_coef(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def _check_kind(op: str, kind) -> str:
    if kind not in KL_KINDS:
        raise ValueError(f"{op}: kl kind must be one of {KL_KINDS}, got {kind!r}")
    return kind


# ---------------------------------------------------------------- public API


def _check_rollout(op: str, rollout_logprobs, rollout_correction):
    if rollout_correction is not None and not isinstance(rollout_correction, RolloutCorrection):
        raise TypeError(
            f"{op}: rollout_correction must be a rlhf_fast.RolloutCorrection, got {type(rollout_correction).__name__}"
        )
    if rollout_logprobs is None and rollout_correction is not None and rollout_correction.enabled:
        raise ValueError(f"{op}: rollout_correction needs rollout_logprobs (the sampler's log-probs)")
    return () if rollout_logprobs is None else (rollout_correction or RolloutCorrection()).kernel_args()


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    entropy=None,
    ref_logprobs=None,
    entropy_coef=0.0,
    kl_coef=0.0,
    kl_kind="k3",
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    agg_norm=None,
    rollout_logprobs=None,
    rollout_correction=None,
    cu_seqlens=None,
):
    """The whole actor objective in one fused op:
    loss = pg_loss - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logprobs, ref_logprobs)).

    logprobs, old_logprobs, advantages, entropy, ref_logprobs: (B, T) float32 /
        bfloat16 / float16 / float64 (math in fp32; fp64 for fp64 logprobs).
    mask: (B, T) bool or 0/1 (valid where != 0); masked positions are never
        used, so NaN padding there is harmless.
    Returns (loss, stats): loss a 0-dim tensor, stats a dict of 0-dim tensors
    (pg_loss, entropy, kl: each aggregated with `agg`; clipfrac,
    clipfrac_lower, approx_kl, ratio_mean, ratio_max: token means over the
    mask whatever `agg` is, as in verl). Gradients reach logprobs and entropy.
    An all-masked batch gives loss 0, zero stats and zero gradients.

    rollout_logprobs: (B, T) the sampler's log-probs of the same tokens
        (raw: before temperature / top-k / top-p). Given, stats also holds
        verl's mismatch metrics rollout_corr/* of old_logprobs vs them.
    rollout_correction: a RolloutCorrection (verl's rollout_is / rollout_rs,
        docs/rollout_correction.md): stop-gradient importance weights of the
        clipped term (TIS / IcePop, token, sequence or geometric level) and
        rejection of tokens or whole rows, in the same fused pass.
    cu_seqlens: (S + 1,) int32 / int64 offsets (docs/packing.md): every token
        tensor is packed (total,), and each segment is a row for the
        aggregation and the sequence-level corrections; agg_norm defaults
        to the longest segment there (T, the longest row, when padded).
    """
    op = "rlhf_fast.ppo_loss"
    mask = _check_tokens(
        op,
        "logprobs",
        logprobs,
        mask,
        cu_seqlens,
        old_logprobs=old_logprobs,
        advantages=advantages,
        entropy=entropy,
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
    )
    rc_args = _check_rollout(op, rollout_logprobs, rollout_correction)
    clip_low, clip_high, dual_clip = _check_clips(op, clip_low, clip_high, dual_clip)
    packed = cu_seqlens is not None
    agg_norm = _check_agg(op, agg, agg_norm, logprobs.shape[-1], packed)
    entropy_coef = _check_coef(op, "entropy_coef", entropy_coef)
    kl_coef = _check_coef(op, "kl_coef", kl_coef)
    kl_kind = _check_kind(op, kl_kind)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"{op}: entropy_coef={entropy_coef} needs entropy")
    backend = _backend.choose("ppo_loss", logprobs.device, IMPLEMENTED)
    if backend == "reference":
        return reference.ppo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            entropy=entropy,
            ref_logprobs=ref_logprobs,
            entropy_coef=entropy_coef,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            agg=agg,
            agg_norm=agg_norm or None,  # 0: the longest segment (packed)
            rollout_logprobs=rollout_logprobs,
            rollout_correction=rollout_correction,
            cu_seqlens=cu_seqlens,
        )
    if not rc_args:
        rc_args = ("none", 2.0, None, "none", 0.0, 0.0)
    fwd = torch.ops.rlhf_fast.ppo_loss_fwd_triton if backend == "triton" else torch.ops.rlhf_fast.ppo_loss_fwd
    loss, stats, _, _, _ = fwd(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        entropy,
        ref_logprobs,
        entropy_coef,
        kl_coef,
        kl_kind,
        clip_low,
        clip_high,
        dual_clip,
        agg,
        agg_norm,
        rollout_logprobs,
        *rc_args,
        cu_seqlens,
    )
    names = LOSS_STATS if rollout_logprobs is not None else BASE_STATS
    return loss, dict(zip(names, stats.unbind(0)))


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    agg_norm=None,
    rollout_logprobs=None,
    rollout_correction=None,
    cu_seqlens=None,
):
    """verl's clipped PPO surrogate (compute_policy_loss_vanilla):
    ratio = exp(clamp(logprobs - old_logprobs, -20, 20)),
    loss_tok = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)),
    with dual clip (clip_ratio_c > 1): min(-A * dual_clip, loss_tok) where A < 0.

    All tensors (B, T); mask bool or 0/1. clip_high defaults to clip_low
    (DAPO's clip-higher sets it larger). agg: token-mean,
    seq-mean-token-sum, seq-mean-token-mean (both over non-empty rows),
    seq-mean-token-sum-norm (sum / agg_norm, default T).
    Returns (loss, stats) with stats clipfrac, clipfrac_lower, approx_kl,
    ratio_mean, ratio_max (token means over the mask), and with
    rollout_logprobs the rollout_corr/* metrics; rollout_correction and
    cu_seqlens (packed (total,) inputs) as in ppo_loss. Gradient flows to
    logprobs only.
    """
    loss, stats = ppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        agg_norm=agg_norm,
        rollout_logprobs=rollout_logprobs,
        rollout_correction=rollout_correction,
        cu_seqlens=cu_seqlens,
    )
    return loss, {k: v for k, v in stats.items() if k not in BASE_STATS[:3]}


def rollout_mismatch(old_logprobs, rollout_logprobs, mask, *, cu_seqlens=None):
    """verl's rollout_corr/* mismatch metrics of the trainer's old log-probs
    against the sampler's, alone: old_logprobs, rollout_logprobs (B, T),
    mask (B, T), or packed (total,) with cu_seqlens (the per-sequence
    metrics then per segment). A dict of 0-dim tensors (keys as in
    ppo_loss's stats). One pass of the fused forward (the metrics do not
    depend on the current policy or the advantages, so those are
    stand-ins); no host sync."""
    zeros = torch.zeros_like(old_logprobs)
    _, stats = ppo_loss(
        old_logprobs.detach(),
        old_logprobs.detach(),
        zeros,
        mask,
        rollout_logprobs=rollout_logprobs,
        cu_seqlens=cu_seqlens,
    )
    return {k: v for k, v in stats.items() if k.startswith("rollout_corr/")}


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", agg_norm=None, cu_seqlens=None):
    """0.5 * agg(max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)).

    values, old_values, returns: (B, T) float; mask (B, T) bool or 0/1.
    clip=None disables clipping. Returns (loss, stats): clipfrac and
    explained_variance = 1 - Var[R - v] / (Var[R] + 1e-8) (population
    variances over the valid tokens). Gradient flows to values only.
    cu_seqlens: packed (total,) inputs, as in ppo_loss.
    """
    op = "rlhf_fast.ppo_value_loss"
    mask = _check_tokens(op, "values", values, mask, cu_seqlens, old_values=old_values, returns=returns)
    if clip is not None:
        clip = check_positive_float(op, "clip", clip)
    packed = cu_seqlens is not None
    agg_norm = _check_agg(op, agg, agg_norm, values.shape[-1], packed)
    backend = _backend.choose("ppo_value_loss", values.device, IMPLEMENTED)
    if backend == "reference":
        return reference.ppo_value_loss(
            values, old_values, returns, mask, clip=clip, agg=agg, agg_norm=agg_norm or None, cu_seqlens=cu_seqlens
        )
    fwd = (
        torch.ops.rlhf_fast.ppo_value_loss_fwd_triton if backend == "triton" else torch.ops.rlhf_fast.ppo_value_loss_fwd
    )
    loss, stats, _, _ = fwd(values, old_values, returns, mask, clip, agg, agg_norm, cu_seqlens)
    return loss, dict(zip(VALUE_STATS, stats.unbind(0)))


def kl_penalty(logprobs, ref_logprobs, *, kind="k3"):
    """Per-token KL estimate of logprobs against ref_logprobs (verl kl_penalty):
    k1 = lp - ref; k2 = 0.5 (lp - ref)^2; abs = |lp - ref|;
    k3 (low_var_kl) = clamp(exp(k) - k - 1, -10, 10) with k = clamp(ref - lp, -20, 20).
    logprobs, ref_logprobs: same shape, any float dtype. Returns fp32 (fp64
    for fp64 logprobs); differentiable in logprobs. Token-wise, so a packed
    (total,) stream goes in as it is (no cu_seqlens: no segment matters).
    """
    op = "rlhf_fast.kl_penalty"
    check_tensor(op, "logprobs", logprobs, FLOAT_DTYPES)
    check_tensor(op, "ref_logprobs", ref_logprobs, FLOAT_DTYPES)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"{op}: ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}"
        )
    check_same_device(op, "logprobs", logprobs, ref_logprobs=ref_logprobs)
    kind = _check_kind(op, kind)
    backend = _backend.choose("kl_penalty", logprobs.device, IMPLEMENTED)
    if backend == "reference":
        return reference.kl_penalty(logprobs, ref_logprobs, kind=kind)
    fwd = torch.ops.rlhf_fast.kl_penalty_fwd_triton if backend == "triton" else torch.ops.rlhf_fast.kl_penalty_fwd
    return fwd(logprobs, ref_logprobs, kind)


# ---------------------------------------------------------------- fake + autograd


def _fake_loss_fwd(
    lp,
    old,
    adv,
    mask,
    entropy,
    ref,
    entropy_coef,
    kl_coef,
    kl_kind,
    clip_low,
    clip_high,
    dual_clip,
    agg,
    agg_norm,
    rollout_logprobs=None,
    rc_is="none",
    rc_is_upper=2.0,
    rc_is_lower=None,
    rc_rs="none",
    rc_rs_lower=0.0,
    rc_rs_upper=0.0,
    cu_seqlens=None,
):
    acc = acc_dtype(lp.dtype)
    return (
        lp.new_empty((), dtype=acc),
        lp.new_empty((len(LOSS_STATS),), dtype=acc),
        lp.new_empty(lp.shape, dtype=acc),
        lp.new_empty((_n_rows(lp, cu_seqlens),), dtype=acc),
        lp.new_empty(lp.shape if rc_rs != "none" else (0,), dtype=torch.bool),
    )


def _n_rows(x: torch.Tensor, cu_seqlens) -> int:
    """B of a padded (B, T) tensor, S of a packed one."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fake_loss_bwd(
    grad_loss, dtok, row_scale, mask, entropy_coef, has_entropy, logp_dtype, entropy_dtype, cu_seqlens=None
):
    ge = dtok.new_empty(dtok.shape if has_entropy else (0,), dtype=entropy_dtype)
    return dtok.new_empty(dtok.shape, dtype=logp_dtype), ge


def _fake_value_fwd(values, old_values, returns, mask, clip, agg, agg_norm, cu_seqlens=None):
    acc = acc_dtype(values.dtype)
    return (
        values.new_empty((), dtype=acc),
        values.new_empty((len(VALUE_STATS),), dtype=acc),
        values.new_empty(values.shape, dtype=acc),
        values.new_empty((_n_rows(values, cu_seqlens),), dtype=acc),
    )


def _fake_kl_fwd(logprobs, ref_logprobs, kind):
    return logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs.dtype))


def _fake_kl_bwd(grad, logprobs, ref_logprobs, kind):
    return torch.empty_like(logprobs)


def _loss_setup_context(ctx, inputs, output):
    lp, _old, _adv, mask, entropy = inputs[:5]
    _, stats, dtok, row_scale, keep = output
    # after rejection (rollout_rs) the entropy gradient follows the kept mask
    mask = keep if keep.dim() == 2 else mask
    # lp / entropy only for the double-backward error node (once_differentiable)
    ctx.save_for_backward(dtok, row_scale, mask, *(t for t in (lp, entropy) if t is not None and t.requires_grad))
    ctx.entropy_coef = inputs[6]
    ctx.cu_seqlens = inputs[21]  # an int tensor, never differentiated
    ctx.n_inputs = len(inputs)
    ctx.lp_dtype = lp.dtype
    ctx.ent_dtype = entropy.dtype if entropy is not None else None
    ctx.mark_non_differentiable(stats, dtok, row_scale, keep)
    # the non-differentiable outputs' gradients stay None: materialised, each
    # backward would zero-fill a (B, T) dtok gradient nobody reads (1 MB at (64, 4096))
    ctx.set_materialize_grads(False)


def _make_loss_backward(bwd_op):
    # ppo_policy_loss calls ppo_loss, so its error names ppo_loss
    @once_differentiable("rlhf_fast.ppo_loss (and ppo_policy_loss)")
    def backward(ctx, grad_loss, _g_stats, _g_dtok, _g_rs, _g_keep):
        dtok, row_scale, mask = ctx.saved_tensors[:3]
        has_ent = ctx.ent_dtype is not None
        if grad_loss is None:  # only the stats were used: no gradient (with materialize_grads off)
            return (None,) * ctx.n_inputs
        glp, gent = bwd_op(
            grad_loss,
            dtok,
            row_scale,
            mask,
            ctx.entropy_coef,
            has_ent,
            ctx.lp_dtype,
            ctx.ent_dtype or ctx.lp_dtype,
            ctx.cu_seqlens,
        )
        return (glp, None, None, None, gent if has_ent else None) + (None,) * (ctx.n_inputs - 5)

    return backward


def _value_setup_context(ctx, inputs, output):
    values, mask = inputs[0], inputs[3]
    _, stats, dtok, row_scale = output
    ctx.save_for_backward(dtok, row_scale, mask, *((values,) if values.requires_grad else ()))
    ctx.v_dtype = values.dtype
    ctx.cu_seqlens = inputs[7]
    ctx.mark_non_differentiable(stats, dtok, row_scale)


def _make_value_backward(bwd_op):
    @once_differentiable("rlhf_fast.ppo_value_loss")
    def backward(ctx, grad_loss, _g_stats, _g_dtok, _g_rs):
        dtok, row_scale, mask = ctx.saved_tensors[:3]
        gv, _ = bwd_op(grad_loss, dtok, row_scale, mask, 0.0, False, ctx.v_dtype, ctx.v_dtype, ctx.cu_seqlens)
        return (gv,) + (None,) * 7

    return backward


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, kind = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.kind = kind


def _make_kl_backward(bwd_op):
    @once_differentiable("rlhf_fast.kl_penalty")
    def backward(ctx, grad):
        logprobs, ref_logprobs = ctx.saved_tensors
        return bwd_op(grad, logprobs, ref_logprobs, ctx.kind), None, None

    return backward


if _backend.has_cpp():
    torch.library.register_fake("rlhf_fast::ppo_loss_fwd")(_fake_loss_fwd)
    torch.library.register_fake("rlhf_fast::ppo_loss_bwd")(_fake_loss_bwd)
    torch.library.register_fake("rlhf_fast::ppo_value_loss_fwd")(_fake_value_fwd)
    torch.library.register_fake("rlhf_fast::kl_penalty_fwd")(_fake_kl_fwd)
    torch.library.register_fake("rlhf_fast::kl_penalty_bwd")(_fake_kl_bwd)
    register_autograd(
        "ppo_loss_fwd",
        _make_loss_backward(torch.ops.rlhf_fast.ppo_loss_bwd),
        setup_context=_loss_setup_context,
    )
    register_autograd(
        "ppo_value_loss_fwd",
        _make_value_backward(torch.ops.rlhf_fast.ppo_loss_bwd),
        setup_context=_value_setup_context,
    )
    register_autograd(
        "kl_penalty_fwd",
        _make_kl_backward(torch.ops.rlhf_fast.kl_penalty_bwd),
        setup_context=_kl_setup_context,
    )


if _backend.HAVE_TRITON:
    # importing registers the *_triton ops
    from ..triton import kl_penalty as kl_kernels
    from ..triton import ppo_policy_loss as policy_kernels
    from ..triton import ppo_value_loss as value_kernels

    assert (policy_kernels.N_LOSS_STATS, value_kernels.N_VALUE_STATS) == (len(LOSS_STATS), len(VALUE_STATS))
    register_autograd(
        "ppo_loss_fwd_triton",
        _make_loss_backward(policy_kernels.ppo_loss_bwd_triton),
        setup_context=_loss_setup_context,
        triton_op=policy_kernels.ppo_loss_fwd_triton,
    )
    register_autograd(
        "ppo_value_loss_fwd_triton",
        _make_value_backward(policy_kernels.ppo_loss_bwd_triton),
        setup_context=_value_setup_context,
        triton_op=value_kernels.ppo_value_loss_fwd_triton,
    )
    register_autograd(
        "kl_penalty_fwd_triton",
        _make_kl_backward(kl_kernels.kl_penalty_bwd_triton),
        setup_context=_kl_setup_context,
        triton_op=kl_kernels.kl_penalty_fwd_triton,
    )
