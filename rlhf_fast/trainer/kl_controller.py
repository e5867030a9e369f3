"""The KL coefficient: fixed, or adaptive towards a target KL."""

from __future__ import annotations

import math


class KLController:
    """Fixed beta, or the adaptive controller of Ziegler et al. (2019) when a
    target is set: beta *= 1 + clip(kl/target - 1, -0.2, 0.2) * n_steps/horizon."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init), target, int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
