"""What every trainer shares: KL control, reward normalisation, optimizer and
LR schedule, the NaN/inf guard, JSONL metrics and checkpoint/resume."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import sys
import time
import warnings
import zlib

import torch

# ---------------------------------------------------------------- KL control


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


# ---------------------------------------------------------------- optimisation


def make_optimizer(params, config, lr: float | None = None):
    params = [p for p in params if p.requires_grad]
    lr = config.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    total, warm, kind = max(config.steps, 1), config.warmup_steps, config.lr_schedule
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be constant, linear or cosine, got {kind!r}")

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        frac = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        if kind == "linear":
            return 1.0 - frac
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def guarded_step(optimizers, schedulers, max_grad_norm, loss: torch.Tensor) -> tuple[float, bool]:
    """Clip, then step every optimizer unless the loss or the gradient norm is
    NaN/inf: then the gradients are dropped and the step is skipped (the
    scheduler still advances, so the LR curve does not shift).
    The norm is over the optimizers' own parameters, not a module's: an
    FSDP2 root left unsharded by a no_grad forward lists its gathered copies,
    which never receive gradients (the sharded ones in the optimizer do).
    Returns (grad_norm, skipped)."""
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if max_grad_norm is not None and max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
    norm = float(norm)
    skipped = not (math.isfinite(norm) and bool(torch.isfinite(loss).all()))
    if not skipped:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    for sch in schedulers:
        sch.step()
    return norm, skipped


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- checkpoint / resume


def rng_state(generators: dict) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in generators.items()}
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def _dist():
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist, dist.get_rank(), dist.get_world_size()) if on else (None, 0, 1)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: unreadable (truncated, not a
    checkpoint) or failing its checksum (corrupted after it was written)."""


class WriteError(OSError):
    """A file of the run could not be written (disk full, read-only or not
    permitted): the message names the file, the cause and what to do; the
    OSError it came from is chained."""

    def __str__(self) -> str:
        return self.strerror


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first OSError with an errno in exc's chain: torch.save reports a
    failed write as RuntimeError("[enforce fail at inline_container.cc]")
    with the OSError (ENOSPC) only as its __context__."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: str, exc: BaseException) -> WriteError | None:
    """A WriteError naming path and the OSError behind exc; None when exc holds none."""
    if isinstance(exc, WriteError):
        return exc
    os_err = _os_error(exc)
    if os_err is None:
        return None
    code = os_err.errno
    where = os.path.dirname(os.path.abspath(path))
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = f"free space on the device of {where} (or its quota), or set out_dir elsewhere"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = f"{where} is not writable: fix its permissions or set out_dir elsewhere"
    else:
        hint = "check the device and the path"
    name = errno.errorcode.get(code, str(code))
    return WriteError(code, f"cannot write {path}: {os.strerror(code)} ({name}); {hint}", path)


def check_writable(out_dir: str) -> None:
    """Create out_dir and a temporary file in it (removed at once), so a
    read-only or unwritable out_dir fails before the first step."""
    import tempfile

    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        code = e.errno if e.errno is not None else errno.EIO
        msg = f"out_dir {out_dir} is not writable: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
        raise WriteError(code, f"{msg}; fix its permissions or set out_dir elsewhere", out_dir) from e


def atomic_save(obj, path: str) -> None:
    """torch.save to path + ".tmp", fsync, rename over path, fsync the
    directory: a crash or kill -9 at any point leaves either the previous
    file or the new one, never a torn one (a stale .tmp at worst, which
    clean_stale_tmp removes)."""
    with _atomic_open(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    with _atomic_open(path) as f:
        f.write(text.encode())


class _atomic_open:
    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.f = open(self.tmp, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            err = write_error(self.path, exc)
            if err is not None:
                raise err from exc
            return False
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._discard()
            raise write_error(self.path, e) from e
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)
        return False

    def _discard(self) -> None:
        """Close and remove the temp file; the old file at path stays whole."""
        try:
            self.f.close()
        except OSError:
            pass  # the buffered rest cannot be written either (the same full disk)
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


ARTEFACTS = ("checkpoint.pt", "model.pt", "metrics.jsonl")  # what a run writes into out_dir


def clean_stale_tmp(out_dir: str) -> list[str]:
    """Remove the temp files a killed write left in out_dir; returns their names."""
    gone = []
    for name in ARTEFACTS:
        tmp = os.path.join(out_dir, name + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
            gone.append(name + ".tmp")
    return gone


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


def _leaves(obj, prefix=""):
    """(dotted path, leaf) of every leaf of nested dicts / lists / tuples."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def checksums(blob: dict) -> dict:
    """CRC-32 of every tensor's bytes (with dtype and shape), by dotted path,
    and one over every other leaf (steps, hyper-parameters, RNG tuples).
    CRC-32, not sha256: it catches torn and bit-rotted files (every burst of
    up to 32 bits, random damage but for 2^-32) at 4x sha256's speed here
    (350 vs 84 MB/s on the shared 2-core EPYC), and a checkpoint is not
    an adversary's file."""
    tensors, other = {}, zlib.crc32(b"")
    for path, leaf in _leaves(blob):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous().reshape(-1)
            crc = zlib.crc32(f"{t.dtype}{tuple(leaf.shape)}".encode())
            tensors[path] = zlib.crc32(memoryview(t.view(torch.uint8).numpy()), crc)
        else:
            other = zlib.crc32(f"{path}={leaf!r};".encode(), other)
    return {"kind": "crc32", "tensors": tensors, "other": other}


def save_checkpoint(path: str, step: int, stateful: dict, generators: dict) -> None:
    """stateful: name -> object with state_dict() (models, optimizers,
    schedulers, KL controller); generators: name -> torch.Generator. Written
    with atomic_save, so a crash mid-write never leaves a torn checkpoint, and
    with checksums(), which load_checkpoint verifies.

    Under torchrun every rank calls this: sharded state dicts are gathered (a
    collective), every rank's RNG states are kept (each rank samples its own
    stream), and rank 0 writes."""
    dist, rank, world = _dist()
    states = {k: v.state_dict() for k, v in stateful.items()}  # collective for FSDP2-sharded models
    rng = rng_state(generators)
    rng_ranks = [rng]
    if world > 1:
        rng_ranks = [None] * world
        dist.all_gather_object(rng_ranks, rng)
    if rank == 0:
        blob = {"step": step, "rng": rng, "rng_ranks": rng_ranks, "world_size": world, **states}
        blob["checksums"] = checksums(blob)
        atomic_save(blob, path)
    if world > 1:
        dist.barrier()  # no rank goes on (and perhaps loads it) before the file is whole


def read_checkpoint(path: str) -> dict:
    """torch.load + checksum verification; CheckpointError naming the file and
    what is wrong with it."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / overwritten: zip, pickle or EOF errors
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated, or not a checkpoint): {type(exc).__name__}: {exc}. "
            "Delete it, or start over (rlhf-fast train --fresh)."
        ) from exc
    if not isinstance(blob, dict) or "step" not in blob:
        raise CheckpointError(f"checkpoint {path} is unreadable: not a trainer checkpoint")
    want = blob.pop("checksums", None)
    if want is None:
        warnings.warn(
            f"checkpoint {path} has no checksums (written before they existed); loading unverified", stacklevel=2
        )
        return blob
    got = checksums(blob)
    w, g = want["tensors"], got["tensors"]
    bad = sorted(k for k in set(w) | set(g) if w.get(k) != g.get(k))
    if got["other"] != want["other"]:
        bad.append("(non-tensor state: step, hyper-parameters, RNG)")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} failed its checksum: {shown} differ from what was written (corrupted on disk or "
            "in transit). Restore a good copy, or start over (rlhf-fast train --fresh)."
        )
    return blob


def load_checkpoint(path: str, stateful: dict, generators: dict) -> int:
    """Every rank reads (and verifies) the file. A rank takes its own RNG
    states when the checkpoint was written by as many ranks; otherwise rank
    0's (the sampled streams then differ from the original run's)."""
    _, rank, world = _dist()
    blob = read_checkpoint(path)
    missing = [k for k, v in stateful.items() if k not in blob and not getattr(v, "optional", False)]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {', '.join(map(repr, missing))} state: it was written by another trainer "
            "(or another kind of run). Start over (rlhf-fast train --fresh) or give the matching checkpoint."
        )
    for k, v in stateful.items():
        if k in blob:
            v.load_state_dict(blob[k])
    ranks = blob.get("rng_ranks", [blob["rng"]])
    set_rng_state(ranks[rank] if len(ranks) == world else blob["rng"], generators)
    return int(blob["step"])
