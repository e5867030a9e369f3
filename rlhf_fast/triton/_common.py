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
