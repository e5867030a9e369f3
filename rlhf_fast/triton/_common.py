"""Small @triton.jit helpers shared by the kernel modules."""
import triton
import triton.language as tl


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
def scalar_arg(value, ptr, i: tl.constexpr, FROM_PTR: tl.constexpr):
    """A float kernel argument, or for fp64 math the exact double the launcher
    stored at ptr[i] (see rlhf_fast.ops._common.kernel_scalars)."""
    if FROM_PTR:
        return tl.load(ptr + i)
    else:
        return value
