"""``@triton.jit`` helpers shared by the kernel families (kept free of any one family's kernels)."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> dtype, round to nearest even (the compiled cvt.rn does this; the interpreter truncates)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # Adding the rounding bias to a NaN with a small payload would carry it into inf: keep it quiet NaN.
        hi = tl.where(x != x, 0x7FC0, rounded)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
