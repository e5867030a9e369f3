"""rlhf_fast.logprobs_from_logits: validation, backend dispatch, autograd and
fake (meta) registration for the log-prob / entropy ops.

Naming chain: _logprobs_fwd_kernel and its launcher logprobs_fwd_triton
(triton/logprobs.py), logprobs_fwd_cpu
(csrc/cpu/logprobs.cpp), logprobs_fwd_cuda (csrc/cuda/logprobs_ops.cpp) ->
torch.ops.rlhf_fast.logprobs_fwd / logprobs_fwd_triton ->
rlhf_fast.logprobs_from_logits -> reference.logprobs_from_logits ->
tests/test_logprobs.py -> benchmarks/bench_logprobs.py.
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype
from ._autograd import register_autograd
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    as_rows,
    check_ignore_index,
    check_labels_in_range,
    check_same_device,
    check_temperature,
    check_tensor,
    host_value_checks,
    once_differentiable,
)
from ._processed_logprobs import processed_logprobs

OP = "rlhf_fast.logprobs_from_logits"
# GPU: Triton first (the kernel every GPU test and benchmark runs), the CUDA kernel second.
IMPLEMENTED = ("triton", "cuda", "cpp")


# ---------------------------------------------------------------- shapes


# ---------------------------------------------------------------- validation


def check_logits_labels(op: str, logits, labels, v_name: str = "V") -> None:
    """logits (..., V) float and labels (...) int on one device; v_name
    names the vocabulary dim in messages (V_r for a vocabulary shard)."""
    check_tensor(op, "logits", logits, FLOAT_DTYPES)
    check_tensor(op, "labels", labels, INDEX_DTYPES)
    check_same_device(op, "logits", logits, labels=labels)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have a vocabulary dim (..., {v_name}), got a 0-dim tensor")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )


# ---------------------------------------------------------------- public API


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
):
    """Log-probability of each label under softmax(logits / temperature), or
    under the sampler's truncated distribution when top_k / top_p / min_p
    are given.

    logits: (..., V) float32 / bfloat16 / float16 / float64; any leading
        shape and leading strides (a slice such as logits[:, :-1] is read in
        place, without a copy).
    labels: (...) int32 / int64, the leading shape of logits.
    Returns logprobs (...) in float32 (float64 for float64 logits), and with
    return_entropy=True the tuple (logprobs, entropy), where entropy is that
    of the same tempered distribution. Positions whose label is ignore_index
    give 0 for both and receive no gradient; their logits are never read.
    ignore_index must fit the labels' dtype (int32 labels: [-2**31, 2**31 - 1]),
    else ValueError on every backend (no label could equal it).
    A row containing NaN, or only -inf, gives NaN for that row alone; so does
    one whose max(logits) / temperature overflows the math dtype. Results
    and gradients are exact to the row's spread at any offset (the max is
    subtracted before scaling by 1 / temperature; the backward recomputes p
    from the saved row max and log-sum-exp of the shifted logits).
    temperature, top_k, top_p, min_p: Python scalars, (B,) per-row tensors
    (B = labels.shape[0]) or tensors of the labels' shape (per token), with
    rlhf_fast.sample's meaning (top_k 0, top_p 1, min_p 0 or None: off).
    With any filter on, each label is scored under the distribution sample()
    draws from: temperature, top-k, top-p on the top-k survivors, min-p,
    renormalised, ties at a threshold kept; sample()'s processed_logprobs of
    its own token equal these bit for bit on the same logits. A label outside
    the kept set gets -inf (mask such tokens out of a loss: the trainers
    do, and count them). The entropy is then the truncated distribution's. Gradients
    hold the kept set fixed (the thresholds are piecewise constant in the
    logits). docs/sampling.md maps vLLM / SGLang settings to these arguments.
    """
    check_logits_labels(OP, logits, labels)
    processed = isinstance(temperature, torch.Tensor) or top_k is not None or top_p is not None or min_p is not None
    if not processed:  # tensors and filters: checked per token in ops/_processed_logprobs.py
        temperature = check_temperature(OP, temperature, logits.dtype)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    V = logits.shape[-1]
    if V == 0 and labels.numel() > 0:
        raise ValueError(f"{OP}: logits have an empty vocabulary dim (V=0)")
    if host_value_checks(logits.device):
        check_labels_in_range(OP, labels, V, ignore_index)
    if processed:
        return processed_logprobs(logits, labels, temperature, top_k, top_p, min_p, ignore_index, return_entropy)

    backend = _backend.choose("logprobs_from_logits", logits.device, IMPLEMENTED)
    if backend == "reference":
        return reference.logprobs_from_logits(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    rows = as_rows(logits)
    labels_rows = labels.reshape(rows.shape[0], rows.shape[1])
    fwd = torch.ops.rlhf_fast.logprobs_fwd_triton if backend == "triton" else torch.ops.rlhf_fast.logprobs_fwd
    lp, ent, _, _ = fwd(rows, labels_rows, temperature, ignore_index, return_entropy)
    lp = lp.reshape(labels.shape)
    if return_entropy:
        return lp, ent.reshape(labels.shape)
    return lp


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy = inputs
    _, entropy, row_max, log_s = output
    ctx.save_for_backward(logits, labels, row_max, log_s, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    # compute_entropy=False: the entropy was never returned, so its
    # (materialised zero) gradient is dropped and the backward takes the
    # log-prob-only sweep
    ctx.entropy_returned = bool(compute_entropy)
    ctx.mark_non_differentiable(row_max, log_s)


def _make_backward(bwd_op):
    @once_differentiable(OP)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_row_max, _grad_log_s):
        logits, labels, row_max, log_s, entropy = ctx.saved_tensors
        if not ctx.entropy_returned:
            grad_entropy = None
        grad_logits = bwd_op(
            grad_logprobs, grad_entropy, logits, labels, row_max, log_s, entropy, ctx.temperature, ctx.ignore_index
        )
        return (grad_logits,) + (None,) * (len(ctx.needs_input_grad) - 1)

    return backward


def _fake_fwd(logits, labels, temperature, ignore_index, compute_entropy):
    acc = acc_dtype(logits.dtype)
    shape = logits.shape[:2]
    return tuple(logits.new_empty(shape, dtype=acc) for _ in range(4))


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, row_max, log_s, entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


if _backend.has_cpp():
    torch.library.register_fake("rlhf_fast::logprobs_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_fast::logprobs_bwd")(_fake_bwd)
    register_autograd("logprobs_fwd", _make_backward(torch.ops.rlhf_fast.logprobs_bwd), setup_context=_setup_context)


if _backend.HAVE_TRITON:
    from ..triton import logprobs as kernels  # registers the *_triton ops

    register_autograd(
        "logprobs_fwd_triton",
        _make_backward(kernels.logprobs_bwd_triton),
        setup_context=_setup_context,
        triton_op=kernels.logprobs_fwd_triton,
    )
