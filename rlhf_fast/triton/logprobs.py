"""Triton log-probs and entropy: one program per row, one sweep over V.

Forward keeps per-lane online state (running max m, s = sum exp(z - m),
w = sum (z - m) exp(z - m)) across BLOCK_V-wide tiles and merges the lanes
at the end, so the logits are read exactly once: N*V*2 bytes for bf16, 5 GB
at (16384, 151936). Backward recomputes p from the saved lse and writes
d logits in one more sweep.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import rounded, scalar_arg

@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, lp_ptr, ent_ptr, lse_ptr,
    B, V, stride_a, stride_b,
    inv_temp,  # fp32 (a Python float); fp64 logits read the exact double from scalars_ptr
    scalars_ptr,
    ignore_index,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    SCALARS_FROM_PTR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // B) * stride_a + (row % B) * stride_b
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    n_cols = tl.where(active, V, 0)  # padding rows: the loop runs 0 times
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_V], float("-inf"), ACC)
    s = tl.zeros([BLOCK_V], ACC)
    w = tl.zeros([BLOCK_V], ACC)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(ACC) * inv_temp
        m_new = tl.maximum(m, z)  # drops a NaN z on GPUs (max.f32); e = exp(NaN) carries it into s
        # Every -inf below is guarded: a lane that has seen only -inf keeps
        # s = w = 0 instead of turning into (-inf) - (-inf) = NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = tl.where(m == float("-inf"), 0.0, m - ref)
        alpha = tl.exp(m - ref)
        e = tl.exp(z - ref)
        d = tl.where(z == float("-inf"), 0.0, z - ref)
        w = (w + delta * s) * alpha + d * e
        s = s * alpha + e
        m = m_new

    # merge the BLOCK_V lanes
    m_row = tl.max(m, axis=0)
    ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    delta = tl.where(s > 0, m - ref, 0.0)
    scale = tl.where(s > 0, tl.exp(delta), 0.0)
    # padding rows: s = 1, w = 0 keeps log / divide quiet; outputs are 0 below
    s_row = tl.where(active, tl.sum(s * scale, axis=0), 1.0)
    w_row = tl.where(active, tl.sum((w + delta * s) * scale, axis=0), 0.0)
    log_s = tl.log(s_row)
    lse = m_row + log_s
    entropy = log_s - w_row / s_row
    # A label outside [0, V) is never read: under torch.compile the host's
    # range check is skipped, and such a row gets a NaN log-prob (as in the
    # CUDA kernel) instead of an out-of-bounds load.
    in_range = active & (label >= 0) & (label < V)
    safe_label = tl.where(in_range, label, 0)
    z_label = tl.load(row_ptr + safe_label, mask=in_range, other=float("nan")).to(ACC) * inv_temp
    tl.store(lp_ptr + row, tl.where(active, z_label - lse, 0.0))
    tl.store(ent_ptr + row, tl.where(active, entropy, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, glp_ptr, gh_ptr, lse_ptr, ent_ptr, dx_ptr,
    B, V, stride_a, stride_b,
    inv_temp, scalars_ptr, ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    SCALARS_FROM_PTR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // B) * stride_a + (row % B) * stride_b
    out_ptr = dx_ptr + row * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    lse = tl.load(lse_ptr + row)
    mu = lse - tl.load(ent_ptr + row)  # E_p[z]
    g_lp = tl.where(active, tl.load(glp_ptr + row).to(ACC), 0.0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(active, tl.load(gh_ptr + row).to(ACC), 0.0)
    else:
        g_h = 0.0
    label_ok = (label >= 0) & (label < V)
    cols = tl.arange(0, BLOCK_V)
    n_read = tl.where(active, V, 0)  # padding rows: write zeros, read nothing
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        z = tl.load(row_ptr + offs, mask=offs < n_read, other=float("-inf")).to(ACC) * inv_temp
        p = tl.exp(z - lse)
        t = tl.where(p > 0, p * (z - mu), 0.0)
        g = tl.where(offs == label, g_lp, 0.0) - g_lp * p - g_h * t
        g = tl.where(label_ok, g, float("nan"))  # the forward's NaN row, as a gradient
        g = tl.where(active, g * inv_temp, 0.0)
        tl.store(out_ptr + offs, rounded(g, dx_ptr.dtype.element_ty), mask=in_row)


def row_config(V: int, fp64: bool = False) -> dict:
    """BLOCK_V and num_warps of the row kernels: the log-prob forward and
    backward and the sampler, which must reduce a row in the same lane order
    to stay bit-identical. 4096 lanes x 3 fp32 states over 8 warps is 48
    registers of state per thread; at 4 warps the forward took 158 registers
    and the sampler spilled (offline sm_90 compile). fp64 states are twice
    as wide, so fp64 rows use 1024 lanes (the 4096-lane fp64 forward spilled
    27 KB)."""
    bv = max(16, min(1024 if fp64 else 4096, triton.next_power_of_2(max(V, 1))))
    return dict(BLOCK_V=bv, num_warps=8 if bv >= 2048 else 4)
