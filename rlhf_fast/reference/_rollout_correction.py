"""Rollout correction: the spec and its eager reference (from the definitions).

The inference engine samples with pi_rollout; the trainer recomputes
pi_old with its own kernels. Their gap is corrected in the PPO loss with
stop-gradient weights of lr_t = log pi_old - log pi_rollout (verl's
rollout_corr_helper.py names, thresholds and metrics):

  rollout_is = "token":      w_t = exp(clamp(lr_t, -20, 20))
               "sequence":   w_t = exp(clamp(sum_t lr_t, -20, 20))       (product of ratios)
               "geometric":  w_t = exp(clamp(mean_t lr_t, -20, 20))      (rlhf_fast extension)
  rollout_is_threshold = u        TIS:    w = min(w, u)
                       = "l_u"    IcePop: w = w if l <= w <= u else 0
  rollout_rs = verl's option (token_k1..3, seq_sum_k1..3, seq_mean_k1..3,
      seq_max_k2/3): tokens (or whole rows) whose statistic leaves the
      bounds are rejected, i.e. removed from the mask for every term of the
      loss and for its aggregation. k1 = -lr (bounds [log l, log u]; one
      number u means l = 1/u), k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr (upper
      bound only); seq_mean_k1 is verl's geometric rejection ("Geo-RS").
The weight multiplies the clipped policy term (loss and gradient), not the
KL or entropy terms, as verl's compute_policy_loss_* do.

Differences from verl, on purpose (the kernels do the same): masked
positions are zeroed before any arithmetic; row means / fractions are over
non-empty rows (verl's include empty rows, whose masked means are 0);
k3_kl clamps lr to +-20 like every other exp here; the sequence-level
rollout_is_min is clamped at exp(-20) like its max; one rollout_rs option
(verl accepts a comma-separated list); no batch normalisation of weights.
"""

from __future__ import annotations

import math

import torch

from .._dtypes import acc_dtype
from ..specs import IS_LEVELS, RC_STATS, RS_OPTIONS, SAFETY_BOUND, RolloutCorrection  # noqa: F401

# ---------------------------------------------------------------- reference math


def _mean(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def correction_terms(old_logprobs, rollout_logprobs, mask, spec: RolloutCorrection | None):
    """(w, keep, metrics): w (B, T) the weight of each token's clipped term
    (1 without rollout_is), keep (B, T) bool the mask after rejection, and
    the rollout_corr/* metrics (dict of 0-dim tensors, keys RC_STATS)."""
    spec = spec or RolloutCorrection()
    acc = acc_dtype(old_logprobs.dtype)
    valid = mask if mask.dtype == torch.bool else mask != 0
    zero = torch.zeros((), dtype=acc, device=old_logprobs.device)
    old = torch.where(valid, old_logprobs.detach().to(acc), zero)
    roll = torch.where(valid, rollout_logprobs.detach().to(acc), zero)
    fv = valid.to(acc)
    lr = old - roll
    lrc = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    rho = torch.exp(lrc)
    k = {1: -lrc, 2: 0.5 * lrc * lrc, 3: rho - 1 - lrc}
    n0 = fv.sum(-1)
    s_lr = lr.sum(-1)
    is_lo, is_hi, rs_lo, rs_hi = spec._parsed
    lo_m = is_lo if is_lo is not None else 1.0 / is_hi

    # importance weights
    if spec.rollout_is == "token":
        raw = rho
    elif spec.rollout_is in ("sequence", "geometric"):
        row = s_lr if spec.rollout_is == "sequence" else _mean(s_lr, n0)
        raw = torch.exp(row.clamp(-SAFETY_BOUND, SAFETY_BOUND))[:, None].expand_as(lr)
    else:
        raw = torch.ones_like(lr)
    hi_t, lo_t = torch.tensor(is_hi, dtype=acc), torch.tensor(lo_m, dtype=acc)
    if is_lo is None:
        w = torch.minimum(raw, hi_t)
    else:
        w = torch.where((raw >= lo_t) & (raw <= hi_t), raw, zero)

    # rejection
    keep = valid.clone()
    if spec.rollout_rs is not None:
        level, kk = spec.rollout_rs.rsplit("_", 1)
        kk = int(kk[1])
        stat = torch.where(valid, k[kk], zero)
        if level == "seq_sum":
            stat = stat.sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = _mean(stat.sum(-1), n0)[:, None]
        elif level == "seq_max":
            stat = stat.amax(-1, keepdim=True) if stat.shape[-1] else stat.sum(-1, keepdim=True)
        ok = stat <= torch.tensor(rs_hi, dtype=acc)
        if kk == 1:
            ok = ok & (stat >= torch.tensor(rs_lo, dtype=acc))
        keep = valid & ok.expand_as(valid)

    # metrics
    N, nonempty = fv.sum(), n0 > 0
    S = nonempty.to(acc).sum()

    def tok_mean(x):
        return _mean(torch.where(valid, x, zero).sum(), N)

    def row_mean(x):
        return _mean(torch.where(nonempty, x, zero).sum(), S)

    def masked_ext(x, fn, fill):
        x = torch.where(valid, x, torch.full((), fill, dtype=acc))
        return fn(x) if x.numel() else zero

    m = dict.fromkeys(RC_STATS, zero)
    if spec.rollout_is is not None and N > 0:
        m["rollout_is_mean"] = tok_mean(w)
        if spec.rollout_is == "token":
            m["rollout_is_max"] = masked_ext(w, torch.amax, -math.inf)
            m["rollout_is_min"] = masked_ext(w, torch.amin, math.inf)
            m["rollout_is_ratio_fraction_high"] = tok_mean((raw > hi_t).to(acc))
            m["rollout_is_ratio_fraction_low"] = tok_mean((raw < lo_t).to(acc))
        else:
            rr = raw[:, 0] if raw.shape[-1] else torch.ones_like(n0)
            m["rollout_is_max"] = torch.where(nonempty, rr, torch.full((), -math.inf, dtype=acc)).amax()
            m["rollout_is_min"] = torch.where(nonempty, rr, torch.full((), math.inf, dtype=acc)).amin()
            m["rollout_is_ratio_fraction_high"] = row_mean((rr > hi_t).to(acc))
            m["rollout_is_ratio_fraction_low"] = row_mean((rr < lo_t).to(acc))
    if spec.rollout_rs is not None:
        rej = valid & ~keep
        m["rollout_rs_masked_fraction"] = tok_mean(rej.to(acc))
        m["rollout_rs_seq_masked_fraction"] = row_mean(rej.any(-1).to(acc))
    if N > 0:
        mo, mr = _mean(old.sum(-1), n0), _mean(roll.sum(-1), n0)
        m["kl"] = tok_mean(-lr)
        m["k3_kl"] = tok_mean(k[3])
        m["chi2_token"] = tok_mean(rho * rho) - 1
        m["chi2_seq"] = row_mean(torch.exp(2 * s_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND))) - 1
        m["training_ppl"] = row_mean(torch.exp(-mo))
        m["rollout_ppl"] = row_mean(torch.exp(-mr))
        m["training_log_ppl"] = row_mean(-mo)
        m["rollout_log_ppl"] = row_mean(-mr)
        m["log_ppl_diff"] = row_mean(mr - mo)
        m["log_ppl_abs_diff"] = row_mean((mr - mo).abs())
        m["ppl_ratio"] = row_mean(torch.exp(mr - mo))
    w = w if spec.rollout_is is not None else torch.ones_like(w)
    return w.detach(), keep, m
