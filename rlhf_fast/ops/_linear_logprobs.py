"""rlhf_fast.linear_logprobs: token log-probs and entropy straight from hidden
states and the lm_head, without the (N, V) logits.

Naming chain: _linear_logprobs_fwd_kernel and its launcher
linear_logprobs_fwd_triton (triton/linear_logprobs.py),
linear_logprobs_fwd_cpu (here: chunks of tokens through at::mm and the C++
logprobs_fwd row pass) -> torch.ops.rlhf_fast.linear_logprobs_fwd /
linear_logprobs_fwd_triton -> rlhf_fast.linear_logprobs ->
reference.linear_logprobs -> tests/test_linear_logprobs.py ->
benchmarks/bench_linear_logprobs.py.

Memory: the logits are 4*N*V bytes in fp32, 18 GB at 32k tokens of Qwen's
V=151936; here the scratch is chunk_size * V logits (CPU), or one register
tile (GPU forward) and N * v_chunk d-logits (GPU backward).
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype
from ._autograd import register_autograd
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_ignore_index,
    check_labels_in_range,
    check_same_device,
    check_temperature,
    check_tensor,
    host_value_checks,
    once_differentiable,
)

OP = "rlhf_fast.linear_logprobs"
IMPLEMENTED = ("triton", "cpp")

# Default scratch budget for one chunk of logits. CPU: 24 MiB = 192 rows at
# V=32000 fp32, 9.4% of the materialised (2048, 32000) logits (250 MiB);
# MKL's GEMM loses ~1.3x per row at 128-256 rows against one 2048-row call
# (measured on 2 cores) and ~2x at 64, so smaller chunks cost time. Rows are
# rounded to multiples of 16 and kept >= 64 (at V=151936: 64 rows, 37 MiB).
# GPU backward: the d-logits scratch, N * v_chunk elements.
CPU_CHUNK_BYTES = 24 * 2**20
GPU_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 64


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = budget // (4 * max(V, 1))
    rows = max(MIN_CHUNK_ROWS, rows // 16 * 16)
    return max(1, min(rows, N))


# ---------------------------------------------------------------- validation


def check_linear_inputs(op: str, hidden, weight, bias, labels, chunk_size, v_name: str = "V"):
    """hidden (..., H), weight (v_name, H), bias (v_name,) or None of one
    float dtype, labels (...) int, all on one device; chunk_size None or > 0.
    Returns (hidden, weight, bias), under torch.autocast cast to its dtype:
    the op is then a matmul and runs as F.linear would (the casts are
    autograd-tracked). v_name names the vocabulary dim (V_r for a shard)."""
    check_tensor(op, "hidden", hidden, FLOAT_DTYPES)
    check_tensor(op, "weight", weight, FLOAT_DTYPES)
    check_tensor(op, "labels", labels, INDEX_DTYPES)
    if bias is not None:
        check_tensor(op, "bias", bias, FLOAT_DTYPES)
    check_same_device(op, "hidden", hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have a feature dim (..., H), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D ({v_name}, H), got shape {tuple(weight.shape)}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{op}: weight has H={weight.shape[1]} columns but hidden has H={H} features")
    if torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one")
    if bias is not None:
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{op}: bias must have shape ({v_name},) = ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}; cast one")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{op}: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return hidden, weight, bias


# ---------------------------------------------------------------- public API


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / T).

    hidden: (..., H); weight: (V, H), the lm_head, same dtype as hidden
        (float32 / bfloat16 / float16 / float64); bias: (V,) or None;
    labels: (...) int32 / int64, the leading shape of hidden.
    Returns logprobs (...) in float32 (float64 for float64 inputs), and with
    return_entropy=True (logprobs, entropy). Same values and gradients (for
    hidden, weight and bias) as logprobs_from_logits(hidden @ weight.T + bias,
    labels, ...); the weight and bias gradients are summed over tokens in
    fp32 and rounded once. ignore_index positions give 0 and no gradient.
    chunk_size: tokens per chunk (CPU); on GPU the backward's d-logits
    scratch is sized to chunk_size * V elements. Default: from a memory
    budget (24 MiB of logits per chunk on CPU, 256 MiB on GPU).
    H = 0 is allowed: the logits are then the bias (0 without one).
    top_k / top_p / min_p, and a tensor temperature (per row or per token):
    the sampler's truncated distribution, as logprobs_from_logits takes them
    (ops/_linear_processed.py: chunked, four GEMMs; float64 inputs run the
    reference on the materialised logits).
    """
    hidden, weight, bias = check_linear_inputs(OP, hidden, weight, bias, labels, chunk_size)
    H, V = hidden.shape[-1], weight.shape[0]
    if isinstance(temperature, torch.Tensor) or top_k is not None or top_p is not None or min_p is not None:
        ignore_index = check_ignore_index(OP, ignore_index, labels)
        if V == 0 and labels.numel() > 0:
            raise ValueError(f"{OP}: weight has an empty vocabulary dim (V=0)")
        if host_value_checks(hidden.device):
            check_labels_in_range(OP, labels, V, ignore_index, v_name="V = weight.shape[0]")
        filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        if (
            hidden.dtype == torch.float64
            or _backend.choose("linear_logprobs", hidden.device, IMPLEMENTED) == "reference"
        ):
            from ._logprobs import logprobs_from_logits

            logits = torch.nn.functional.linear(hidden, weight, bias)
            return logprobs_from_logits(
                logits, labels, ignore_index=ignore_index, return_entropy=return_entropy, **filters
            )
        from ._linear_processed import linear_processed_logprobs

        return linear_processed_logprobs(
            hidden, weight, bias, labels, temperature, top_k, top_p, min_p, ignore_index, return_entropy, chunk_size
        )
    temperature = check_temperature(OP, temperature, hidden.dtype)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    if V == 0 and labels.numel() > 0:
        raise ValueError(f"{OP}: weight has an empty vocabulary dim (V=0)")
    if host_value_checks(hidden.device):
        check_labels_in_range(OP, labels, V, ignore_index, v_name="V = weight.shape[0]")

    backend = _backend.choose("linear_logprobs", hidden.device, IMPLEMENTED)
    if backend == "reference":
        return reference.linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
    rows = hidden.reshape(labels.numel(), H)  # a view unless hidden's leading dims are strided; -1 fails at H = 0
    N = rows.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, V, hidden.device)
    fwd = (
        torch.ops.rlhf_fast.linear_logprobs_fwd_triton
        if backend == "triton"
        else torch.ops.rlhf_fast.linear_logprobs_fwd
    )
    lp, ent, _, _ = fwd(rows, weight, bias, labels.reshape(-1), temperature, ignore_index, min(chunk, max(N, 1)))
    lp = lp.reshape(labels.shape)
    if return_entropy:
        return lp, ent.reshape(labels.shape)
    return lp


# ---------------------------------------------------------------- CPU: token chunks


def _row_chunks(labels: torch.Tensor, ignore_index: int, chunk_size: int):
    """Chunks of the rows that have a label: slices when none is ignored,
    else index tensors, so padding / prompt tokens (often 30-50% of an RLHF
    batch) cost no GEMM FLOPs. Ignored rows keep the outputs' zero fill."""
    valid = labels != ignore_index
    if bool(valid.all()):
        n = labels.shape[0]
        return [slice(lo, min(n, lo + chunk_size)) for lo in range(0, n, chunk_size)]
    rows = valid.nonzero().squeeze(1)
    return list(rows.split(chunk_size))


# Batch invariance (docs/rollout_correction.md): MKL / oneDNN pick a different
# kernel for a GEMM with few rows (M = 1, 2, 5 gave other bits than M = 16 in
# tests/test_batch_invariance.py), while every M that is a multiple of 16 gave
# the same bits per row whatever M, the row's position and the thread count.
# So each chunk's GEMM runs on its rows padded with zero rows to a multiple of
# 16: a token's logits, hence its log-prob, do not depend on N or chunk_size.
# Cost: at most 15 extra rows per call (only the last chunk is short), 16x
# for a single token.
GEMM_ROW_MULTIPLE = 16


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = h.shape[0]
    pad = -m % GEMM_ROW_MULTIPLE
    if pad:
        h = torch.cat([h, h.new_zeros((pad, h.shape[1]))])
    return torch.nn.functional.linear(h, weight, bias)[:m]


@torch.autocast("cpu", enabled=False)  # the chunk GEMMs keep the inputs' dtype
def linear_logprobs_fwd_cpu(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    """Per chunk of chunk_size labelled tokens: logits = hidden_c @ W.T + b
    (MKL), then the fused C++ row pass; the chunk is freed before the next."""
    N = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    outs = tuple(hidden.new_zeros((N,), dtype=acc) for _ in range(4))  # lp, entropy, row max, log s
    for rows in _row_chunks(labels, ignore_index, chunk_size):
        logits = _chunk_logits(hidden[rows], weight, bias)
        out = torch.ops.rlhf_fast.logprobs_fwd(
            logits.unsqueeze(0), labels[rows].unsqueeze(0), temperature, ignore_index, True
        )
        for dst, src in zip(outs, out):
            dst[rows] = src[0]
        del logits, out
    return outs


@torch.autocast("cpu", enabled=False)
def linear_logprobs_bwd_cpu(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    row_max,
    log_s,
    entropy,
    temperature,
    ignore_index,
    chunk_size,
):
    """Per chunk: recompute logits, d logits from the C++ logprobs_bwd with
    the chunk's own per-token upstream grads, then dH_c = dZ @ W and
    dW += dZ.T @ H_c, db += sum(dZ) in fp32 (cast once at the end).
    Scratch: the chunk's logits and dZ, 2 * chunk_size * V elements."""
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    grad_hidden = torch.zeros((N, H), dtype=hidden.dtype, device=hidden.device)
    grad_weight = weight.new_zeros((V, H), dtype=acc)
    grad_bias = weight.new_zeros((V,) if bias is not None else (0,), dtype=acc)
    for rows in _row_chunks(labels, ignore_index, chunk_size):
        h = hidden[rows]
        logits = _chunk_logits(h, weight, bias)  # the forward's logits, bit for bit
        gh = grad_entropy[rows].unsqueeze(0) if grad_entropy is not None else None
        dz = torch.ops.rlhf_fast.logprobs_bwd(
            grad_logprobs[rows].unsqueeze(0),
            gh,
            logits.unsqueeze(0),
            labels[rows].unsqueeze(0),
            row_max[rows].unsqueeze(0),
            log_s[rows].unsqueeze(0),
            entropy[rows].unsqueeze(0),
            temperature,
            ignore_index,
        )[0]
        del logits
        if isinstance(rows, slice):
            torch.mm(dz, weight, out=grad_hidden[rows])
        else:
            grad_hidden[rows] = dz @ weight
        if dz.dtype == acc:
            grad_weight.addmm_(dz.t(), h)
        else:  # bf16 / fp16: each chunk's product in fp32, summed in fp32
            grad_weight.addmm_(dz.t().to(acc), h.to(acc))
        if bias is not None:
            grad_bias += dz.sum(0, dtype=acc)
        del dz
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


# ---------------------------------------------------------------- autograd + fake


def _fake_fwd(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=acc) for _ in range(4))


def _fake_bwd(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    row_max,
    log_s,
    entropy,
    temperature,
    ignore_index,
    chunk_size,
):
    gb = weight.new_empty((weight.shape[0],) if bias is not None else (0,))
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, chunk_size = inputs
    _, entropy, row_max, log_s = output
    ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_s, entropy)
    ctx.has_bias = bias is not None
    ctx.args = (temperature, ignore_index, chunk_size)
    ctx.mark_non_differentiable(row_max, log_s)


def _make_backward(bwd_op):
    @once_differentiable(OP)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_row_max, _grad_log_s):
        hidden, weight, bias, labels, row_max, log_s, entropy = ctx.saved_tensors
        gh, gw, gb = bwd_op(
            grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_max, log_s, entropy, *ctx.args
        )
        return gh, gw, (gb if ctx.has_bias else None), None, None, None, None

    return backward


if _backend.has_cpp():
    torch.library.impl("rlhf_fast::linear_logprobs_fwd", "CPU")(linear_logprobs_fwd_cpu)
    torch.library.impl("rlhf_fast::linear_logprobs_bwd", "CPU")(linear_logprobs_bwd_cpu)
    torch.library.register_fake("rlhf_fast::linear_logprobs_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_fast::linear_logprobs_bwd")(_fake_bwd)
    register_autograd(
        "linear_logprobs_fwd",
        _make_backward(torch.ops.rlhf_fast.linear_logprobs_bwd),
        setup_context=_setup_context,
    )


# ---------------------------------------------------------------- GPU: Triton


if _backend.HAVE_TRITON:
    from ..triton import linear_logprobs as kernels  # registers the *_triton ops

    register_autograd(
        "linear_logprobs_fwd_triton",
        _make_backward(kernels.linear_logprobs_bwd_triton),
        setup_context=_setup_context,
        triton_op=kernels.linear_logprobs_fwd_triton,
    )
