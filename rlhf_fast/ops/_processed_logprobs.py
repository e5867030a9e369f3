"""Log-probs of given labels under the sampler's own distribution:
temperature (a scalar, per row or per token), then top-k, top-p and min-p,
renormalised. rlhf_fast.logprobs_from_logits routes here when any of
top_k / top_p / min_p is on or the temperature is a tensor.

The kept set and its mass come from the sampler's own code (csrc/cpu/
sampling.cpp kept_set, triton/sampling.py), so for the same logits and
parameters sample()'s processed_logprobs of its token and this op's agree
bit for bit. A label outside the kept set scores -inf. The gradient holds
the kept set fixed (as TRL, verl and vLLM's processed log-probs do: the
thresholds are piecewise constant in the logits, so that is the gradient
almost everywhere).

Naming chain: processed_logprobs_fwd_cpu (csrc/cpu/sampling.cpp),
_processed_logprobs_fwd_kernel and its launcher (triton/sampling.py) ->
torch.ops.rlhf_fast.processed_logprobs_fwd / processed_logprobs_fwd_triton
-> rlhf_fast.logprobs_from_logits(top_k=, top_p=, min_p=) ->
reference.logprobs_from_logits -> tests/test_processed_logprobs.py ->
benchmarks/bench_logprobs.py.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype
from ._autograd import register_autograd
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    as_rows,
    check_tensor,
    host_value_checks,
    min_temperature,
    once_differentiable,
)

OP = "rlhf_fast.logprobs_from_logits"
IMPLEMENTED = ("triton", "cpp")


def _token_param(name, value, labels, dtype, lo, hi, lo_open, *, integer=False, t_min=None):
    """A scalar, a (B,) per-row tensor or a tensor of the labels' shape ->
    (N,) tensor of `dtype` (N = labels.numel()). Values are checked where
    that costs no host sync (CPU, eager), as rlhf_fast.sample's are."""
    rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
    if not isinstance(value, torch.Tensor):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or (integer and not isinstance(value, numbers.Integral))
        ):
            kind = "an int" if integer else "a float"
            raise TypeError(f"{OP}: {name} must be {kind} or a tensor, got {type(value).__name__}")
        v = int(value) if integer else float(value)
        if not ((lo < v if lo_open else lo <= v) and v <= hi and -math.inf < v < math.inf):
            raise ValueError(f"{OP}: {name} must be in {rng}, got {value}")
        if t_min is not None and v < t_min:
            raise ValueError(
                f"{OP}: temperature={value} is too small: 1 / temperature overflows float32 (>= {t_min:.3g})"
            )
        return torch.full((labels.numel(),), v, dtype=dtype, device=labels.device)
    check_tensor(OP, name, value, INDEX_DTYPES if integer else FLOAT_DTYPES + INDEX_DTYPES)
    if value.device != labels.device:
        raise ValueError(f"{OP}: {name} is on {value.device} but labels are on {labels.device}")
    shape = tuple(labels.shape)
    if value.dim() == 0:
        value = value.expand(shape)
    elif value.dim() == 1 and len(shape) > 1 and value.shape[0] == shape[0]:
        value = value.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)
    elif tuple(value.shape) != shape:
        rows = f"({shape[0]},), " if len(shape) > 1 else ""
        raise ValueError(f"{OP}: {name} must be a scalar, {rows}or the labels' shape {shape}; got {tuple(value.shape)}")
    if host_value_checks(value.device) and value.numel():
        v = value.double()
        bad = (v <= lo if lo_open else v < lo) | (v > hi) | ~v.isfinite()
        if t_min is not None:
            bad |= v < t_min
        if bool(bad.any()):
            i = tuple(int(k) for k in bad.nonzero()[0])
            raise ValueError(
                f"{OP}: {name}{list(i)} = {value[i].item()} is outside {rng}" + (" or too small" if t_min else "")
            )
    return value.reshape(-1).to(dtype)


def token_params(labels, logits_dtype, temperature, top_k, top_p, min_p):
    """-> (temperature f64, top_k i64, top_p f64, min_p f64) as (N,) tensors,
    and whether any token may truncate (known-off scalars: no threshold search)."""
    inf = float("inf")
    t_min = min_temperature(logits_dtype)
    temp = _token_param("temperature", temperature, labels, torch.float64, 0.0, inf, True, t_min=t_min)
    tk = _token_param("top_k", 0 if top_k is None else top_k, labels, torch.int64, 0, 2**62, False, integer=True)
    tp = _token_param("top_p", 1.0 if top_p is None else top_p, labels, torch.float64, 0.0, 1.0, True)
    mp = _token_param("min_p", 0.0 if min_p is None else min_p, labels, torch.float64, 0.0, 1.0, False)
    off = (
        (top_k is None or (not isinstance(top_k, torch.Tensor) and top_k == 0))
        and (top_p is None or (not isinstance(top_p, torch.Tensor) and top_p == 1.0))
        and (min_p is None or (not isinstance(min_p, torch.Tensor) and min_p == 0.0))
    )
    return temp, tk, tp, mp, not off


def processed_logprobs(logits, labels, temperature, top_k, top_p, min_p, ignore_index, return_entropy):
    """logits (..., V), labels (...) already checked by logprobs_from_logits."""
    temp, tk, tp, mp, filtered = token_params(labels, logits.dtype, temperature, top_k, top_p, min_p)
    backend = _backend.choose("logprobs_from_logits", logits.device, IMPLEMENTED)
    if backend == "reference" or logits.dtype == torch.float64:  # fp64 (oracle) logits: the reference, as sample
        t = temp.reshape(labels.shape)
        return reference.logprobs_from_logits(
            logits, labels, temperature=t, ignore_index=ignore_index, return_entropy=return_entropy,
            top_k=tk.reshape(labels.shape), top_p=tp.reshape(labels.shape), min_p=mp.reshape(labels.shape),
        )  # fmt: skip
    fwd = (
        torch.ops.rlhf_fast.processed_logprobs_fwd_triton
        if backend == "triton"
        else torch.ops.rlhf_fast.processed_logprobs_fwd
    )
    # (A, B, V) views of the logits, read in place: a slice such as logits[:, :-1] is A row-strided
    # (B, V) blocks, one launch each (unbind's backward stacks their gradients once), never a copy
    rows = as_rows(logits)
    A, n = rows.shape[:2]
    y, params = labels.reshape(A, n), [p.reshape(A, n) for p in (temp, tk, tp, mp)]
    outs = [
        fwd(r, y[a], *(p[a] for p in params), ignore_index, filtered, return_entropy)[:2]
        for a, r in enumerate(rows.unbind(0))
    ]
    lp = (outs[0][0] if A == 1 else torch.stack([o[0] for o in outs])).reshape(labels.shape)
    if not return_entropy:
        return lp
    return lp, (outs[0][1] if A == 1 else torch.stack([o[1] for o in outs])).reshape(labels.shape)


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    logits, labels, temperature = inputs[:3]
    ignore_index, _, compute_entropy = inputs[6:9]
    _, entropy, stats = output
    ctx.save_for_backward(logits, labels, temperature, stats, entropy)
    ctx.ignore_index = ignore_index
    ctx.entropy_returned = bool(compute_entropy)
    ctx.mark_non_differentiable(stats)


def _make_backward(bwd_op):
    @once_differentiable(OP)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
        logits, labels, temperature, stats, entropy = ctx.saved_tensors
        if not ctx.entropy_returned:
            grad_entropy = None
        grad = bwd_op(grad_logprobs, grad_entropy, logits, labels, temperature, stats, entropy, ctx.ignore_index)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)

    return backward


def _fake_fwd(logits, labels, temperature, top_k, top_p, min_p, ignore_index, filtered, compute_entropy):
    N = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((N,), dtype=acc), logits.new_empty((N,), dtype=acc), logits.new_empty((N, 3), dtype=acc)


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, temperature, stats, entropy, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


if _backend.has_cpp():
    torch.library.register_fake("rlhf_fast::processed_logprobs_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_fast::processed_logprobs_bwd")(_fake_bwd)
    register_autograd(
        "processed_logprobs_fwd",
        _make_backward(torch.ops.rlhf_fast.processed_logprobs_bwd),
        setup_context=_setup_context,
    )


if _backend.HAVE_TRITON:
    from ..triton import sampling as kernels

    register_autograd(
        "processed_logprobs_fwd_triton",
        _make_backward(kernels.processed_logprobs_bwd_triton),
        setup_context=_setup_context,
        triton_op=kernels.processed_logprobs_fwd_triton,
    )
