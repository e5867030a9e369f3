"""Reference PPO losses: eager torch, verl's formulas (core_algos.py), one
(B, T) tensor per intermediate. The tests' float64 oracle, the benchmarks'
baseline chain and the fallback when no kernel runs.

Differences from verl, on purpose (the kernels do the same):
  * masked positions are replaced by 0 before any arithmetic, so NaN / inf
    padding never reaches the loss or the gradients (verl multiplies by the
    mask: NaN * 0 = NaN);
  * means divide by the exact count (verl adds 1e-8), and a mean over
    nothing is 0: an all-masked batch gives loss 0, zero gradients, zero stats;
  * seq-mean modes average over non-empty rows only (verl's
    seq-mean-token-mean divides an empty row by 0 and returns NaN);
  * a mask is "valid where != 0".
Gradients at ties follow torch exactly (max / min split the gradient in
half, clamp passes it at its bounds), so the kernels can be compared
token by token even on the clip boundaries.

Packed inputs (cu_seqlens, docs/packing.md): the tokens are scattered into
(S, longest segment) rows (differentiably: gradients come back through the
scatter) and the padded formulas run on them, so every row statistic
(aggregation, sequence-level correction) is a segment's. The longest
segment is read on the host (a sync on GPU: this is the oracle, not a fast
path). seq-mean-token-sum-norm's agg_norm defaults to the longest segment
there (the width of those rows, as T is the padded default).
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ..specs import AGG_MODES, KL_KINDS
from . import _rollout_correction as _rc

LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi / pi_old) to +-20 before exp
K3_CLAMP = 10.0  # verl's low_var_kl clamps the estimate to +-10


def to_rows(cu_seqlens: torch.Tensor, *tensors):
    """Packed (total,) tensors -> (S, longest segment) rows, right-padded;
    None stays None. The last output is the (S, L) bool mask of the real tokens."""
    total = next(t for t in tensors if t is not None).shape[0]
    cu = cu_seqlens.to(torch.int64)
    S = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    L = int(lengths.max()) if S > 0 else 0
    seg = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
    pos = torch.arange(total, device=cu.device) - cu[seg]
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        rows = torch.zeros((S, L), dtype=t.dtype, device=t.device)
        out.append(rows.index_put((seg, pos), t))
    real = torch.zeros((S, L), dtype=torch.bool, device=cu.device).index_put(
        (seg, pos), torch.ones_like(seg, dtype=torch.bool)
    )
    return (*out, real)


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(x: torch.Tensor, valid: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    x = x.to(acc)
    return torch.where(valid, x, torch.zeros((), dtype=acc, device=x.device))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (a mean over nothing)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", agg_norm: float | None = None):
    """loss_mat: (B, T), already 0 at masked positions; mask: (B, T) bool."""
    valid = _valid(mask)
    per_row = loss_mat.sum(-1)
    n_row = valid.sum(-1).to(loss_mat.dtype)
    if agg == "token-mean":
        return _safe_div(per_row.sum(), n_row.sum())
    nonempty = (n_row > 0).to(loss_mat.dtype)
    if agg == "seq-mean-token-sum":
        return _safe_div(per_row.sum(), nonempty.sum())
    if agg == "seq-mean-token-mean":
        return _safe_div(_safe_div(per_row, n_row).sum(), nonempty.sum())
    if agg == "seq-mean-token-sum-norm":
        norm = float(loss_mat.shape[-1]) if agg_norm is None else float(agg_norm)
        return per_row.sum() / norm
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _token_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _safe_div(torch.where(valid, x, torch.zeros_like(x)).sum(), valid.sum().to(x.dtype))


def ppo_policy_loss_terms(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, weights=None
):
    """Per-token clipped policy loss (B, T) (0 where masked) and the
    token-mean stats. verl compute_policy_loss_vanilla, dual clip optional;
    weights (B, T), stop-gradient, multiply the per-token loss (verl's
    rollout_is_weights)."""
    acc = acc_dtype(logprobs.dtype)
    valid = _valid(mask)
    lp = _masked(logprobs, valid, acc)
    old = _masked(old_logprobs, valid, acc).detach()
    adv = _masked(advantages, valid, acc).detach()
    clip_high = clip_low if clip_high is None else clip_high
    neg_kl = torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        clip2 = torch.min(pg3, clip1)
        lower = (clip1 > pg3) & (adv < 0)
        pg = torch.where(adv < 0, clip2, clip1)
    else:
        lower = torch.zeros_like(clipped)
        pg = clip1
    if weights is not None:
        pg = pg * weights.detach().to(acc)
    pg = torch.where(valid, pg, torch.zeros_like(pg))
    ratio_d = ratio.detach()
    stats = {
        "clipfrac": _token_mean(clipped.to(acc), valid),
        "clipfrac_lower": _token_mean(lower.to(acc), valid),
        "approx_kl": _token_mean(-neg_kl.detach(), valid),
        "ratio_mean": _token_mean(ratio_d, valid),
        "ratio_max": torch.where(valid, ratio_d, torch.zeros_like(ratio_d)).amax()
        if ratio_d.numel() > 0
        else ratio_d.new_zeros(()),
    }
    return pg, stats


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
    """(loss, stats): agg of the clipped surrogate; see rlhf_fast.ppo_policy_loss."""
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
    return loss, {k: v for k, v in stats.items() if k not in ("pg_loss", "entropy", "kl")}


def kl_penalty(logprobs, ref_logprobs, *, kind="k3"):
    """Per-token KL estimate of logprobs vs ref_logprobs (verl kl_penalty),
    fp32 (fp64 for fp64 inputs); differentiable in logprobs only."""
    acc = acc_dtype(logprobs.dtype)
    lp = logprobs.to(acc)
    ref = ref_logprobs.to(acc).detach()
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref).square()
    if kind == "abs":
        return (lp - ref).abs()
    if kind == "k3":
        kl = torch.clamp(ref - lp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(kl) - kl - 1, -K3_CLAMP, K3_CLAMP)
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


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
    """The actor objective: pg - entropy_coef * agg(entropy) + kl_coef * agg(kl).
    Stats: the policy stats plus pg_loss, entropy and kl (each aggregated).
    With rollout_logprobs: the rollout_corr/* metrics, and rollout_correction
    (a RolloutCorrection) weights the clipped term and rejects tokens.
    cu_seqlens: packed (total,) inputs, one row per segment."""
    if cu_seqlens is not None:
        *rows, real = to_rows(
            cu_seqlens, logprobs, old_logprobs, advantages, _valid(mask), entropy, ref_logprobs, rollout_logprobs
        )
        agg_norm = float(max(real.shape[1], 1)) if agg_norm is None else agg_norm
        logprobs, old_logprobs, advantages, mask, entropy, ref_logprobs, rollout_logprobs = rows
        mask = mask & real
    valid = _valid(mask)
    acc = acc_dtype(logprobs.dtype)
    weights, rc_stats = None, {}
    if rollout_logprobs is not None:
        weights, valid, rc = _rc.correction_terms(old_logprobs, rollout_logprobs, valid, rollout_correction)
        rc_stats = {f"rollout_corr/{k}": v for k, v in rc.items()}
        if rollout_correction is None or rollout_correction.rollout_is is None:
            weights = None
    elif rollout_correction is not None and rollout_correction.enabled:
        raise ValueError("rollout_correction needs rollout_logprobs")
    mask = valid
    pg, stats = ppo_policy_loss_terms(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        weights=weights,
    )
    pg_loss = agg_loss(pg, valid, agg, agg_norm)
    zero = pg_loss.new_zeros(())
    ent_loss = zero
    if entropy is not None:
        ent_loss = agg_loss(_masked(entropy, valid, acc), valid, agg, agg_norm)
    kl_loss = zero
    if ref_logprobs is not None:
        kl = kl_penalty(_masked(logprobs, valid, acc), _masked(ref_logprobs, valid, acc), kind=kl_kind)
        kl_loss = agg_loss(torch.where(valid, kl, torch.zeros_like(kl)), valid, agg, agg_norm)
    loss = pg_loss - entropy_coef * ent_loss + kl_coef * kl_loss
    stats = {"pg_loss": pg_loss.detach(), "entropy": ent_loss.detach(), "kl": kl_loss.detach(), **stats, **rc_stats}
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", agg_norm=None, cu_seqlens=None):
    """0.5 * agg(max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)).
    Stats: clipfrac (token mean of the clipped term winning) and
    explained_variance = 1 - Var[R - v] / (Var[R] + 1e-8), population
    variances over the valid tokens (0 when nothing is valid).
    cu_seqlens: packed (total,) inputs, one row per segment."""
    if cu_seqlens is not None:
        values, old_values, returns, mask, real = to_rows(cu_seqlens, values, old_values, returns, _valid(mask))
        agg_norm = float(max(real.shape[1], 1)) if agg_norm is None else agg_norm
        mask = mask & real
    acc = acc_dtype(values.dtype)
    valid = _valid(mask)
    v = _masked(values, valid, acc)
    v_old = _masked(old_values, valid, acc).detach()
    ret = _masked(returns, valid, acc).detach()
    vf1 = (v - ret).square()
    if clip is None:
        vf = vf1
        clipped = torch.zeros_like(valid)
    else:
        vf2 = (torch.clamp(v, v_old - clip, v_old + clip) - ret).square()
        vf = torch.maximum(vf1, vf2)
        clipped = vf2 > vf1
    vf = torch.where(valid, vf, torch.zeros_like(vf))
    loss = 0.5 * agg_loss(vf, valid, agg, agg_norm)
    n = valid.sum().to(acc)
    err = (ret - v).detach()

    def var(x):
        mean = _token_mean(x, valid)
        return _token_mean((x - mean).square(), valid)

    ev = torch.where(n > 0, 1 - var(err) / (var(ret) + 1e-8), torch.zeros((), dtype=acc, device=v.device))
    stats = {"clipfrac": _token_mean(clipped.to(acc), valid), "explained_variance": ev}
    return loss, stats
