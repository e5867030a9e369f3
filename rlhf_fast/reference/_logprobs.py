"""Reference log-probs and entropy: materialises log_softmax, (N, V) floats."""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ._sampling import _thresholds


def shifted_logits(x: torch.Tensor, temperature) -> torch.Tensor:
    """(x - max x) / T, the kernels' coordinates: subtracting the max before
    scaling keeps every value exact to the row's spread (x / T rounds at the
    offset's scale: 0.5 absolute at x ~ 1e7 in fp32, before the max is
    subtracted). The max is detached (softmax is shift-invariant, so no
    gradient is lost). A row whose max / T overflows (lse = +-inf) is NaN,
    as in the kernels; so are rows with NaN, +inf, or only -inf."""
    m = x.detach().amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(x.shape[:-1] + (1,))
    inv_t = 1.0 / temperature
    ok = torch.isfinite(m * inv_t)
    return torch.where(ok, (x - torch.where(ok, m, 0.0)) * inv_t, float("nan"))


def per_token(value, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar, a (B,) per-row tensor (B = labels.shape[0]) or a tensor of
    the labels' shape -> a tensor of the labels' shape."""
    if not isinstance(value, torch.Tensor):
        return torch.full(labels.shape, value, dtype=dtype, device=labels.device)
    if value.dim() == 1 and labels.dim() > 1 and value.shape[0] == labels.shape[0]:
        value = value.reshape((-1,) + (1,) * (labels.dim() - 1))
    return value.to(dtype).broadcast_to(labels.shape)


def _processed(logits, labels, temperature, top_k, top_p, min_p, ignore_index, return_entropy):
    """The sampler's truncated distribution (reference/_sampling.py: the
    kept set {z >= thr}, renormalised), scored at the given labels; the kept
    set is a constant of the graph (no gradient through the thresholds)."""
    acc = acc_dtype(logits.dtype)
    V = logits.shape[-1]
    x = logits.to(acc).reshape(-1, V)
    y = labels.reshape(-1)
    t = per_token(temperature, labels, torch.float64).reshape(-1)
    inv_t = (1.0 / t).to(acc).unsqueeze(1)  # fp32(1 / T) from float64, as the sampler
    m = x.detach().amax(-1, keepdim=True)
    z = (x - m) * inv_t
    bad = ~torch.isfinite(m.squeeze(1) * inv_t.squeeze(1))  # NaN, +inf, only -inf, overflow: NaN, that row alone
    thr = _thresholds(
        torch.where(bad.unsqueeze(1), 0.0, z.detach()),  # a finite stand-in: the row's outputs are NaN below
        per_token(top_k, labels, torch.int64).reshape(-1),
        per_token(top_p, labels, torch.float64).reshape(-1),
        per_token(min_p, labels, torch.float64).reshape(-1),
    )
    kept = z.detach() >= thr.unsqueeze(1)
    neg_inf = torch.full_like(z, float("-inf"))
    log_m = torch.logsumexp(torch.where(kept, z, neg_inf), dim=-1, keepdim=True)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y)).long().unsqueeze(1)
    z_y = z.gather(1, safe).squeeze(1)
    kept_y = kept.gather(1, safe).squeeze(1)
    lp = torch.where(kept_y, z_y - log_m.squeeze(1), torch.full_like(z_y, float("-inf")))
    lp = torch.where(bad, torch.full_like(lp, float("nan")), lp)
    lp = torch.where(valid, lp, torch.zeros_like(lp)).reshape(labels.shape)
    if not return_entropy:
        return lp
    logp = torch.where(kept, z - log_m, neg_inf)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    ent = torch.where(bad, torch.full_like(ent, float("nan")), ent)
    ent = torch.where(valid, ent, torch.zeros_like(ent)).reshape(labels.shape)
    return lp, ent


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature=1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
):
    """log p(label) under softmax(logits / temperature), in float32 (float64
    for float64 logits); entropy of the same distribution if asked. Positions
    whose label is ignore_index give 0 and receive no gradient. With top_k /
    top_p / min_p (or a tensor temperature: scalar, (B,) or the labels'
    shape), the distribution is the sampler's truncated one
    (reference/_sampling.py), -inf for labels outside its kept set."""
    per_token_args = any(isinstance(v, torch.Tensor) for v in (temperature, top_k, top_p, min_p))
    if per_token_args or top_k or top_p < 1 or min_p > 0:
        return _processed(logits, labels, temperature, top_k, top_p, min_p, ignore_index, return_entropy)
    acc = acc_dtype(logits.dtype)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(shifted_logits(logits.to(acc), temperature), dim=-1)
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p * log p -> 0 where p == 0 (-inf logits), without a 0 * -inf NaN
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -plogp.sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
