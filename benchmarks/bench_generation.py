"""rlhf_fast.generate vs Hugging Face model.generate: the same tiny Llama,
batch, prompt and response length, sampling settings (temperature 1.0,
top_p 0.9), EOS disabled so both produce exactly B*R tokens. Reports the
median seconds per call; tokens/s = B*R / median (speedup is the tokens/s
ratio). Target on CPU: >= 1.5x. GPU: HF with cache_implementation="static".
`python -m benchmarks.bench_generation [--full] [--json PATH]`.
"""

from __future__ import annotations

import torch

import rlhf_fast

from .harness import Record, bench_main, compare
from .llama import causal_lm, llama_config


def _model(device, vocab, hidden, layers):
    torch.manual_seed(0)
    return causal_lm(llama_config(vocab, hidden, layers), device).eval()


def run(quick: bool = True, device: str | None = None, tiny: bool = False) -> list[Record]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        cases = [(1000, 64, 1, 2, 8, 8)]
    elif device == "cuda":
        cases = [(32000, 1024, 8, 64, 128, 256)]
    elif quick:
        cases = [(32000, 128, 2, 8, 32, 32)]
    else:
        cases = [(32000, 256, 4, 32, 64, 128)]
    records: list[Record] = []
    for vocab, hidden, layers, B, P, R in cases:
        model = _model(device, vocab, hidden, layers)
        ids = torch.randint(3, vocab, (B, P), device=device)
        mask = torch.ones_like(ids)
        mask[: B // 2, : P // 4] = 0  # half the prompts left-padded
        kw = dict(temperature=1.0, top_p=0.9)
        hf_kw = dict(do_sample=True, max_new_tokens=R, min_new_tokens=R, pad_token_id=0, top_k=0, **kw)

        def ours():
            return rlhf_fast.generate(model, ids, mask, max_new_tokens=R, eos_token_id=None, **kw)

        def hf():  # DynamicCache: grows (and copies) the KV cache as it goes
            return model.generate(ids, attention_mask=mask, **hf_kw)

        def hf_static():  # preallocated StaticCache, as gpt-fast / rlhf_fast do
            return model.generate(ids, attention_mask=mask, cache_implementation="static", **hf_kw)

        assert ours().sequences.shape == hf().shape == hf_static().shape
        records += compare(
            op="generate",
            impl="rlhf_fast",
            shape=f"B={B} P={P} R={R} V={vocab} h={hidden} L={layers}",
            dtype="float32",
            device=device,
            mode="fwd",
            fn=ours,
            baselines={"HF model.generate (dynamic cache)": hf, "HF model.generate (static cache)": hf_static},
            warmup=1,
            repeat=3 if quick else 5,
        )
        for r in records:
            r.gb_per_s = None
    return records


def _tokens_per_s(records) -> str:
    lines = []
    for r in records:
        if r.baseline and r.status == "ok":
            n_tok = int(r.shape.split("B=")[1].split()[0]) * int(r.shape.split("R=")[1].split()[0])
            lines.append(
                f"{r.shape}: ours {n_tok / r.median_s:.0f} tok/s, {r.baseline} {n_tok / r.baseline_median_s:.0f} tok/s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    bench_main(run, quick_by_default=True, summary=_tokens_per_s)
