"""Per-step metrics: JSONL in out_dir, a console line, TensorBoard; and the
trim of metrics.jsonl back to the last checkpoint on resume."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from .atomic_io import atomic_write_text, check_writable, write_error


class MetricsLogger:
    """One JSON object per step in out_dir/metrics.jsonl, a console line, and
    optionally TensorBoard scalars in out_dir/tensorboard (phase/metric tags)."""

    def __init__(
        self,
        out_dir: str | None,
        name: str,
        progress: bool = True,
        total: int | None = None,
        keys=("reward", "kl", "loss"),
        tensorboard: bool = False,
    ):
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        if self.path:
            check_writable(out_dir)  # now, not at the end of the first step
        self.tb = None
        if tensorboard:
            if not out_dir:
                raise ValueError("tensorboard: true needs out_dir (the event files go to out_dir/tensorboard)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from exc
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        self.name, self.progress, self.total, self.t0 = name, progress, total, time.perf_counter()
        self.history: list[dict] = []
        self.keys = keys  # shown on the console line

    def log(self, step: int, metrics: dict, keys=None) -> None:
        keys = self.keys if keys is None else keys
        row = {"phase": self.name, "step": step}
        row.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()})
        self.history.append(row)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise write_error(self.path, e) from e
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and k != "step":
                    self.tb.add_scalar(f"{self.name}/{k}", v, step)
            self.tb.flush()
        if self.progress:
            shown = "  ".join(f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), float))
            tot = f"/{self.total}" if self.total else ""
            skip = "  SKIPPED (non-finite)" if row.get("skipped") else ""
            print(f"[{self.name} {step}{tot} {time.perf_counter() - self.t0:6.1f}s] {shown}{skip}", file=sys.stderr)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the rows of metrics.jsonl up to last_step (the checkpoint's): a
    resumed run logs the later steps again. A torn last line (killed
    mid-append) is dropped. Rewritten atomically; returns the rows dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = line.endswith("\n") and int(row["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
