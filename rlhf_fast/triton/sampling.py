"""Triton sampler: one program per row, no sort, no host synchronisation.

Plain sampling (FILTERED=False) is one sweep: the online max / sum of the
log-prob kernel and the exponential race (argmax z + Gumbel(seed, token))
in the same pass, so the logits are read once: B*V*2 bytes for bf16, 78 MB
at (256, 151936).
With top-k / top-p / min-p (FILTERED=True) the thresholds are found without
sorting, by bisection on the fp32 order key of z (int32, monotone in z): the
largest key whose count (top-k) or mass (top-p) of tokens above it still
meets the target. Each halving is one sweep over the row; at most 32 per
filter, and a row whose filter is off runs none. Then one more sweep does
the race over the kept tokens and their mass. Noise and semantics are those
of rlhf_fast/reference/_sampling.py.

The launcher at the end is the triton_op rlhf_fast::sample_fwd_triton; its
fake is in rlhf_fast/ops/_sampling.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from ._common import LOG2E, NEG_INF, launch_on_tensor_device
from .logprobs import STRIP, row_lse, row_lse_finish, row_lse_step
from .logprobs import row_config as _logprobs_row_config


@triton.jit
def _mix32(x):
    # lowbias32 on uint32 lanes; multiplications wrap mod 2^32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel(seed_lo, seed_hi, offs):
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ seed_lo) + seed_hi) >> 9
    u = (bits.to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    return -tl.log(-tl.log(u))


@triton.jit
def _float_key(x):
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _key_float(k):
    k = k.to(tl.int32)
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _count_ge(row_ptr, V, inv_t, thr, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_t
        acc += (z >= thr).to(tl.int32)
    return tl.sum(acc, axis=0)


@triton.jit
def _mass_ge(row_ptr, V, inv_t, mz, thr, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_t
        acc += tl.where(z >= thr, tl.exp(z - mz), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _sample_fwd_kernel(
    logits_ptr, seeds_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
    tok_ptr, lp_ptr, plp_ptr,
    V, stride_row,
    FILTERED: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STRIP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(temp_ptr + row)  # float64: 1/T rounded once, as the log-prob op
    greedy = t == 0.0
    stochastic = t != 0.0
    inv_t = (1.0 / tl.where(greedy, 1.0, t)).to(tl.float32)
    seed = tl.load(seeds_ptr + row)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)

    # sweep 1: the log-prob kernel's strips and row_lse_step (bit-identical
    # lse) and, when nothing is truncated, the race in the same pass
    offs2 = tl.arange(0, BLOCK_V // STRIP)[:, None] * STRIP + tl.arange(0, STRIP)[None, :]
    m = tl.full([BLOCK_V // STRIP], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_V // STRIP], tl.float32)
    best = tl.full([BLOCK_V // STRIP, STRIP], NEG_INF, tl.float32)
    best_j = tl.full([BLOCK_V // STRIP, STRIP], 0, tl.int32)
    c = inv_t * LOG2E
    for start in range(0, V, BLOCK_V):
        offs = start + offs2
        x = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        m, s, _ = row_lse_step(x, m, s, s, c, False)
        if not FILTERED:
            z = x * inv_t
            key = tl.where(greedy, z, z + _gumbel(seed_lo, seed_hi, offs))
            upd = (key > best) & (offs < V)
            best = tl.where(upd, key, best)
            best_j = tl.where(upd, offs, best_j)
    m_raw, s_row, _ = row_lse_finish(m, s, s, c, False)
    lse, _ = row_lse(m_raw, s_row, inv_t)
    mz = m_raw * inv_t
    kept_mass = s_row

    if FILTERED:
        k = tl.load(topk_ptr + row)
        p = tl.load(topp_ptr + row).to(tl.float32)
        mp = tl.load(minp_ptr + row).to(tl.float32)
        top = _float_key(mz).to(tl.int64)
        # top-k: largest key with count(z >= key) >= k
        lo = tl.full([], -2139095041, tl.int64)  # _float_key(-inf): 0xFF800000 ^ 0x7FFFFFFF as int32
        hi = tl.where((k > 0) & (k < V) & stochastic, top, lo)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            ok = _count_ge(row_ptr, V, inv_t, _key_float(mid), BLOCK_V) >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        k_on = (k > 0) & (k < V)
        tau_k = tl.where(k_on, _key_float(lo), NEG_INF)
        mass_k = tl.where(k_on, _mass_ge(row_ptr, V, inv_t, mz, tau_k, BLOCK_V), s_row)
        # top-p: largest key >= tau_k whose mass reaches top_p * mass_k
        target = p * mass_k
        lo = _float_key(tau_k).to(tl.int64)
        hi = tl.where((p < 1.0) & stochastic, top, lo)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            ok = _mass_ge(row_ptr, V, inv_t, mz, _key_float(mid), BLOCK_V) >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        tau_p = tl.where(p < 1.0, _key_float(lo), NEG_INF)
        tau_min = tl.where(mp > 0.0, mz + tl.log(tl.where(mp > 0.0, mp, 1.0)), NEG_INF)
        thr = tl.minimum(tl.maximum(tl.maximum(tau_k, tau_p), tau_min), mz)
        thr = tl.where(greedy, NEG_INF, thr)
        # sweep: race over the kept tokens and their mass
        acc = tl.zeros([BLOCK_V // STRIP, STRIP], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + offs2
            z = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32) * inv_t
            kept = (z >= thr) & (offs < V)
            acc += tl.where(kept, tl.exp(z - mz), 0.0)
            key = tl.where(greedy, z, z + _gumbel(seed_lo, seed_hi, offs))
            upd = (key > best) & kept
            best = tl.where(upd, key, best)
            best_j = tl.where(upd, offs, best_j)
        kept_mass = tl.sum(tl.sum(acc, axis=1), axis=0)

    # first index of the best key across lanes (each lane kept its first)
    top_key = tl.max(tl.max(best, axis=1), axis=0)
    tok = tl.min(tl.min(tl.where(best == top_key, best_j, V), axis=1), axis=0)
    tok = tl.where(tok < V, tok, 0)
    z_tok = tl.load(row_ptr + tok).to(tl.float32) * inv_t
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, z_tok - lse)
    tl.store(plp_ptr + row, tl.where(greedy, 0.0, z_tok - (mz + tl.log(kept_mass))))


def row_config(V: int) -> dict:
    # The log-prob kernel's tile width and warps (fp32 states), so both reduce
    # the row in the same lane order and their log-sum-exp agree bit for bit.
    return dict(_logprobs_row_config(V), STRIP=STRIP)


# ---------------------------------------------------------------- launcher (triton_op)


@torch.library.triton_op("rlhf_fast::sample_fwd_triton", mutates_args=())
@launch_on_tensor_device
def sample_fwd_triton(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    filtered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, V); per-row parameters (B,) (ops/_sampling.py row_params).
    Returns tokens (B,) int64, raw and processed log-probs (B,) fp32."""
    B, V = logits.shape
    tokens = logits.new_empty((B,), dtype=torch.int64)
    lp, plp = (logits.new_empty((B,), dtype=torch.float32) for _ in range(2))
    if B > 0 and _backend.launches_kernels(logits):
        if V > 1 and logits.stride(1) != 1:
            logits = logits.contiguous()
        torch.library.wrap_triton(_sample_fwd_kernel)[(B,)](
            logits, seeds.contiguous(), temperature.contiguous(), top_k.contiguous(),
            top_p.contiguous(), min_p.contiguous(), tokens, lp, plp,
            V, logits.stride(0),
            FILTERED=filtered, **row_config(V),
        )  # fmt: skip
    return tokens, lp, plp
