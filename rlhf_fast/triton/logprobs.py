"""Triton log-probs and entropy: one program per row, one sweep over V.

The row is read as BLOCK_V-wide tiles shaped (BLOCK_V // STRIP, STRIP).
Each strip of STRIP consecutive logits keeps online state: its running max
m, s = sum 2^(d) and w = sum d 2^(d), with d = (z - m) log2(e) / T. Per
tile a strip takes one max over its STRIP logits, one rescale exp2 (shared
by the STRIP elements) and then, per element, one FFMA for d, one MUFU ex2,
one add for s and, with entropy, one clamp and one FFMA for w: 1 + 1/STRIP
MUFU per element instead of the 2 of a per-element running max, and no
cross-warp reduction inside the loop (sm_90a: see docs/kernels.md). The
logits are read exactly once: N*V*2 bytes for bf16, 5 GB at (16384, 151936).
Backward recomputes p from the saved row max and log s (never from the
absolute lse, which cancels at the offset's scale) and writes d logits in
one more sweep.

The launchers at the end are the triton_ops rlhf_fast::logprobs_fwd_triton /
_bwd_triton; their fakes and autograd are in rlhf_fast/ops/_logprobs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from ._common import (
    LN2,
    LOG2E,
    NEG_INF,
    cast_out,
    kernel_scalars,
    launch_on_tensor_device,
    num_warps,
    scalar_arg,
    tl_acc,
)

STRIP = 16


@triton.jit
def row_lse_step(z, m, s, w, c, ENTROPY: tl.constexpr):
    """Fold one (R, STRIP) tile of raw logits z (ACC dtype, -inf padded) into
    the strips' state m (raw max), s, w (relative to m, base 2). c = log2(e)/T.
    Shared with the sampler, whose raw log-probs must match these bits.
    d = (z - m) c subtracts the max before scaling: one FADD + one FMUL per
    element where z c - m c was one FFMA, but exact to the row's spread
    (m c rounds at the offset's scale: 0.5 at z ~ 1e7, and overflows past
    2.4e38 where c = log2(e) > 1)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))  # max drops a NaN z; e = 2^NaN carries it into s
    # A strip that has seen only -inf keeps reference 0 and s = w = 0, so no
    # (-inf) - (-inf) = NaN appears.
    ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    shift = tl.where(m == NEG_INF, 0.0, (m - ref) * c)  # <= 0
    alpha = tl.where(m == NEG_INF, 0.0, tl.exp2(shift))
    d = (z - ref[:, None]) * c
    e = tl.exp2(d)
    if ENTROPY:
        # 2^d is 0 below d = -1075 (fp64) / -150 (fp32): clamping at -2048
        # changes no term and turns -inf * 0 into 0, one max per element.
        w = alpha * (w + shift * s) + tl.sum(tl.maximum(d, -2048.0) * e, axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, w


@triton.jit
def row_lse_finish(m, s, w, c, ENTROPY: tl.constexpr):
    """Merge the strips: (row max (raw), sum 2^d, sum d 2^d) relative to the
    row max. NaN in any strip's s reaches s_row (NaN * 0 is NaN)."""
    m_row = tl.max(m, axis=0)
    ref = tl.where(m_row == NEG_INF, 0.0, m_row)
    delta = tl.where(m == NEG_INF, 0.0, (m - ref) * c)
    scale = tl.where(m == NEG_INF, 0.0, tl.exp2(delta))
    s_row = tl.sum(s * scale, axis=0)
    if ENTROPY:
        w_row = tl.sum((w + delta * s) * scale, axis=0)
    else:
        w_row = 0.0
    return m_row, s_row, w_row


@triton.jit
def row_lse(m_row, s_row, inv_temp):
    """log-sum-exp of z = x / T in nats from the merged state, and log2(s_row):
    one expression for the log-prob kernel and the sampler, so both contract
    it into the same FFMA. A row whose lse overflows (max x / T beyond the
    dtype: the backward could not use it) gets NaN for both, as on CPU."""
    log2_s = tl.log2(s_row)
    lse = m_row * inv_temp + log2_s * LN2
    bad = tl.abs(lse) == float("inf")
    return tl.where(bad, float("nan"), lse), tl.where(bad, float("nan"), log2_s)


@triton.jit
def row_logprob(x, m_row, log2_s, inv_temp):
    """log p(x) = (x - max) / T - ln s: never z - lse, which cancels two
    terms of the offset's size."""
    return (x - m_row) * inv_temp - log2_s * LN2


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    lp_ptr,
    ent_ptr,
    max_ptr,
    logs_ptr,
    B,
    V,
    stride_a,
    stride_b,
    inv_temp,  # fp32 (a Python float); fp64 logits read the exact double from scalars_ptr
    scalars_ptr,
    ignore_index,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    SCALARS_FROM_PTR: tl.constexpr,
    ENTROPY: tl.constexpr,  # False: the entropy output is left 0 and w is never formed
    BLOCK_V: tl.constexpr,
    STRIP: tl.constexpr,
):
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    c = inv_temp * LOG2E  # log2(e) / T
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // B) * stride_a + (row % B) * stride_b
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    n_cols = tl.where(active, V, 0)  # padding rows: the loops run 0 times
    offs = tl.arange(0, BLOCK_V // STRIP)[:, None] * STRIP + tl.arange(0, STRIP)[None, :]

    m = tl.full([BLOCK_V // STRIP], NEG_INF, ACC)
    s = tl.zeros([BLOCK_V // STRIP], ACC)
    w = tl.zeros([BLOCK_V // STRIP], ACC)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):  # full tiles: no mask per element
        z = tl.load(row_ptr + start + offs).to(ACC)
        m, s, w = row_lse_step(z, m, s, w, c, ENTROPY)
    if n_full < n_cols:  # the ragged tail, masked
        z = tl.load(row_ptr + n_full + offs, mask=n_full + offs < V, other=NEG_INF).to(ACC)
        m, s, w = row_lse_step(z, m, s, w, c, ENTROPY)
    m_row, s_row, w_row = row_lse_finish(m, s, w, c, ENTROPY)
    # padding rows: s = 1, w = 0 keep log / divide quiet; outputs are 0 below
    s_row = tl.where(active, s_row, 1.0)
    lse, log2_s = row_lse(m_row, s_row, inv_temp)
    # A label outside [0, V) is never read: under torch.compile, and on GPU
    # where the host check would sync, such a row gets a NaN log-prob (as in
    # the CUDA kernel) instead of an out-of-bounds load.
    in_range = active & (label >= 0) & (label < V)
    safe_label = tl.where(in_range, label, 0)
    x_label = tl.load(row_ptr + safe_label, mask=in_range, other=float("nan")).to(ACC)
    tl.store(lp_ptr + row, tl.where(active, row_logprob(x_label, m_row, log2_s, inv_temp), 0.0))
    if ENTROPY:
        entropy = (log2_s - tl.where(active, w_row, 0.0) / s_row) * LN2
        tl.store(ent_ptr + row, tl.where(active, entropy, 0.0))
    else:
        tl.store(ent_ptr + row, tl.zeros([], ACC))
    # the backward's shift and log s (lse itself is only formed for its
    # overflow check inside row_lse: a NaN log2_s marks that row)
    tl.store(max_ptr + row, tl.where(active, m_row, 0.0))
    tl.store(logs_ptr + row, tl.where(active, log2_s * LN2, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    labels_ptr,
    glp_ptr,
    gh_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    dx_ptr,
    B,
    V,
    stride_a,
    stride_b,
    inv_temp,
    scalars_ptr,
    ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    SCALARS_FROM_PTR: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr,  # the interpreter's bf16 cast truncates (see rounded)
    BLOCK_V: tl.constexpr,
):
    """d logits_k = (1/T) [1{k = label} g_lp - p_k g_lp - g_h p_k (log p_k + H)]
    with log2 p_k = (x_k - max) log2(e) / T - log2 s: every term of the
    row's spread (x_k log2(e) / T - lse2 lost 0.5 of log p at logits of 1e7,
    fp32). Written as p_k (A + B log2 p_k) plus the label's term, which one
    fix-up store adds after the sweep: per element one FADD and one FFMA for
    log2 p, one MUFU, one clamp and one FFMA for A + B log2 p, one multiply
    and the cast (the count of x c - lse2's FFMA + two clamps)."""
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    c = inv_temp * LOG2E  # log2(e) / T
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // B) * stride_a + (row % B) * stride_b
    out_ptr = dx_ptr + row * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    label_ok = (label >= 0) & (label < V)
    m = tl.load(max_ptr + row).to(ACC)
    # p = 2^((x - m) c - log2 s); a label out of range makes the row's
    # gradient NaN (the forward's NaN row), through p
    log2_s = tl.where(label_ok, tl.load(logs_ptr + row).to(ACC) * LOG2E, float("nan"))
    g_lp = tl.load(glp_ptr + row).to(ACC)
    a = -g_lp * inv_temp
    b = 0.0
    if HAS_GRAD_ENTROPY:
        # log p + H = log2 p ln 2 + H
        g_h = tl.load(gh_ptr + row).to(ACC)
        a -= g_h * tl.load(ent_ptr + row).to(ACC) * inv_temp
        b = -g_h * LN2 * inv_temp
    cols = tl.arange(0, BLOCK_V)
    if active:
        n_full = (V // BLOCK_V) * BLOCK_V
        for start in range(0, n_full, BLOCK_V):
            x = tl.load(row_ptr + start + cols).to(ACC)
            g = _dlogit(x, m, c, log2_s, a, b, HAS_GRAD_ENTROPY)
            tl.store(out_ptr + start + cols, cast_out(g, dx_ptr.dtype.element_ty, ROUND_BY_HAND))
        if n_full < V:
            offs = n_full + cols
            x = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(ACC)
            g = _dlogit(x, m, c, log2_s, a, b, HAS_GRAD_ENTROPY)
            tl.store(out_ptr + offs, cast_out(g, dx_ptr.dtype.element_ty, ROUND_BY_HAND), mask=offs < V)
        if label_ok:
            # the label's column again, with its one-hot term: ordered after
            # the sweep's store of the same address by the CTA barrier
            tl.debug_barrier()
            x = tl.load(row_ptr + label).to(ACC)
            g = _dlogit(x, m, c, log2_s, a, b, HAS_GRAD_ENTROPY) + g_lp * inv_temp
            tl.store(out_ptr + label, cast_out(g, dx_ptr.dtype.element_ty, ROUND_BY_HAND))
    else:  # padding rows: zeros, and their logits are never read
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out_ptr + offs, tl.zeros([BLOCK_V], dx_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _dlogit(x, m, c, log2_s, a, b, HAS_GRAD_ENTROPY: tl.constexpr):
    log2_p = (x - m) * c - log2_s
    p = tl.exp2(log2_p)
    if HAS_GRAD_ENTROPY:
        # x = -inf gives p = 0 and b log2 p = +-inf (NaN when b = 0): clamped
        # at -2048, where 2^x is 0 in fp32 and fp64 alike, p * t is 0 (for
        # |b| < 1e35); a NaN x still reaches g through p
        t = a + b * tl.maximum(log2_p, -2048.0)
        return p * t
    else:
        return p * a


def row_config(V: int, fp64: bool = False) -> dict:
    """BLOCK_V and num_warps of the row kernels: the log-prob forward and
    backward and the sampler, which must reduce a row in the same strip order
    to stay bit-identical. 4096 lanes over 8 warps is 16 logits per thread:
    256 strips of 16, their (m, s, w) state 6 registers per thread. fp64
    rows use 1024 lanes (the 4096-lane fp64 forward spilled 27 KB)."""
    bv = max(STRIP, min(1024 if fp64 else 4096, triton.next_power_of_2(max(V, 1))))
    return dict(BLOCK_V=bv, num_warps=num_warps(bv))


# ---------------------------------------------------------------- launchers (triton_ops)


@torch.library.triton_op("rlhf_fast::logprobs_fwd_triton", mutates_args=())
@launch_on_tensor_device
def logprobs_fwd_triton(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rlhf_fast::logprobs_fwd's signature (csrc/ops.cpp): logits (A, B, V)
    with any strides on A, B; labels (A, B). Returns logprobs, entropy,
    row_max, log_s (A, B) in the accumulation dtype.
    compute_entropy=False leaves the entropy output 0 (a log-prob-only
    sweep: 2 fewer instructions per logit); the backward never reads it
    then, since no gradient can flow into an entropy nobody returned."""
    A, B, V = logits.shape
    lp, ent, row_max, log_s = (logits.new_empty((A, B), dtype=acc_dtype(logits.dtype)) for _ in range(4))
    if A * B > 0 and _backend.launches_kernels(logits):
        scalars, from_ptr = kernel_scalars(logits.dtype, logits.device, 1.0 / temperature)
        torch.library.wrap_triton(_logprobs_fwd_kernel)[(A * B,)](
            logits, labels.contiguous(), lp, ent, row_max, log_s,
            B, V, logits.stride(0), logits.stride(1),
            1.0 / temperature, scalars if from_ptr else lp, ignore_index,
            ACC=tl_acc(logits.dtype), SCALARS_FROM_PTR=from_ptr, ENTROPY=compute_entropy,
            STRIP=STRIP, **row_config(V, logits.dtype == torch.float64),
        )  # fmt: skip
    return lp, ent, row_max, log_s


@torch.library.triton_op("rlhf_fast::logprobs_bwd_triton", mutates_args=())
@launch_on_tensor_device
def logprobs_bwd_triton(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """rlhf_fast::logprobs_bwd's signature (csrc/ops.cpp)."""
    A, B, V = logits.shape
    grad_logits = torch.empty((A, B, V), dtype=logits.dtype, device=logits.device)
    if grad_logits.numel() > 0 and _backend.launches_kernels(logits):
        acc = acc_dtype(logits.dtype)
        has_gh = grad_entropy is not None
        glp = grad_logprobs.to(acc).contiguous()
        gh = grad_entropy.to(acc).contiguous() if has_gh else glp
        scalars, from_ptr = kernel_scalars(logits.dtype, logits.device, 1.0 / temperature)
        torch.library.wrap_triton(_logprobs_bwd_kernel)[(A * B,)](
            logits, labels.contiguous(), glp, gh,
            row_max.to(acc).contiguous(), log_s.to(acc).contiguous(), entropy.to(acc).contiguous(), grad_logits,
            B, V, logits.stride(0), logits.stride(1),
            1.0 / temperature, scalars if from_ptr else glp, ignore_index,
            HAS_GRAD_ENTROPY=has_gh, ACC=tl_acc(logits.dtype), SCALARS_FROM_PTR=from_ptr,
            ROUND_BY_HAND=_backend.triton_interpret(), **row_config(V, logits.dtype == torch.float64),
        )  # fmt: skip
    return grad_logits
