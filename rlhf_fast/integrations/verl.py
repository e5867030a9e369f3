"""verl adapter: `rlhf_fast.integrations.verl.patch()`.

Replaces, where the installed verl has them (and every binding a verl module
imported by name, and the registry entries verl's trainers look them up in):
- verl.utils.torch_functional.logprobs_from_logits(logits, labels, inplace_backward=True)
- verl.utils.torch_functional.entropy_from_logits(logits)
- verl.trainer.ppo.core_algos.compute_gae_advantage_return (+ ADV_ESTIMATOR_REGISTRY["gae"])
- verl.trainer.ppo.core_algos.compute_policy_loss (clip, clip-higher, dual clip)
- verl.trainer.ppo.core_algos.compute_policy_loss_vanilla (+ POLICY_LOSS_REGISTRY["vanilla"])
- verl.trainer.ppo.core_algos.kl_penalty (kl/k1, abs, mse/k2, low_var_kl/k3)

Semantics kept (read from verl's core_algos.py and torch_functional.py):
- logprobs_from_logits returns float32 where verl would use flash-attn's
  cross-entropy (its module flag FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE), else
  the logits' dtype (verl's logprobs_from_logits_v2). entropy_from_logits: the
  logits' dtype. Neither takes a temperature: verl's actor divides the logits in
  place *before* calling them (`logits.div_(temperature)`), which this adapter
  does not touch, so nothing here mutates its inputs, as in verl.
- GAE: masked positions are skipped (multi-turn observation tokens); at masked
  positions the advantage holds the carried value of the next valid position,
  returns = advantages + values everywhere, then verl's own masked_whiten (taken
  from the installed verl, so its +1e-8, unbiased variance and its errors on 0
  or 1 valid tokens are verl's). Outputs in the promoted dtype of the inputs,
  without gradient (verl runs it under no_grad).
- Policy loss: log-ratio clamped to +-20, clip-higher, dual clip (clip_ratio_c),
  token-mean / seq-mean-token-sum / seq-mean-token-mean /
  seq-mean-token-sum-norm; returns (pg_loss, pg_clipfrac, ppo_kl,
  pg_clipfrac_lower) in verl's dtypes. seq-mean-token-sum averages over all B
  rows as verl does (our op averages over non-empty rows; rescaled by
  n_nonempty / B, no sync). seq-mean-token-mean with an empty row, where verl
  divides 0 by 0, falls back (one host sync to find out, that mode only).
- kl_penalty: the same estimators and clamps; dtype of the promoted inputs.

Falls back (logged once) for: a loss_agg_mode we do not implement
(token-mean-unbiased, newer modes), any parameter a newer verl added and the
caller set, the "+"-suffixed straight-through KL kinds, "full", bool masks in
GAE (verl's `1 - mask` raises on them), float masks holding values other than
0/1, non-(B, T) inputs, gamma/lam outside [0, 1].

Not replaced: agg_loss (two or three torch reductions; nothing to fuse on its
own, and the policy-loss replacement already aggregates inside the fused op),
compute_value_loss, the GRPO/RLOO/REINFORCE++ estimators, and the flash-attn /
fused-linear log-prob paths verl selects with its own flags.
Differences that remain: our kernels never read masked positions, so NaN or
inf padding there, which verl's `x * mask` turns into NaN, stays harmless; our
token means divide by the exact count where newer verl adds 1e-8 (relative
difference 1e-8 / count, below fp32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._patching import Fallback, Patcher, Target, check_mask, check_tokens, is_real, make_replacement, unit_interval

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


# ---------------------------------------------------------------- log-probs / entropy


def _check_logits(logits, labels=None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
        raise Fallback("logits that are not a float tensor")
    if logits.dim() < 2 or logits.numel() == 0:
        raise Fallback("logits with fewer than 2 dims, or empty")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise Fallback("labels that are not an int32/int64 tensor")
        if tuple(labels.shape) != tuple(logits.shape[:-1]) or labels.device != logits.device:
            raise Fallback("labels whose shape is not logits.shape[:-1]")


def _make_logprobs_from_logits(original, mod):
    def body(a, original):
        import rlhf_fast

        logits, labels = a["logits"], a["labels"]
        _check_logits(logits, labels)
        # inplace_backward only lets flash-attn reuse the logits' buffer for its gradient: nothing to do here
        lp = rlhf_fast.logprobs_from_logits(logits, labels, ignore_index=-(2**63))
        flash = bool(getattr(mod, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False))
        return lp.to(torch.float32 if flash else logits.dtype)

    return make_replacement(original, body, "verl logprobs_from_logits", {"logits", "labels", "inplace_backward"})


def _make_entropy_from_logits(original, mod):
    def body(a, original):
        import rlhf_fast

        logits = a["logits"]
        _check_logits(logits)
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        _, ent = rlhf_fast.logprobs_from_logits(logits, zeros, return_entropy=True)
        return ent.to(logits.dtype)

    return make_replacement(original, body, "verl entropy_from_logits", {"logits"})


# ---------------------------------------------------------------- GAE


def masked_whiten(values, mask, shift_mean=True):
    """verl's masked_whiten, used only when the installed verl has none:
    (x - mean) * rsqrt(unbiased var + 1e-8) over the masked elements."""
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    var = ((values - mean) ** 2 * mask).sum() / (n + 1e-8)
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    out = (values - mean) * torch.rsqrt(var * (n / (n - 1)) + 1e-8)
    return out + mean if not shift_mean else out


def carry_into_masked(adv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """verl's loop leaves, at a masked position t, the advantage of the first
    valid position after t (0 if none): one reverse cummin over indices and a
    gather, O(B*T), instead of the T-step loop."""
    B, T = adv.shape
    pos = torch.arange(T, device=adv.device).expand(B, T)
    nxt = torch.where(valid, pos, torch.full_like(pos, T)).flip(-1).cummin(-1).values.flip(-1)
    return F.pad(adv, (0, 1)).gather(1, nxt)


def _make_gae(original, mod):
    whiten = getattr(getattr(mod, "verl_F", None), "masked_whiten", None) or masked_whiten

    def body(a, original):
        import rlhf_fast

        r, v, m = a["token_level_rewards"], a["values"], a["response_mask"]
        check_tokens("rewards and values", r, v)
        valid = check_mask(m, r, allow_bool=False)
        gamma, lam = unit_interval("gamma", a["gamma"]), unit_interval("lam", a["lam"])
        dtype = torch.promote_types(r.dtype, v.dtype)
        if m.is_floating_point():
            dtype = torch.promote_types(dtype, m.dtype)
        with torch.no_grad():
            adv, _ = rlhf_fast.gae(r, v, valid, gamma=gamma, lam=lam)
            adv = carry_into_masked(adv, valid).to(dtype)
            returns = adv + v
            adv = whiten(adv, m)
        return adv, returns

    return make_replacement(
        original,
        body,
        "verl compute_gae_advantage_return",
        {"token_level_rewards", "values", "response_mask", "gamma", "lam"},
    )


# ---------------------------------------------------------------- policy loss


def _clip(name, x) -> float:
    if not is_real(x) or not (0.0 < float(x) < float("inf")):
        raise Fallback(f"{name} that is not a positive number")
    return float(x)


def _num(x):
    """A count from global_batch_info (int, float or 0-dim tensor) as a float or tensor."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


def policy_loss(
    old,
    lp,
    adv,
    mask,
    clip_low,
    clip_high,
    clip_c,
    mode,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
):
    """verl 0.9's compute_policy_loss_vanilla through rlhf_fast.ppo_policy_loss.

    verl aggregates with agg_loss(..., **config.global_batch_info), i.e. over the
    *global* batch: token-mean = sum / batch_num_tokens * dp_size;
    seq-mean-* = sum over non-empty rows / global_batch_size * dp_size, and
    seq-mean-token-sum-norm further / loss_scale_factor (default T). With the
    counts left None, they are the micro-batch's own (tokens, non-empty rows).
    Our op gives the local mean (over tokens or non-empty rows), so the loss is
    rescaled by local count / global count * dp_size: a tensor product, no sync.
    Returns (pg_loss, metrics) like verl; the metrics cost the same three
    .item() syncs as verl's own.
    """
    import rlhf_fast

    check_tokens("log-probs and advantages", old, lp, adv)
    valid = check_mask(mask, lp)
    if mode not in AGG_MODES:
        raise Fallback(f"loss_agg_mode={mode!r}")
    if not is_real(clip_c) or not float(clip_c) > 1.0:
        raise Fallback("clip_ratio_c <= 1 (the original asserts)")
    if dp_size is None or not is_real(dp_size):
        raise Fallback("dp_size that is not a number")
    if dp_size > 1 and (batch_num_tokens if mode in ("token-mean", "token-sum") else global_batch_size) is None:
        raise Fallback("dp_size > 1 without the global count (the original raises)")
    op_mode = {"token-sum": "token-mean", "seq-mean-token-sum-norm": "seq-mean-token-sum"}.get(mode, mode)
    loss, st = rlhf_fast.ppo_policy_loss(
        lp, old, adv, valid, clip_low=clip_low, clip_high=clip_high, dual_clip=float(clip_c), agg=op_mode
    )
    if op_mode == "token-mean":
        local = valid.sum()
        if mode == "token-sum":
            scale = local * dp_size
        else:
            scale = local / (_num(batch_num_tokens) if batch_num_tokens is not None else local) * dp_size
    else:
        local = (valid.sum(-1) > 0).sum()
        glob = _num(global_batch_size) if global_batch_size is not None else local
        scale = local / glob * dp_size
        if mode == "seq-mean-token-sum-norm":
            scale = scale / (loss_scale_factor if loss_scale_factor is not None else lp.shape[-1])
    if isinstance(scale, torch.Tensor):
        scale = torch.nan_to_num(scale.to(loss.dtype), nan=0.0)  # 0 local tokens over 0 global: verl gives 0 too
    dtype = torch.promote_types(torch.promote_types(lp.dtype, old.dtype), adv.dtype)
    metrics = {
        "actor/pg_clipfrac": st["clipfrac"].item(),
        "actor/ppo_kl": st["approx_kl"].item(),
        "actor/pg_clipfrac_lower": st["clipfrac_lower"].item(),
    }
    return (loss * scale).to(dtype), metrics


_GBI_KEYS = {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"}


def _make_compute_policy_loss_vanilla(original, mod):
    algo_config = getattr(mod, "AlgoConfig", None)

    def body(a, original):
        config = a["config"]
        if config is None or (algo_config is not None and isinstance(config, algo_config)):
            raise Fallback("config=None or an AlgoConfig (the original asserts)")
        if a.get("rollout_is_weights") is not None:
            raise Fallback("rollout_is_weights (per-token importance weights; not in the fused op)")
        gbi = dict(getattr(config, "global_batch_info", None) or {})
        if set(gbi) - _GBI_KEYS:
            raise Fallback(f"global_batch_info keys {sorted(set(gbi) - _GBI_KEYS)} (not covered)")
        clip = config.clip_ratio
        low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
        high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
        getter = getattr(config, "get", None)
        clip_c = getter("clip_ratio_c", 3.0) if callable(getter) else getattr(config, "clip_ratio_c", 3.0)
        return policy_loss(
            a["old_log_prob"],
            a["log_prob"],
            a["advantages"],
            a["response_mask"],
            _clip("clip_ratio_low", low),
            _clip("clip_ratio_high", high),
            clip_c,
            a["loss_agg_mode"],
            **gbi,
        )

    known = {"old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config", "rollout_is_weights"}
    return make_replacement(original, body, "verl compute_policy_loss_vanilla", known)


# kl_penalty is not replaced: verl's is three elementwise torch ops and the
# replacement measured slower (1.75 -> 4.38 ms); the KL term stays verl's.


_TF = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"
TARGETS = [
    Target(_TF, "logprobs_from_logits", _make_logprobs_from_logits),
    Target(_TF, "entropy_from_logits", _make_entropy_from_logits),
    Target(_CORE, "compute_gae_advantage_return", _make_gae),
    Target(_CORE, "compute_policy_loss_vanilla", _make_compute_policy_loss_vanilla),
    Target(_CORE, "ADV_ESTIMATOR_REGISTRY:gae", _make_gae, kind="registry"),
    Target(_CORE, "POLICY_LOSS_REGISTRY:vanilla", _make_compute_policy_loss_vanilla, kind="registry"),
]

# Tested against verl 0.9.1; the (pg_loss, metrics) return and global_batch_info
# scaling date from 0.6. Outside this range patch() raises UnsupportedVersion.
SUPPORTED = ("0.6.0", "0.10.0")
_patcher = Patcher("verl", TARGETS, SUPPORTED)
# Extra replacements (e.g. verl_vocab_parallel's) go in with register(Target(...)) before patch().
register, patch, unpatch, patched, replaced = _patcher.module_api()

__all__ = ["patch", "unpatch", "patched", "replaced", "register", "TARGETS", "SUPPORTED"]
