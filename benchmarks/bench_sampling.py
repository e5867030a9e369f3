"""rlhf_fast.sample vs the sort-based sampling path of HF (TopPLogitsWarper:
full sort + cumsum of the vocabulary, then softmax + multinomial), in one run.

CPU: (64, 32000) top-p 0.9 and plain sampling (target: >= 3x vs the
sort path). GPU (when present): (256, 151936) vs the same torch path, and vs
FlashInfer's top_p_sampling_from_probs if it is installed.
`python -m benchmarks.bench_sampling [--full] [--json PATH]`.
"""

from __future__ import annotations

import torch

import rlhf_fast

from .harness import Record, bench_main, compare


def _hf_top_p(logits, temperature, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.float()))
    return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)


def _torch_plain(logits, temperature):
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(1)


def _flashinfer(logits, temperature, top_p):
    if logits.device.type != "cuda":
        return "flashinfer is GPU-only (CUDA)"
    try:
        import flashinfer
    except Exception:
        return "flashinfer not installed (pip install flashinfer-python)"
    return lambda: flashinfer.sampling.top_p_sampling_from_probs(torch.softmax(logits.float() / temperature, -1), top_p)


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list[Record]:
    records: list[Record] = []
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(64, 32000)] if quick else [(64, 32000), (64, 151936)]
    if device == "cuda":
        shapes = [(256, 151936)] if quick else [(64, 32000), (256, 151936)]
    if tiny:
        shapes = [(4, 1000)]
    T, p = 0.9, 0.9
    for B, V in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(B, V, device=device) * 3).to(dtype)
            nbytes = logits.numel() * logits.element_size()
            shape = f"({B}, {V})"
            common = dict(
                op="sample",
                impl="rlhf_fast",
                dtype=str(dtype).replace("torch.", ""),
                device=device,
                mode="fwd",
                bytes_moved=nbytes,
                warmup=2,
                repeat=7 if quick else 15,
            )
            records += compare(
                shape=shape + " top_p",
                fn=lambda: rlhf_fast.sample(logits, temperature=T, top_p=p),
                baselines={
                    "HF TopPLogitsWarper (sort)": lambda: _hf_top_p(logits, T, p),
                    "flashinfer top_p": _flashinfer(logits, T, p),
                },
                **common,
            )
            records += compare(
                shape=shape + " plain",
                fn=lambda: rlhf_fast.sample(logits, temperature=T),
                baselines={"torch softmax+multinomial": lambda: _torch_plain(logits, T)},
                **common,
            )
    return records


if __name__ == "__main__":
    bench_main(run, quick_by_default=True)
