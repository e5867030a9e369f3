"""Oracle for openrlhf.models.utils (test-only re-implementation)."""
import torch


def compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    d = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        return d
    if kl_estimator == "k2":
        return d * d / 2.0
    if kl_estimator == "k3":
        return (-d).exp() - 1 + d  # no clamps in OpenRLHF
    raise ValueError(kl_estimator)


def log_probs_from_logits(logits, labels, temperature=1.0):
    if temperature != 1.0:
        logits.div_(temperature)  # OpenRLHF divides in place
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = [torch.log_softmax(r, -1).gather(-1, l.unsqueeze(-1)).squeeze(-1) for r, l in zip(logits, labels)]
    return torch.stack(rows)


def masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
