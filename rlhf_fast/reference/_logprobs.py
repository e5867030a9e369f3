"""Reference log-probs and entropy: materialises log_softmax, (N, V) floats."""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype


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


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) under softmax(logits / temperature), in float32 (float64
    for float64 logits); entropy of the same distribution if asked. Positions
    whose label is ignore_index give 0 and receive no gradient."""
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
