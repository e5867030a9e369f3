"""Log-probs (+ entropy) from logits: rlhf_fast vs torch eager, TRL's
selective_log_softmax and torch.compile of eager, forward and forward+backward.

    python -m benchmarks.bench_logprobs [--quick] [--shape N,V] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

import rlhf_fast

from .harness import compare, copy_bandwidth, format_table, machine_facts, write_json


def eager_logprobs(logits, labels):
    """The plain chain every peer starts from: log_softmax, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _trl():
    try:
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax
    except Exception as exc:  # not installed, or its import failed
        return f"TRL unavailable ({type(exc).__name__}); pip install trl"


def _gpu_peer(device: str, name: str, install: str, load):
    """load() -> the peer's per-token log-prob function on CUDA; otherwise
    (or when its import fails) the reason it is skipped."""
    if device != "cuda":
        return f"{name} is GPU-only (Triton on CUDA)"
    try:
        return load()
    except Exception as exc:  # not installed, or its import failed (a CUDA / torch mismatch)
        return f"{name} not installed ({type(exc).__name__}); {install}"


def _flash_attn_ce(device: str):
    """flash-attn's Triton cross-entropy (what verl/OpenRLHF call): logp = -loss."""

    def load():
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        return lambda logits, labels: -cross_entropy_loss(logits, labels)[0]

    return _gpu_peer(device, "flash-attn cross-entropy", "pip install flash-attn --no-build-isolation", load)


def _liger_ce(device: str):
    """Liger-Kernel's fused cross-entropy, per token: logp = -loss."""

    def load():
        from liger_kernel.transformers import LigerCrossEntropyLoss

        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, labels: -loss(logits, labels)

    return _gpu_peer(device, "Liger-Kernel", "pip install liger-kernel", load)


# vLLM / verl's usual rollout setting: the distribution the processed log-probs are taken under
TRUNCATION = dict(temperature=0.7, top_k=50, top_p=0.9)


def eager_truncated_logprobs(logits, labels, temperature=0.7, top_k=50, top_p=0.9):
    """What a user writes to score tokens under the sampler's truncation without
    our op: HF's TopK then TopP warpers (sort), log_softmax, gather."""
    z = logits.float() / temperature
    kth = z.topk(top_k, dim=-1).values[:, -1:]
    z = z.masked_fill(z < kth, float("-inf"))
    s, idx = z.sort(dim=-1)
    drop = s.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    z = z.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _processed_records(logits, labels, common) -> list:
    """Scoring given tokens under top-k 50 / top-p 0.9 at T = 0.7, against
    our untruncated op (the cost of the truncation) and the sort-based eager
    chain, in the same run."""
    ours = lambda x=logits, y=labels: rlhf_fast.logprobs_from_logits(x, y, **TRUNCATION)  # noqa: E731
    peers = {
        "rlhf_fast untruncated (T only)": lambda x=logits, y=labels: rlhf_fast.logprobs_from_logits(
            x, y, temperature=0.7
        ),
        "eager top-k/top-p warpers (sort)": lambda x=logits, y=labels: eager_truncated_logprobs(x, y),
    }
    c = dict(common, op="logprobs top-k 50 top-p 0.9")
    return compare(fn=ours, baselines=peers, mode="fwd", bytes_moved=logits.numel() * logits.element_size(), **c)


def _fwd_bwd(fn, logits, labels):
    def run():
        x = logits.detach().requires_grad_()
        fn(x, labels).float().sum().backward()
        return x.grad

    return run


def run(quick: bool = True, device: str | None = None, tiny: bool = False, shapes=None, dtypes=None) -> list:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        shapes, dtypes = [(64, 1000)], [torch.float32]
    elif shapes is not None:
        dtypes = dtypes or [torch.float32]
    elif device == "cpu":
        shapes = [(1024, 32000)] if quick else [(4096, 32000), (1024, 128256), (512, 151936)]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    else:
        shapes = [(16384, 151936), (8192, 128256), (16384, 32000)]
        dtypes = [torch.bfloat16, torch.float32]
    trl = _trl()
    compiled = torch.compile(eager_logprobs)
    gpu_peers = {"flash-attn cross_entropy": _flash_attn_ce(device), "liger CrossEntropy": _liger_ce(device)}
    records = []
    for N, V in shapes:
        for dtype in dtypes:
            logits = torch.randn(N, V, device=device, dtype=dtype) * 3
            labels = torch.randint(0, V, (N,), device=device)
            ours = lambda x=logits, y=labels: rlhf_fast.logprobs_from_logits(x, y)  # noqa: E731
            peers = {
                # inputs bound as defaults: `del logits` below must not break a closure kept for later
                # (benchmarks/test_bench.py calls these after run() returns)
                "torch eager": lambda x=logits, y=labels: eager_logprobs(x, y),
                "torch.compile(eager)": lambda x=logits, y=labels: compiled(x, y),
                "trl.selective_log_softmax": trl if isinstance(trl, str) else (lambda x=logits, y=labels: trl(x, y)),
            }
            for name, f in gpu_peers.items():
                peers[name] = f if isinstance(f, str) else (lambda f=f, x=logits, y=labels: f(x, y))
            common = dict(
                op="logprobs",
                impl=f"rlhf_fast[{_which(device)}]",
                shape=f"({N}, {V})",
                dtype=str(dtype).replace("torch.", ""),
                device=device,
            )
            records += compare(
                fn=ours, baselines=peers, mode="fwd", bytes_moved=logits.numel() * logits.element_size(), **common
            )
            grads = {
                k: (v if isinstance(v, str) else _fwd_bwd(_peer_fn(k, trl, compiled, gpu_peers), logits, labels))
                for k, v in peers.items()
            }
            records += compare(
                fn=_fwd_bwd(rlhf_fast.logprobs_from_logits, logits, labels),
                baselines=grads,
                mode="fwd+bwd",
                bytes_moved=3 * logits.numel() * logits.element_size(),
                **common,
            )
            records += _processed_records(logits, labels, common)
            del logits
    return records


def _peer_fn(name, trl, compiled, gpu_peers):
    return {
        "torch eager": eager_logprobs,
        "torch.compile(eager)": compiled,
        "trl.selective_log_softmax": trl,
        **gpu_peers,
    }[name]


def _which(device: str) -> str:
    from rlhf_fast import _backend

    return _backend.choose("logprobs_from_logits", torch.device(device), rlhf_fast.ops._logprobs.IMPLEMENTED)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--shape", action="append", default=None, help="N,V (repeatable); overrides the defaults")
    p.add_argument("--dtype", action="append", default=None, choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else None
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    records = run(quick=args.quick, device=device, shapes=shapes, dtypes=dtypes)
    print(format_table(records))
    print(f"copy bandwidth: {copy_bandwidth(device):.1f} GB/s")
    if args.json:
        write_json(args.json, records, machine_facts(device))


if __name__ == "__main__":
    main()
