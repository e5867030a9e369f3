"""rlhf_fast.linear_logprobs vs the materialised path and the peers.

Baselines, all run in the same process on the same inputs:
  materialised   F.linear + rlhf_fast.logprobs_from_logits (the (N, V) logits exist)
  torch_lce      torch's F.linear_cross_entropy(reduction='none') (= -logprob; torch >= 2.13)
  logits_matmul  the bare F.linear, forward only (the GPU target: fwd <= 1.25x of it)
  liger_flce     Liger-Kernel's fused linear cross-entropy (GPU, if installed)
Peak memory is everything allocated during one call above the inputs
(benchmarks/harness.py): outputs, gradients and scratch.

Targets: CPU (2048, 1024, 32000) fp32: peak <= 10% of the
materialised logits (250 MiB), time <= 1.3x materialised. GPU bf16
(8192, 4096, 131072): fwd <= 1.25x the logits matmul, fwd+bwd memory <= 5%
of materialised.

    python -m benchmarks.bench_linear_logprobs [--full] [--json PATH]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rlhf_fast
from benchmarks.harness import Record, bench_main, compare

OP = "linear_logprobs"


def _shapes(quick: bool, device: str, tiny: bool = False):
    if tiny:
        return [(64, 32, 1000, torch.float32)]
    if device == "cuda":
        if quick:
            return [(4096, 2048, 32000, torch.bfloat16)]
        return [(8192, 4096, 131072, torch.bfloat16), (1937, 3584, 152064, torch.bfloat16)]
    if quick:
        return [(1024, 256, 32000, torch.float32)]  # 6 chunks of 192 rows
    return [(2048, 1024, 32000, torch.float32)]


def _liger(device: str):
    if device != "cuda":
        return None, "Liger-Kernel is GPU-only (Triton on CUDA)"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # not installed, or an incompatible version
        return None, f"not installed ({type(exc).__name__}); pip install liger-kernel"
    return LigerFusedLinearCrossEntropyLoss(reduction="none"), None


def _inputs(N, H, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, labels


# F.linear_cross_entropy exists from torch 2.13; the lent GPU machine runs 2.11
HAVE_TORCH_LCE = hasattr(F, "linear_cross_entropy")
TORCH_LCE_SKIP = f"torch.nn.functional.linear_cross_entropy needs torch >= 2.13 (this is {torch.__version__})"


def _fwd_bwd(loss_of):
    """A call that runs forward + backward with per-token upstream grads and
    returns (dH, dW) without accumulating into .grad between repeats."""

    def call(h, w):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_()
        per_token = loss_of(h, w)
        return torch.autograd.grad(per_token, (h, w), grad_outputs=torch.ones_like(per_token))

    return call


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeat, warmup = (5, 1) if device == "cpu" else (15, 3)
    records: list[Record] = []
    liger, liger_skip = _liger(device)
    for N, H, V, dtype in _shapes(quick, device, tiny):
        h, w, y = _inputs(N, H, V, dtype, device)
        shape = f"({N}, {H}, {V})"
        dt = str(dtype).replace("torch.", "")

        ours = lambda h, w: rlhf_fast.linear_logprobs(h, w, y)  # noqa: E731
        mat = lambda h, w: rlhf_fast.logprobs_from_logits(F.linear(h, w), y)  # noqa: E731
        lce = lambda h, w: -F.linear_cross_entropy(h, w, y, reduction="none")  # noqa: E731
        fwd_base = {
            "materialised": lambda: mat(h, w),
            "torch_lce": (lambda: lce(h, w)) if HAVE_TORCH_LCE else TORCH_LCE_SKIP,
            "logits_matmul": lambda: F.linear(h, w),
            "liger_flce": (lambda: liger(w, h, y)) if liger is not None else liger_skip,
        }
        common = dict(op=OP, impl="rlhf_fast", shape=shape, dtype=dt, device=device, warmup=warmup, repeat=repeat)
        records += compare(fn=lambda: ours(h, w), baselines=fwd_base, mode="fwd", **common)
        bwd = {name: _fwd_bwd(f) for name, f in (("ours", ours), ("materialised", mat), ("torch_lce", lce))}
        bwd_base = {
            "materialised": lambda: bwd["materialised"](h, w),
            "torch_lce": (lambda: bwd["torch_lce"](h, w)) if HAVE_TORCH_LCE else TORCH_LCE_SKIP,
            "liger_flce": (lambda: _fwd_bwd(lambda a, b: liger(b, a, y))(h, w)) if liger is not None else liger_skip,
        }
        records += compare(fn=lambda: bwd["ours"](h, w), baselines=bwd_base, mode="fwd+bwd", **common)
    return records


def targets(records: list[Record]) -> str:
    """The acceptance ratios (the targets above), read off the records."""
    lines = []
    for r in records:
        if r.status != "ok" or r.baseline not in ("materialised", "logits_matmul"):
            continue
        N, _, V = (int(x) for x in r.shape.strip("()").split(","))
        logits_mb = N * V * (2 if r.dtype in ("bfloat16", "float16") else 4) / 2**20
        lines.append(
            f"{r.mode:7s} {r.shape:22s} vs {r.baseline:13s}: time {r.median_s / r.baseline_median_s:.2f}x, "
            f"peak {r.peak_mem_bytes / 2**20:.1f} MiB = {100 * r.peak_mem_bytes / 2**20 / logits_mb:.1f}% of the "
            f"materialised logits ({logits_mb:.0f} MiB); baseline peak {r.baseline_peak_mem_bytes / 2**20:.1f} MiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    bench_main(run, quick_by_default=True, summary=targets)
