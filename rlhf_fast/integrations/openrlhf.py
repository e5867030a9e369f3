"""OpenRLHF adapter: `rlhf_fast.integrations.openrlhf.patch()`.

Replaces, where the installed OpenRLHF has them (and every binding an OpenRLHF
module imported by name, e.g. `from .utils import log_probs_from_logits` in
openrlhf/models/actor.py):
- openrlhf.models.utils.log_probs_from_logits(logits, labels, temperature=1.0)
- openrlhf.models.utils.compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"): k1 and k2
- openrlhf.models.loss.PolicyLoss.forward and ValueLoss.forward (the classes stay,
  so existing instances and isinstance checks keep working)
- get_advantages_and_returns, the GAE method of the experience maker classes in
  openrlhf.trainer.ppo_utils.experience_maker

Semantics kept (read from OpenRLHF's models/utils.py, models/loss.py and
trainer/ppo_utils/experience_maker.py):
- log_probs_from_logits divides the logits IN PLACE when temperature != 1, like
  the original (`logits.div_(temperature)`): OpenRLHF's actor returns those
  logits to callers that compute the entropy from them, so not mutating would
  silently change that entropy. The division costs one read+write of the
  logits, as in OpenRLHF; the log-probs then take one fused pass. Output: the
  logits' dtype.
- compute_approx_kl: float32 output (the original calls .float()). k3 falls
  back: OpenRLHF's k3 has no clamps, ours clamps like verl's low_var_kl.
- PolicyLoss: ratio = exp(log_probs - old_log_probs) with no clamp, clip_eps_low
  / clip_eps_high, dual_clip, token-level or per-sequence mean; returns the
  tuple of the installed version: (loss, clip_ratio, ppo_kl) or (loss,
  clip_ratio). Calls our fused loss only where it gives the same numbers; one
  host sync per call checks for |log ratio| > 20 (our op clamps there), an
  all-masked batch, or an empty row with token_level_loss=False (0/0 = NaN in
  OpenRLHF) and falls back for those.
- ValueLoss: 0.5 * mean(max((clip(v) - R)^2, (v - R)^2)) with clip_eps, or
  unclipped; the same sync-checked fallbacks.
- GAE: OpenRLHF multiplies values and rewards by the mask and then runs the
  plain recursion over every position (masked positions still decay the carry).
  We run our GAE kernel on exactly those masked tensors with an all-valid mask,
  so holes inside a mask give OpenRLHF's numbers, not verl's. Packed samples
  (lists) go to the original, which calls the patched method per sample.

Falls back (logged once) for anything else: GSPO (`policy_loss_type != "ppo"`),
PolicyLoss / ValueLoss options a newer version added (any instance attribute
we do not know), forward arguments such as rollout_log_probs, non-(B, T) inputs,
float masks with values other than 0/1, gamma/lambd outside [0, 1].
If the installed PolicyLoss.forward returns something we cannot recognise from
its source, PolicyLoss is left unpatched (logged).
Differences that remain: masked positions are never read by our kernels, so
NaN padding there does not turn the loss into NaN as `x * mask` does.
"""
from __future__ import annotations

import inspect
import logging

import torch

from ._patching import (
    Fallback, Patcher, Target, check_mask, check_tokens, is_real, make_replacement, unit_interval,
)  # fmt: skip

log = logging.getLogger("rlhf_fast.integrations")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------- log-probs, KL


def _make_log_probs_from_logits(original, mod):
    def body(a, original):
        import rlhf_fast

        logits, labels, t = a["logits"], a["labels"], a["temperature"]
        if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS or logits.dim() < 2:
            raise Fallback("logits that are not a float tensor of >= 2 dims")
        if logits.numel() == 0:
            raise Fallback("empty logits")
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise Fallback("labels that are not an int32/int64 tensor")
        if tuple(labels.shape) != tuple(logits.shape[:-1]) or labels.device != logits.device:
            raise Fallback("labels whose shape is not logits.shape[:-1]")
        if not is_real(t):
            raise Fallback("a temperature that is not a Python number")
        if t != 1.0:
            logits.div_(t)  # in place, as OpenRLHF: callers read the tempered logits afterwards
        lp = rlhf_fast.logprobs_from_logits(logits, labels, ignore_index=-(2**63))
        return lp.to(logits.dtype)

    return make_replacement(original, body, "openrlhf log_probs_from_logits", {"logits", "labels", "temperature"})


def _make_compute_approx_kl(original, mod):
    def body(a, original):
        import rlhf_fast

        lp, base, kind = a["log_probs"], a["log_probs_base"], a["kl_estimator"]
        if kind not in ("k1", "k2"):
            raise Fallback(f"kl_estimator={kind!r} (OpenRLHF's k3 is unclamped)")
        for t in (lp, base):
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
                raise Fallback("log-probs that are not float tensors")
        if lp.shape != base.shape or lp.device != base.device:
            raise Fallback("log-probs of different shapes (broadcasting)")
        return rlhf_fast.kl_penalty(lp.float(), base.float(), kind=kind)

    return make_replacement(original, body, "openrlhf compute_approx_kl", {"log_probs", "log_probs_base", "kl_estimator"})


# ---------------------------------------------------------------- losses


def _own_options(module) -> set[str]:
    """Instance attributes set by the loss's __init__ (not nn.Module's own)."""
    return {k for k in vars(module) if not k.startswith("_") and k != "training"}


def _valid_mask(mask, like, per_row: bool):
    """bool validity mask; Fallback where OpenRLHF's masked_mean gives 0/0."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    valid = check_mask(mask, like)
    rows = valid.sum(-1)
    bad = (rows.min() == 0) if per_row else (rows.sum() == 0)
    if bool(bad):
        raise Fallback("an all-masked batch, or an empty row with token_level_loss=False (NaN in OpenRLHF)")
    return valid


def _returns_arity(forward) -> int | None:
    """How many values the installed PolicyLoss.forward returns, read from its source."""
    try:
        src = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    returns = [line.strip() for line in src.splitlines() if line.strip().startswith("return ")]
    if not returns:
        return None
    last = returns[-1].replace(" ", "")
    return {"returnloss,clip_ratio,ppo_kl": 3, "returnloss,clip_ratio": 2}.get(last)


def _make_policy_loss_forward(original, mod):
    arity = _returns_arity(original)
    if arity is None:
        log.warning("rlhf_fast: openrlhf PolicyLoss.forward returns values this adapter does not know; not patched")
        return None
    known_opts = {"clip_eps_low", "clip_eps_high", "token_level_loss", "dual_clip", "policy_loss_type"}

    def body(a, original):
        import rlhf_fast

        self = a["self"]
        extra = _own_options(self) - known_opts
        if extra:
            raise Fallback(f"PolicyLoss options {sorted(extra)}")
        if getattr(self, "policy_loss_type", "ppo") != "ppo":
            raise Fallback(f"policy_loss_type={self.policy_loss_type!r}")
        lp, old, adv = a["log_probs"], a["old_log_probs"], a["advantages"]
        check_tokens("log-probs and advantages", lp, old, adv)
        token_level = bool(self.token_level_loss)
        valid = _valid_mask(a["action_mask"], lp, per_row=not token_level)
        if bool((((lp - old).abs() > 20) & valid).any()):
            raise Fallback("|log_probs - old_log_probs| > 20 (our op clamps the log-ratio there)")
        dual = getattr(self, "dual_clip", None)
        loss, st = rlhf_fast.ppo_policy_loss(
            lp, old, adv, valid, clip_low=float(self.clip_eps_low), clip_high=float(self.clip_eps_high),
            dual_clip=None if dual is None else float(dual),
            agg="token-mean" if token_level else "seq-mean-token-mean",
        )  # fmt: skip
        dtype = torch.promote_types(torch.promote_types(lp.dtype, old.dtype), adv.dtype)
        out = (loss.to(dtype), st["clipfrac"].float(), st["approx_kl"].to(torch.promote_types(lp.dtype, old.dtype)))
        return out[:arity]

    known = {"self", "log_probs", "old_log_probs", "advantages", "action_mask"}
    return make_replacement(original, body, "openrlhf PolicyLoss.forward", known)


def _make_value_loss_forward(original, mod):
    def body(a, original):
        import rlhf_fast

        self = a["self"]
        extra = _own_options(self) - {"clip_eps", "token_level_loss"}
        if extra:
            raise Fallback(f"ValueLoss options {sorted(extra)}")
        clip = self.clip_eps
        if clip is not None and not (is_real(clip) and float(clip) > 0):
            raise Fallback("clip_eps that is not None or a positive number")
        v, old, ret = a["values"], a["old_values"], a["returns"]
        check_tokens("values and returns", v, old, ret)
        token_level = bool(self.token_level_loss)
        valid = _valid_mask(a["action_mask"], v, per_row=not token_level)
        loss, _ = rlhf_fast.ppo_value_loss(
            v, old, ret, valid, clip=None if clip is None else float(clip),
            agg="token-mean" if token_level else "seq-mean-token-mean",
        )  # fmt: skip
        return loss.to(torch.promote_types(torch.promote_types(v.dtype, old.dtype), ret.dtype))

    return make_replacement(original, body, "openrlhf ValueLoss.forward", {"self", "values", "old_values", "returns", "action_mask"})


def _make_loss_forward(original, mod):
    owner = original.__qualname__.split(".")[0]
    if owner == "PolicyLoss":
        return _make_policy_loss_forward(original, mod)
    if owner == "ValueLoss":
        return _make_value_loss_forward(original, mod)
    return None  # GPTLMLoss, DPOLoss, ...: not ours


# ---------------------------------------------------------------- GAE


def _make_gae_method(original, mod):
    def body(a, original):
        import rlhf_fast

        v, r, m = a["values"], a["rewards"], a["action_mask"]
        if isinstance(v, list) or isinstance(r, list):
            raise Fallback("packed samples (lists; the original calls this method per sample)")
        check_tokens("values and rewards", v, r)
        gamma, lam = unit_interval("gamma", a["gamma"]), unit_interval("lambd", a["lambd"])
        with torch.no_grad():
            if m is not None:
                if not isinstance(m, torch.Tensor) or m.shape != v.shape:
                    raise Fallback("an action_mask of another shape")
                v, r = m * v, m * r  # OpenRLHF zeroes masked values/rewards, then recurses over every position
            ones = torch.ones_like(v, dtype=torch.bool)
            adv, _ = rlhf_fast.gae(r, v, ones, gamma=gamma, lam=lam)
            adv = adv.to(torch.promote_types(v.dtype, r.dtype))
            return adv, adv + v

    known = {"self", "values", "rewards", "action_mask", "gamma", "lambd"}
    return make_replacement(original, body, "openrlhf get_advantages_and_returns", known)


TARGETS = [
    Target("openrlhf.models.utils", "log_probs_from_logits", _make_log_probs_from_logits),
    Target("openrlhf.models.utils", "compute_approx_kl", _make_compute_approx_kl),
    Target("openrlhf.models.loss", "forward", _make_loss_forward, kind="method"),
    Target("openrlhf.trainer.ppo_utils.experience_maker", "get_advantages_and_returns", _make_gae_method, kind="method"),
]

_patcher = Patcher("openrlhf", TARGETS)
patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched
replaced = _patcher.replaced

__all__ = ["patch", "unpatch", "patched", "replaced", "TARGETS"]
