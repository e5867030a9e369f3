"""The specs every layer shares: the aggregation modes, KL estimators and
group estimators the loss and advantage ops accept, and RolloutCorrection
(what to do with the rollout/trainer gap inside ppo_loss, with verl's field
names and threshold syntax; the math is in reference/_rollout_correction.py).
The ops, the trainer and the reference import them from here, so the oracle
is not where the fast path learns its own options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "abs")
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
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
