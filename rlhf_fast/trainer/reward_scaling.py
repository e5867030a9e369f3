"""Scores into rewards: the missing-EOS penalty, running normalisation and
clipping, with non-finite scores zero-weighted."""

from __future__ import annotations

import math

import torch


class RunningMoments:
    """Running mean / std of scores (Chan's parallel merge), for reward normalisation.
    Non-finite values are left out: one NaN would make the moments NaN forever."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        x = x[torch.isfinite(x)]
        n = x.numel()
        if n == 0:
            return
        m, v = x.mean().item(), x.var(unbiased=False).item()
        tot = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta * delta * self.count * n / tot) / tot
        self.mean += delta * n / tot
        self.count = tot

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def process_scores(scores: torch.Tensor, config, moments: RunningMoments, truncated=None):
    """Missing-EOS penalty (truncated: (N,) bool), reward normalisation
    (running stats, updated first), then clipping.

    Returns (scores, valid): valid (N,) bool is False where the raw score was
    NaN or +-inf. Those samples never reach the moments, their processed score
    is 0, and the trainers zero-weight them (mask them out of the loss); clamping
    alone would turn +inf into a maximal reward and keep NaN as NaN."""
    valid = torch.isfinite(scores)
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    if config.missing_eos_penalty is not None and truncated is not None:
        scores = scores - config.missing_eos_penalty * truncated.float()
    if config.reward_norm:
        moments.update(scores[valid])
        scores = moments.normalize(scores)
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    return torch.where(valid, scores, torch.zeros_like(scores)), valid
