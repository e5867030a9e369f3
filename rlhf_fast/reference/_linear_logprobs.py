"""Reference fused-linear log-probs: materialises the (N, V) logits.

hidden @ weight.T + bias, then reference.logprobs_from_logits. At Qwen's
V=151936 and 32k tokens those logits are 18 GB in fp32: this is the path the
fused op exists to avoid, kept as the oracle (float64), the benchmarks'
baseline and the fallback.
"""

from __future__ import annotations

import torch

from ._logprobs import logprobs_from_logits


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
):
    """log p(label) (and entropy) under softmax((hidden @ weight.T + bias) / T).

    hidden: (..., H); weight: (V, H); bias: (V,) or None; labels: (...).
    The logits are formed in the inputs' dtype (as a model's lm_head does),
    the softmax in fp32 (fp64 for fp64 inputs). chunk_size is accepted for
    signature parity and ignored. top_k / top_p / min_p (and a tensor
    temperature): the sampler's truncated distribution, as
    reference.logprobs_from_logits takes them.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs_from_logits(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        top_k=0 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p, min_p=0.0 if min_p is None else min_p,
    )  # fmt: skip
