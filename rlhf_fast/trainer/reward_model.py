"""RewardTrainer: Bradley-Terry pairwise loss on (prompt + chosen, prompt + rejected).

loss = -log sigmoid(r_chosen - r_rejected - margin)  (margin: Llama-2's
preference-strength offset, optional), plus TRL's optional
center_rewards_coef * (r_c + r_r)^2 to keep rewards near zero.
Accuracy and mean reward margin are reported on a held-out split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attrs, Trainer
from .config import RewardConfig
from .data import cat_right_padded
from .models import ScalarHeadModel
from .optimizer import make_optimizer


class RewardTrainer(Trainer):
    """model: ScalarHeadModel. chosen_ids / rejected_ids: (M, T) right-padded
    full sequences (prompt + response), with their attention masks; margin:
    (M,) or None. config.eval_fraction of the pairs are held out."""

    name = "rm"

    def __init__(
        self,
        config: RewardConfig,
        model: ScalarHeadModel,
        chosen_ids,
        chosen_mask,
        rejected_ids,
        rejected_mask,
        margin=None,
        *,
        device=None,
    ):
        super().__init__(config, device or chosen_ids.device)
        M = chosen_ids.shape[0]
        if rejected_ids.shape[0] != M:
            raise ValueError(f"RewardTrainer: {M} chosen but {rejected_ids.shape[0]} rejected sequences")
        if config.margin and margin is None:
            raise ValueError("RewardTrainer: config.margin is set but no margin tensor was given")
        self.model = model
        self.model_ddp = self.wrap(model)  # before the optimizer: FSDP2 swaps the parameters
        self.data = (
            chosen_ids,
            chosen_mask,
            rejected_ids,
            rejected_mask,
            margin if margin is not None else torch.zeros(M, device=chosen_ids.device),
        )
        perm = torch.randperm(M, generator=self.cpu_gen).to(chosen_ids.device)
        n_eval = int(round(M * config.eval_fraction))
        self.eval_idx, self.train_idx = perm[:n_eval], perm[n_eval:]
        self.opt, self.sched = make_optimizer(model.parameters(), config)
        self.stateful = {
            "model": self.model_state(model),
            "opt": self.optimizer_state(model, self.opt),
            "sched": self.sched,
            # the held-out split decides every later batch: a rerun with another seed keeps the run's own
            "split": Attrs(self, eval_idx="eval_idx", train_idx="train_idx"),
        }

    def _rewards(self, idx, model=None):
        cid, cm, rid, rm, margin = (t[idx] for t in self.data)
        # one forward over chosen and rejected together: half the launches
        r = (model or self.model)(cat_right_padded(cid, rid), cat_right_padded(cm, rm), last_only=True)
        return r[: idx.numel()], r[idx.numel() :], margin

    def loss(self, idx):
        """(loss, stats): the Bradley-Terry loss of pairs idx and the share of
        them ranked right (0-d tensors)."""
        rc, rr, margin = self._rewards(idx, self.model_ddp)
        diff = rc - rr - (margin if self.config.margin else 0.0)
        loss = -F.logsigmoid(diff).mean()
        if self.config.center_rewards_coef:
            loss = loss + self.config.center_rewards_coef * ((rc + rr) ** 2).mean()
        return loss, {"accuracy": (rc > rr).float().mean()}

    def step(self) -> dict:
        c = self.config
        self.model.train()
        n = self.train_idx.numel()
        pick = self.train_idx[torch.randperm(n, generator=self.cpu_gen)[: c.batch_size].to(self.train_idx.device)]
        return self.optimizer_step(*self.accumulate(self.shard(pick), self.loss))

    @torch.no_grad()
    def evaluate(self, idx=None, batch_size: int = 256) -> dict:
        """Held-out accuracy (r_chosen > r_rejected), mean margin and loss."""
        idx = self.eval_idx if idx is None else idx
        if idx.numel() == 0:
            return {"eval_accuracy": float("nan"), "eval_margin": float("nan"), "eval_loss": float("nan")}
        self.model.eval()
        rcs, rrs = [], []
        for chunk in idx.split(batch_size):
            rc, rr, _ = self._rewards(chunk)
            rcs.append(rc)
            rrs.append(rr)
        rc, rr = torch.cat(rcs), torch.cat(rrs)
        return {
            "eval_accuracy": float((rc > rr).float().mean()),
            "eval_margin": float((rc - rr).mean()),
            "eval_loss": float(-F.logsigmoid(rc - rr).mean()),
        }
