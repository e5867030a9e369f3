"""Oracle for verl.utils.torch_functional (test-only re-implementation)."""
import torch

FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE = False  # verl's flag name; the oracle models the no-flash-attn path


def logprobs_from_logits(logits, labels, inplace_backward=True):
    # no flash-attn: fp32/fp64 -> label logit minus a per-row logsumexp; else log_softmax per row (logits' dtype)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = [torch.log_softmax(row, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) for row, lab in zip(logits, labels)]
    return torch.stack(rows)


def entropy_from_logits(logits):
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def masked_whiten(values, mask, shift_mean=True):
    n = mask.sum()
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * (n / (n - 1))
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out
