"""Reference log-probs and entropy: materialises log_softmax, (N, V) floats."""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype


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
    logp_all = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
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
