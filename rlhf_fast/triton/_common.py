"""What every Triton family module shares: small @triton.jit helpers, the
constants kernels may read, and the launchers' rules (accumulation dtype,
num_warps, fp64 scalars, device guard).

Constants inside @triton.jit: a GPU compile rejects a plain Python global
read inside a kernel (the interpreter accepts it: tests/test_gpu_semantics.py),
so a kernel reads only the tl.constexpr globals below (NEG_INF, POS_INF,
LOG2E, LN2); kernels use them rather than literals, so every module spells a
constant one way.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)


# ---------------------------------------------------------------- launcher rules


def tl_acc(dtype: torch.dtype):
    """The kernels' ACC constexpr for inputs of `dtype` (rlhf_fast._dtypes.acc_dtype)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def num_warps(elements: int, per_thread: int = 8) -> int:
    """The one num_warps rule: 4 to 8 warps, the fewest that keep each thread
    at <= per_thread elements of a program's block. Streaming kernels (8 per
    thread): 2048 lanes -> 8 warps, 1024 and below -> 4; ptxas caps a thread
    at 255 registers at 4 warps but 128 at 8, so wider blocks take 8 warps
    and narrow ones keep 4 (fp64 rows use narrower blocks for that reason).
    GEMM tiles pass per_thread=64 accumulators: 128 x 128 -> 8, 64 x 64 -> 4."""
    return 8 if elements > 4 * 32 * per_thread else 4


def kernel_scalars(dtype: torch.dtype, device, *values) -> tuple[torch.Tensor | None, bool]:
    """(scalars tensor or None, from_ptr) for a Triton launch.

    A Python float reaches a compiled Triton kernel as fp32 (the interpreter
    keeps it a double), which moves an fp64 op's 1/T or eps by up to 3e-8
    relative. fp64 inputs therefore get their scalars from a float64 tensor
    (one tiny copy per call: fp64 is the dtype of tests and gradcheck, not of
    training); every other dtype passes them as plain arguments, no copy."""
    if dtype == torch.float64:
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device), True
    return None, False


def launch_on_tensor_device(fn):
    """Run a triton_op body under its first tensor's CUDA device: Triton
    launches on the *current* device, so tensors on cuda:1 with cuda:0
    current would be an illegal address (flash-attn's cross-entropy guards
    the same way). No effect on CPU tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return wrapper


def u8_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (same bytes, no copy): kernels load it as 0 / 1."""
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.contiguous()


# ---------------------------------------------------------------- @triton.jit helpers


@triton.jit
def rounded(x, ty: tl.constexpr):
    """x.to(ty), rounding to nearest-even for bf16 by hand: the Triton
    interpreter truncates fp32 -> bf16 (even with fp_downcast_rounding="rtne"),
    which doubles gradient errors and biases them one way. On a GPU the final
    cast of an already-rounded value is exact, so both paths give the same
    bits. NaN stays NaN (the carry would otherwise turn it into -0)."""
    if ty == tl.bfloat16:
        xf = x.to(tl.float32)
        u = xf.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(xf != xf, xf, u.to(tl.float32, bitcast=True)).to(ty)
    else:
        return x.to(ty)


@triton.jit
def cast_out(x, ty: tl.constexpr, BY_HAND: tl.constexpr):
    """The output cast: by hand (rounded) under the interpreter, whose bf16
    cast truncates; on a GPU the native cvt.rn, one instruction per two bf16
    values instead of the five integer ops of rounding by hand."""
    if BY_HAND:
        return rounded(x, ty)
    else:
        return x.to(ty)


# NaN-propagating min / max. A plain tl.maximum / tl.minimum compiles to
# max.f32 / min.f32, which return the non-NaN operand, so a clamp would turn
# a NaN log-ratio into +-20 and a finite loss; these compile to max.NaN /
# min.NaN (compare + select for fp64) and keep NaN, as torch does.
@triton.jit
def max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_nan(x, lo, hi):
    return min_nan(max_nan(x, lo), hi)


@triton.jit
def max_reduce_nan(x, axis: tl.constexpr):
    """tl.max that returns NaN when any element is NaN (tl.max drops NaN on GPUs)."""
    has_nan = tl.sum((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=axis))


@triton.jit
def load_f64(ptr, live):
    """One column of a block of per-chunk partials, in fp64 (0 for rows past B):
    the epilogues fold partials in fp64 whatever the accumulation dtype."""
    return tl.load(ptr, mask=live, other=0.0).to(tl.float64)


@triton.jit
def scalar_arg(value, ptr, i: tl.constexpr, FROM_PTR: tl.constexpr):
    """A float kernel argument, or for fp64 math the exact double the launcher
    stored at ptr[i] (see kernel_scalars)."""
    if FROM_PTR:
        return tl.load(ptr + i)
    else:
        return value
