"""Triton fused linear log-probs: logits tiles live only in registers.

Forward (`_linear_logprobs_fwd_kernel`): the grid tiles tokens (BLOCK_N) and
splits the vocabulary into SPLITS ranges; each program walks its range in
BLOCK_V tiles, forms hidden_tile @ weight_tile.T with tl.dot over H in
BLOCK_K steps (fp32 accumulator), and folds the tile into per-row online
state m (max), s = sum exp(z - m), w = sum (z - m) exp(z - m) and z_label.
The state is written once per vocabulary unit (about V / 128 wide, a whole
number of tiles; a split is a whole number of units) and the units' states
are merged in one fixed tree (4 floats per row per unit: 16 MB at N=8192,
V=131072), so the (N, V) logits (2 GiB in bf16) never exist. Units depend
on V alone, so a token's log-prob is the same bits whatever N, and so
whatever split count the grid picks for N.

Backward: per vocabulary chunk [v_lo, v_hi), `_linear_logprobs_dlogits_kernel`
recomputes the logits tiles and writes d logits (N, v_hi - v_lo) in the
inputs' dtype; then dW[v_lo:v_hi] = dlogits.T @ hidden is one cuBLAS matmul
over all N tokens (fp32 accumulation inside, one rounding: no cross-chunk
sum of dW at all), and dH (fp32, N x H) += dlogits @ W[v_lo:v_hi] by
`_matmul_acc_kernel`. Chunking the vocabulary rather than the tokens makes
the fp32 accumulator N x H (128 MiB at (8192, 4096)) instead of V x H
(2 GiB at (131072, 4096)). The alternatives cost more: fully fused dH/dW
kernels need either fp32 atomics ((N/BLOCK_N) * V * H of them for dW) or a
recomputation of every logits tile per H tile (H/BLOCK_H = 32x the matmul).

The launchers at the end are the triton_ops rlhf_fast::linear_logprobs_fwd_triton
/ _bwd_triton; their fakes and autograd are in rlhf_fast/ops/_linear_logprobs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._dtypes import acc_dtype
from ._common import NEG_INF, cast_out, kernel_scalars, launch_on_tensor_device, num_warps, scalar_arg, tl_acc


@triton.jit
def _grouped_tile(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """pid -> (row tile, col tile), walking GROUP row tiles x all col tiles
    before the next group: the ~132 programs resident at once then share
    GROUP hidden tiles (16 x 1 MiB at H=4096 bf16, inside H100's 50 MB L2)
    instead of all 64 of N=8192 (64 MiB, re-streamed from HBM per V step)."""
    per_group = GROUP * n_col_tiles
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_tiles - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    offs_v,
    row_mask,
    v_mask,
    H,
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) tile of hidden @ weight.T + bias in ACC precision."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + ks
        k_mask = offs_k < H
        a = tl.load(
            hidden_ptr + offs_n[:, None].to(tl.int64) * s_hn + offs_k[None, :] * s_hk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            # int64: V * H passes 2^31 at (256000, 8448)
            weight_ptr + offs_v[None, :].to(tl.int64) * s_wv + offs_k[:, None] * s_wk,
            mask=v_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            # interpreter: its bf16 tl.dot multiplies the raw uint16 bits, and
            # its fp32 tl.dot is numpy's BLAS, whose sum for a row can depend on
            # the row's place in the tile (OpenBLAS 0.3.31 on an AVX2 EPYC). A
            # GPU's dot sums each output over K in one order wherever its row
            # sits; this sum does too (numpy adds the K slices in order).
            a = a.to(ACC)
            b = b.to(ACC)
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    w_ptr,
    zy_ptr,  # partial state, each (units, N)
    N,
    V,
    H,
    V_SPLIT,  # a whole number of units
    SPLITS,
    UNIT_V,  # a whole number of BLOCK_V tiles
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    inv_temp,  # fp32 (a Python float); fp64 inputs read the exact double from scalars_ptr
    scalars_ptr,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALARS_FROM_PTR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    pid_n, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLITS, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    label = tl.load(labels_ptr + offs_n, mask=row_mask, other=ignore_index).to(tl.int64)
    v_lo = split * V_SPLIT
    v_hi = tl.minimum(V, v_lo + V_SPLIT)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_N], NEG_INF, ACC)
    s = tl.zeros([BLOCK_N], ACC)
    w = tl.zeros([BLOCK_N], ACC)
    zy = tl.zeros([BLOCK_N], ACC)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + cols
        v_mask = offs_v < v_hi
        logits = _logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            row_mask,
            v_mask,
            H,
            s_hn,
            s_hk,
            s_wv,
            s_wk,
            HAS_BIAS,
            ACC,
            DOT_PREC,
            UPCAST,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        # vocab tail masked to -inf (V % BLOCK_V != 0 must not add exp(0) terms)
        x = tl.where(v_mask[None, :], logits, NEG_INF)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # -inf guards as in the log-prob kernel: a row that has seen only -inf
        # keeps s = w = 0 instead of (-inf) - (-inf) = NaN. The state is on
        # the raw logits and d = (x - max) / T subtracts the max before
        # scaling: exact to the row's spread at any offset (x / T - max z
        # rounds at the offset's scale: 0.5 at 1e7).
        ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp((m - ref) * inv_temp)
        delta = tl.where(m == NEG_INF, 0.0, (m - ref) * inv_temp)
        d = (x - ref[:, None]) * inv_temp
        e = tl.exp(d)
        d = tl.where(x == NEG_INF, 0.0, d)
        w = (w + delta * s) * alpha + tl.sum(d * e, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        zy += tl.sum(tl.where(offs_v[None, :] == label[:, None], x, 0.0), axis=1)
        # the last tile of a vocabulary unit: store the unit's state and start
        # the next unit from scratch (a branch in the one tile loop: a nested
        # unit loop, or masked stores on every tile, made ptxas spill 60-580 B)
        if ((v0 + BLOCK_V) % UNIT_V == 0) | (v0 + BLOCK_V >= v_hi):
            out = (v0 // UNIT_V) * N + offs_n
            tl.store(m_ptr + out, m, mask=row_mask)
            tl.store(s_ptr + out, s, mask=row_mask)
            tl.store(w_ptr + out, w, mask=row_mask)
            tl.store(zy_ptr + out, zy, mask=row_mask)
            m = tl.full([BLOCK_N], NEG_INF, ACC)
            s = tl.zeros([BLOCK_N], ACC)
            w = tl.zeros([BLOCK_N], ACC)
            zy = tl.zeros([BLOCK_N], ACC)


@triton.jit
def _linear_logprobs_dlogits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    glp_ptr,
    gh_ptr,
    max_ptr,
    logs_ptr,
    ent_ptr,
    dl_ptr,  # dl: (N, v_hi - v_lo) contiguous
    N,
    H,
    v_lo,
    v_hi,
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    inv_temp,
    scalars_ptr,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALARS_FROM_PTR: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr,  # the interpreter's bf16 cast truncates (see rounded)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """dz = (g_lp * (onehot - p) - g_H * p * (d - E_p[d])) / T on one tile,
    d = (x - max) / T from recomputed logits x, p = exp(d - log s),
    E_p[d] = log s - entropy: exact to the row's spread (z - lse cancels two
    numbers of the logits' offset)."""
    inv_temp = scalar_arg(inv_temp, scalars_ptr, 0, SCALARS_FROM_PTR)
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_hi
    label = tl.load(labels_ptr + offs_n, mask=row_mask, other=ignore_index).to(tl.int64)
    active = row_mask & (label != ignore_index)
    m = tl.load(max_ptr + offs_n, mask=row_mask, other=0.0).to(ACC)
    log_s = tl.load(logs_ptr + offs_n, mask=row_mask, other=0.0).to(ACC)
    mu = log_s - tl.load(ent_ptr + offs_n, mask=row_mask, other=0.0).to(ACC)
    g_lp = tl.where(active, tl.load(glp_ptr + offs_n, mask=row_mask, other=0.0).to(ACC), 0.0)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(active, tl.load(gh_ptr + offs_n, mask=row_mask, other=0.0).to(ACC), 0.0)
    else:
        g_h = tl.zeros([BLOCK_N], ACC)

    logits = _logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        offs_v,
        row_mask,
        v_mask,
        H,
        s_hn,
        s_hk,
        s_wv,
        s_wk,
        HAS_BIAS,
        ACC,
        DOT_PREC,
        UPCAST,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    d = (logits - m[:, None]) * inv_temp
    p = tl.exp(d - log_s[:, None])
    t = tl.where(p > 0, p * (d - mu[:, None]), 0.0)
    g = tl.where(offs_v[None, :] == label[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p - g_h[:, None] * t
    g = tl.where(active[:, None], g * inv_temp, 0.0)  # select, so 0 * inf on padding rows is dropped
    width = v_hi - v_lo
    dst = dl_ptr + offs_n[:, None].to(tl.int64) * width + (offs_v - v_lo)[None, :]
    tl.store(dst, cast_out(g, dl_ptr.dtype.element_ty, ROUND_BY_HAND), mask=row_mask[:, None] & v_mask[None, :])


@triton.jit
def _matmul_acc_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    K,
    N,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C (M, N, fp32) += A (M, K) @ B (K, N): the dH accumulation over vocab
    chunks, in fp32 even for bf16 A and B (torch.mm would round to bf16)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + ks
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * s_am + offs_k[None, :] * s_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None].to(tl.int64) * s_bk + offs_n[None, :] * s_bn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
    c = c_ptr + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :] * s_cn
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(c, tl.load(c, mask=mask, other=0.0) + acc, mask=mask)


def tile_config(N: int, V: int, H: int, interpret: bool, itemsize: int = 2) -> dict:
    """Block sizes by input width (offline sm_90 compile, launch_cases.py).
    bf16 / fp16: 128 x 128 logits tiles (64 KiB fp32 accumulator over 8
    warps), K steps of 64 (32 KiB of operands per stage, 3 stages: 96 KiB).
    fp32 (ieee dot, no tensor cores): 64 x 64 x 16 over 4 warps; the 128 x
    128 x 64 tile spilled 35 KB and 64 x 128 x 32 still 12 B, and with the
    vocabulary-unit stores 64 x 64 x 32 spilled 60-290 B under Triton 3.9. fp64: 32 x 64 x
    32, 2 stages; the bf16 tile needed 256 KiB of shared memory (over sm_90's
    227 KiB) and 64 x 64 x 32 spilled 1.6 KB.
    Interpreter: the smallest tiles tl.dot accepts that still cover the test
    shapes in few programs (numpy cost grows with the program count)."""
    if interpret:
        cfg = dict(BLOCK_N=16 if N <= 16 else 32, BLOCK_V=64, BLOCK_K=32, GROUP=2, num_stages=1)
    elif itemsize == 8:
        cfg = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, GROUP=16, num_stages=2)
    elif itemsize == 4:
        cfg = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=16, GROUP=16, num_stages=3)
    else:
        cfg = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP=16, num_stages=3)
    # 64 fp32 accumulators per thread: 128 x 128 over 8 warps, the others 4
    return dict(cfg, num_warps=num_warps(cfg["BLOCK_N"] * cfg["BLOCK_V"], per_thread=64))


VOCAB_UNITS = 128  # about this many units per row: V / 128 wide, whole tiles


def vocab_unit(V: int, block_v: int) -> tuple[int, int]:
    """(unit width in columns, unit count): a whole number of tiles, from V
    and the tile width alone (never N), so a row's reduction order is fixed."""
    v_tiles = triton.cdiv(max(V, 1), block_v)
    unit_tiles = triton.cdiv(v_tiles, VOCAB_UNITS)
    return unit_tiles * block_v, triton.cdiv(v_tiles, unit_tiles)


def num_splits(N: int, V: int, block_n: int, block_v: int, n_programs_wanted: int, group: int) -> int:
    """Vocabulary splits, each a whole number of units (the last one shorter).
    At least enough for two waves (64 token tiles at N=8192 would leave half
    of an H100's 132 SMs idle) and for one group of `group` token tiles x all
    splits to cover the resident programs; then, up to 4x that, the count
    whose last wave is fullest. One 128 x 128 bf16 program is resident per SM
    (255 registers x 256 threads), so n_programs_wanted / 2 run at once. The
    minimum alone left a third wave of 8 programs at (1937, 3584, 152064)."""
    row_tiles = triton.cdiv(max(N, 1), block_n)
    _, units = vocab_unit(V, block_v)
    want = max(triton.cdiv(n_programs_wanted, row_tiles), triton.cdiv(n_programs_wanted, min(group, row_tiles)))
    resident = max(1, n_programs_wanted // 2)
    lo = max(1, min(units, want))
    # the counts whole units per split give (no empty split)
    counts = sorted({triton.cdiv(units, triton.cdiv(units, s)) for s in range(lo, min(units, 4 * lo) + 1)})
    return max(counts, key=lambda s: (wave_efficiency(row_tiles, V, block_v, s, resident), -s))


def split_width(V: int, block_v: int, splits: int) -> int:
    """Columns per split: whole units, as few as cover V in `splits`."""
    unit_v, units = vocab_unit(V, block_v)
    return triton.cdiv(units, splits) * unit_v


def wave_efficiency(row_tiles: int, V: int, block_v: int, splits: int, resident: int) -> float:
    """Useful tile-steps over the tile-steps the waves take: every program in
    a wave waits for the widest split."""
    waves = triton.cdiv(row_tiles * splits, resident)
    widest = split_width(V, block_v, splits) // block_v
    return row_tiles * triton.cdiv(V, block_v) / (waves * resident * widest)


# ---------------------------------------------------------------- launchers (triton_ops)


def _programs_wanted(device: torch.device) -> int:
    # two waves of programs over the SMs (132 on H100); 4 under the interpreter
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _sum_units(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in one fixed order for every column: a balanced tree of
    elementwise adds over the units, zero-padded to a power of two (x + 0 is
    exact), so a token's merge does not depend on N. torch's own dim-0 sum
    groups the terms by N: the same column of 3..41 terms summed to other
    bits at N = 2..33 than at N = 1 in 994 of 3500 draws (torch 2.13, CPU)."""
    n = x.shape[0]
    width = 1 << max(n - 1, 0).bit_length()
    if width > n:
        x = torch.cat([x, x.new_zeros((width - n, *x.shape[1:]))])
    while x.shape[0] > 1:
        even, odd = x.view(x.shape[0] // 2, 2, *x.shape[1:]).unbind(1)  # rows 0, 2, .. and 1, 3, ..
        x = even + odd
    return x[0]


def _merge_splits(part: torch.Tensor, labels: torch.Tensor, ignore_index: int, V: int, inv_temp: float):
    """(4, units, N) partial m (raw max), s, w (relative to m, of z = x / T),
    x_label -> logprobs, entropy, row max (raw), log s (N,): the outputs of
    rlhf_fast::logprobs_fwd on the same logits."""
    m, s, w, xy = part.unbind(0)
    m_row = m.amax(0)
    ref = torch.where(m_row == float("-inf"), torch.zeros_like(m_row), m_row)
    seen = s > 0  # a split whose logits were all -inf adds nothing
    delta = torch.where(seen, (m - ref) * inv_temp, torch.zeros_like(m))
    scale = torch.where(seen, torch.exp(delta), torch.zeros_like(m))
    active = labels != ignore_index
    s_row = torch.where(active, _sum_units(s * scale), torch.ones_like(m_row))
    w_row = torch.where(active, _sum_units((w + delta * s) * scale), torch.zeros_like(m_row))
    log_s = torch.log(s_row)
    zero = torch.zeros_like(m_row)
    # a row whose lse = max / T + log s overflows (max x / T beyond the
    # dtype) is NaN, as in the log-prob kernels
    nan = torch.full_like(log_s, float("nan"))
    log_s = torch.where(torch.isinf(ref * inv_temp + log_s), nan, log_s)
    # (x_y - max) / T - log s: never z_y - lse, which cancels two large terms
    lp = torch.where(active, (_sum_units(xy) - ref) * inv_temp - log_s, zero)
    # a label outside [0, V) (torch.compile skips the host check) matched
    # no column: NaN, never a silent -lse
    lp = torch.where(active & ((labels < 0) | (labels >= V)), nan, lp)
    ent = torch.where(active, log_s - w_row / s_row, zero)
    return lp, ent, torch.where(active, ref, zero), torch.where(active, log_s, zero)


@torch.library.triton_op("rlhf_fast::linear_logprobs_fwd_triton", mutates_args=())
@launch_on_tensor_device
def linear_logprobs_fwd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0 or not _backend.launches_kernels(hidden):
        return tuple(hidden.new_empty((N,), dtype=acc_dtype(hidden.dtype)) for _ in range(4))
    cfg = tile_config(N, V, H, _backend.triton_interpret(), hidden.element_size())
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    splits = num_splits(N, V, bn, bv, _programs_wanted(hidden.device), cfg["GROUP"])
    unit_v, units = vocab_unit(V, bv)
    part = hidden.new_empty((4, units, N), dtype=acc_dtype(hidden.dtype))
    labels = labels.contiguous()
    scalars, from_ptr = kernel_scalars(hidden.dtype, hidden.device, 1.0 / temperature)
    torch.library.wrap_triton(_linear_logprobs_fwd_kernel)[(triton.cdiv(N, bn) * splits,)](
        hidden, weight, bias if bias is not None else hidden, labels,
        part[0], part[1], part[2], part[3],
        N, V, H, split_width(V, bv, splits), splits, unit_v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, scalars if from_ptr else part, ignore_index,
        HAS_BIAS=bias is not None, ACC=tl_acc(hidden.dtype), DOT_PREC="ieee", UPCAST=_backend.triton_interpret(),
        SCALARS_FROM_PTR=from_ptr, **cfg,
    )  # fmt: skip
    return _merge_splits(part, labels, ignore_index, V, 1.0 / temperature)


@torch.library.triton_op("rlhf_fast::linear_logprobs_bwd_triton", mutates_args=())
@launch_on_tensor_device
def linear_logprobs_bwd_triton(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dW / dH GEMMs in the inputs' dtype with fp32 accumulation, never
    # re-cast by an enclosing torch.autocast
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_logprobs_bwd_triton_impl(
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
        )


def _linear_logprobs_bwd_triton_impl(
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
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    grad_weight = torch.empty((V, H), dtype=weight.dtype, device=weight.device)
    grad_bias = weight.new_empty((V,) if bias is not None else (0,), dtype=acc)
    grad_hidden = torch.zeros((N, H), dtype=acc, device=hidden.device)  # fp32 accumulator over vocab chunks
    if N == 0 or V == 0 or not _backend.launches_kernels(hidden):
        return grad_hidden.to(hidden.dtype), grad_weight.zero_(), grad_bias.zero_().to(weight.dtype)
    cfg = tile_config(N, V, H, _backend.triton_interpret(), hidden.element_size())
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    # vocab chunk: the same scratch as chunk_size tokens x V, in N-row form
    v_chunk = min(V, max(bv, (chunk_size * V // N) // bv * bv))
    scratch = hidden.new_empty((N * v_chunk,))
    labels = labels.contiguous()
    glp = grad_logprobs.to(acc).contiguous()
    has_gh = grad_entropy is not None
    gh = grad_entropy.to(acc).contiguous() if has_gh else glp
    row_max, log_s, entropy = (t.to(acc).contiguous() for t in (row_max, log_s, entropy))
    scalars, from_ptr = kernel_scalars(hidden.dtype, hidden.device, 1.0 / temperature)
    for v_lo in range(0, V, v_chunk):
        v_hi = min(V, v_lo + v_chunk)
        dz = scratch[: N * (v_hi - v_lo)].view(N, v_hi - v_lo)
        torch.library.wrap_triton(_linear_logprobs_dlogits_kernel)[(triton.cdiv(N, bn) * triton.cdiv(v_hi - v_lo, bv),)](
            hidden, weight, bias if bias is not None else hidden, labels,
            glp, gh, row_max, log_s, entropy, dz,
            N, H, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, scalars if from_ptr else glp, ignore_index,
            HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_gh,
            ACC=tl_acc(hidden.dtype), DOT_PREC="ieee", UPCAST=_backend.triton_interpret(),
            SCALARS_FROM_PTR=from_ptr, ROUND_BY_HAND=_backend.triton_interpret(), **cfg,
        )  # fmt: skip
        # dW rows of this chunk: one GEMM over all N tokens, fp32 inside,
        # rounded once; no token-chunk partial sums of dW exist.
        torch.mm(dz.t(), hidden, out=grad_weight[v_lo:v_hi])
        w_c = weight[v_lo:v_hi]
        if hidden.dtype == acc:
            grad_hidden.addmm_(dz, w_c)
        else:  # bf16 / fp16 GEMM with an fp32 accumulate-into epilogue
            mm = tile_config(N, H, v_hi - v_lo, _backend.triton_interpret(), hidden.element_size())
            torch.library.wrap_triton(_matmul_acc_kernel)[
                (triton.cdiv(N, mm["BLOCK_N"]), triton.cdiv(H, mm["BLOCK_V"]))
            ](
                dz, w_c, grad_hidden, N, v_hi - v_lo, H,
                dz.stride(0), dz.stride(1), w_c.stride(0), w_c.stride(1),
                grad_hidden.stride(0), grad_hidden.stride(1),
                ACC=tl_acc(hidden.dtype), DOT_PREC="ieee", UPCAST=_backend.triton_interpret(),
                # K steps of 32: with 64 the fp32 read-add-write epilogue spilled 48 B (sm_90)
                BLOCK_M=mm["BLOCK_N"], BLOCK_N=mm["BLOCK_V"], BLOCK_K=min(mm["BLOCK_K"], 32),
                num_warps=mm["num_warps"], num_stages=mm["num_stages"],
            )  # fmt: skip
        if bias is not None:
            grad_bias[v_lo:v_hi] = dz.sum(0, dtype=acc)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias.to(weight.dtype)
