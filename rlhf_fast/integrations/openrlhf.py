"""OpenRLHF adapter: `rlhf_fast.integrations.openrlhf.patch()`.

Supported: OpenRLHF >=0.11,<0.12 (tested against 0.11.2); patch() raises
UnsupportedVersion outside that range.

Replaces (and every binding an OpenRLHF module imported by name, e.g.
`from .utils import log_probs_from_logits` in openrlhf/models/actor.py, which
the actor's forward calls on every training and experience step):
- openrlhf.models.utils.log_probs_from_logits(logits, labels, temperature=1.0)
- get_advantages_and_returns, the GAE method of the experience maker classes in
  openrlhf.trainer.ppo_utils.experience_maker

Semantics kept (read from 0.11.2's models/utils.py and experience_maker.py):
- log_probs_from_logits divides the logits IN PLACE when temperature != 1, like
  the original (`logits.div_(temperature)`): the actor computes the entropy
  from those logits afterwards. Output: the logits' dtype.
- GAE: OpenRLHF multiplies values and rewards by the mask and then runs the
  plain recursion over every position (masked positions still decay the carry).
  We run our GAE kernel on exactly those masked tensors with an all-valid mask,
  so holes inside a mask give OpenRLHF's numbers, not verl's.

Packed samples (`packing_samples=True`): OpenRLHF 0.11 unpads the batch inside
Actor.forward / CriticModel.forward, runs the model on (1, total) tokens with
position_ids restarting per sample, and pads back (gather_and_pad_tensor)
before GAE and the losses. The one replaced function that sees the packed
stream is log_probs_from_logits, called on the packed (1, total, V) logits with
the labels rolled per sample before unpadding: the patch serves that call as
any other (tests/test_integrations_openrlhf.py runs the real packed
Actor.forward against the padded one).

Declined (not patched), because 0.11.2 changed them:
- PolicyLoss.forward returns 5 values and folds rollout correction (IS ratios,
  masking, binary KL), GSPO and the dp_size / batch_num_tokens /
  global_batch_size scaling into one forward; our fused loss covers only the
  plain clipped surrogate, so a replacement would fall back on most calls.
- ValueLoss.forward: always called with the distributed scaling arguments.
- compute_approx_kl: clamps every estimator to +-10 and has an
  unbiased-gradient straight-through option; elementwise, nothing to fuse.
"""

from __future__ import annotations

import logging

import torch

from ._patching import (
    Fallback,
    Patcher,
    Target,
    check_tokens,
    is_real,
    make_replacement,
    unit_interval,
)

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


# ---------------------------------------------------------------- GAE


def _make_gae_method(original, mod):
    def body(a, original):
        import rlhf_fast

        v, r, m = a["values"], a["rewards"], a["action_mask"]
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
    Target(
        "openrlhf.trainer.ppo_utils.experience_maker", "get_advantages_and_returns", _make_gae_method, kind="method"
    ),
]

SUPPORTED = ("0.11.0", "0.12.0")
_patcher = Patcher("openrlhf", TARGETS, SUPPORTED)
register, patch, unpatch, patched, replaced = _patcher.module_api()

__all__ = ["patch", "unpatch", "patched", "replaced", "register", "TARGETS", "SUPPORTED"]
