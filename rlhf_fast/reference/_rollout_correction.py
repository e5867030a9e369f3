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
from dataclasses import dataclass, field

import torch

from .._dtypes import acc_dtype

IS_LEVELS = ("token", "sequence", "geometric")
RS_OPTIONS = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)
SAFETY_BOUND = 20.0
# Order of the rollout_corr/* entries appended to ppo_loss's stats vector.
RC_STATS = (
    "rollout_is_mean",
    "rollout_is_max",
    "rollout_is_min",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_rs_masked_fraction",
    "rollout_rs_seq_masked_fraction",
    "kl",
    "k3_kl",
    "chi2_token",
    "chi2_seq",
    "training_ppl",
    "rollout_ppl",
    "training_log_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "log_ppl_abs_diff",
    "ppl_ratio",
)


def _positive(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"RolloutCorrection: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"RolloutCorrection: {name} must be > 0 and finite, got {x}")
    return x


def _bounds(name: str, spec) -> tuple[float | None, float]:
    """verl's threshold syntax: a number u, or the string "l_u" -> (l, u)."""
    if isinstance(spec, str):
        parts = spec.strip().split("_")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"RolloutCorrection: {name} must be a number or 'lower_upper', got {spec!r}") from None
        if len(nums) == 1:
            return None, _positive(name, nums[0])
        if len(nums) != 2:
            raise ValueError(f"RolloutCorrection: {name} must be a number or 'lower_upper', got {spec!r}")
        lo, hi = _positive(f"{name} lower", nums[0]), _positive(f"{name} upper", nums[1])
    else:
        return None, _positive(name, spec)
    if lo > hi:
        raise ValueError(f"RolloutCorrection: {name} lower bound {lo} > upper bound {hi}")
    return lo, hi


@dataclass(frozen=True)
class RolloutCorrection:
    """What to do with the rollout/trainer gap inside ppo_loss (verl's field names).

    rollout_is: None, "token", "sequence" or "geometric".
    rollout_is_threshold: u (TIS: weights truncated at u) or "l_u" (IcePop:
        weights outside [l, u] become 0). verl's default 2.0.
    rollout_rs: None or one of RS_OPTIONS (rejection sampling).
    rollout_rs_threshold: for *_k1: "l_u" or u (then l = 1/u), ratio bounds;
        for k2 / k3: an upper bound u.
    """

    rollout_is: str | None = None
    rollout_is_threshold: float | str = 2.0
    rollout_rs: str | None = None
    rollout_rs_threshold: float | str | None = None
    # parsed: (is_lower or None, is_upper, rs_lower, rs_upper); rs k1 bounds in log space
    _parsed: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.rollout_is is not None and self.rollout_is not in IS_LEVELS:
            raise ValueError(
                f"RolloutCorrection: rollout_is must be None or one of {IS_LEVELS}, got {self.rollout_is!r}"
            )
        is_lo, is_hi = _bounds("rollout_is_threshold", self.rollout_is_threshold)
        rs_lo = rs_hi = 0.0
        if self.rollout_rs is not None:
            if self.rollout_rs not in RS_OPTIONS:
                raise ValueError(
                    f"RolloutCorrection: rollout_rs must be None or one of {RS_OPTIONS} (one option), "
                    f"got {self.rollout_rs!r}"
                )
            if self.rollout_rs_threshold is None:
                raise ValueError("RolloutCorrection: rollout_rs needs rollout_rs_threshold")
            lo, hi = _bounds("rollout_rs_threshold", self.rollout_rs_threshold)
            if self.rollout_rs.endswith("k1"):
                rs_lo, rs_hi = math.log(1.0 / hi if lo is None else lo), math.log(hi)
            elif lo is not None:
                raise ValueError(f"RolloutCorrection: {self.rollout_rs} takes an upper bound only, got {lo}_{hi}")
            else:
                rs_hi = hi
        object.__setattr__(self, "_parsed", (is_lo, is_hi, rs_lo, rs_hi))

    @property
    def enabled(self) -> bool:
        return self.rollout_is is not None or self.rollout_rs is not None

    def kernel_args(self) -> tuple:
        """(rc_is, rc_is_upper, rc_is_lower, rc_rs, rc_rs_lower, rc_rs_upper) for rlhf_fast::ppo_loss_fwd."""
        is_lo, is_hi, rs_lo, rs_hi = self._parsed
        return (self.rollout_is or "none", is_hi, is_lo, self.rollout_rs or "none", rs_lo, rs_hi)

    @classmethod
    def from_dict(cls, d: dict | None) -> RolloutCorrection | None:
        """From a config block (verl's keys); None or an empty block gives None."""
        if not d:
            return None
        unknown = set(d) - {"rollout_is", "rollout_is_threshold", "rollout_rs", "rollout_rs_threshold"}
        if unknown:
            raise ValueError(f"RolloutCorrection: unknown keys {sorted(unknown)}")
        return cls(**d)


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
