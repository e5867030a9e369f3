"""Reference fused-linear PPO loss: reference.linear_logprobs (materialised
(N, V) logits) then reference.ppo_loss, plain autograd. The tests' float64
oracle for rlhf_fast.linear_ppo_loss and the benchmarks' eager baseline.
Packed inputs are unpacked to (S, longest segment) first.
"""

from __future__ import annotations

import torch

from ._linear_logprobs import linear_logprobs
from ._packing import unpack
from ._ppo_loss import ppo_loss


def linear_ppo_loss(
    hidden,
    weight,
    labels,
    old_logprobs,
    advantages,
    mask,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    entropy_coef=0.0,
    ref_logprobs=None,
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
    chunk_size=None,
    top_k=None,
    top_p=None,
    min_p=None,
):
    """(loss, stats, logprobs, entropy), see rlhf_fast.linear_ppo_loss.
    logprobs / entropy are detached and 0 where mask == 0 or the label is
    ignore_index; chunk_size is accepted for signature parity and ignored."""
    lp, ent = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
        top_k=top_k, top_p=top_p, min_p=min_p,
    )  # fmt: skip
    valid = (mask != 0) & (labels != ignore_index)
    toks = {"lp": lp, "old": old_logprobs, "adv": advantages, "mask": mask, "ent": ent, "ref": ref_logprobs}
    toks["roll"] = rollout_logprobs
    if cu_seqlens is not None:
        n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.shape[0] > 1 else 0
        toks = {k: unpack(v, cu_seqlens, n) if v is not None else None for k, v in toks.items()}
        agg_norm = float(max(n, 1)) if agg_norm is None else agg_norm
    loss, stats = ppo_loss(
        toks["lp"],
        toks["old"],
        toks["adv"],
        toks["mask"],
        entropy=toks["ent"],
        ref_logprobs=toks["ref"],
        entropy_coef=entropy_coef,
        kl_coef=kl_coef,
        kl_kind=kl_kind,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        agg_norm=agg_norm,
        rollout_logprobs=toks["roll"],
        rollout_correction=rollout_correction,
    )
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return loss, stats, torch.where(valid, lp.detach(), zero), torch.where(valid, ent.detach(), zero)
