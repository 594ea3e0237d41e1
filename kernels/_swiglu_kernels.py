"""Triton kernels behind swiglu (launchers, ops and twin: swiglu.py).

Both read the gate/up GEMM's output ``gu`` [R, 2I] (gate in columns [0, I), up in [I, 2I)) in tiles of
BLOCK_R rows x BLOCK_C columns, upcast to fp32 before any arithmetic, and round once on the store:

* ``_swiglu_fwd_kernel``  h = silu(gate) * up                          -> h [R, I]
* ``_swiglu_bwd_kernel``  d gate = dh * up * silu'(gate), d up = dh * silu(gate)   -> dgu [R, 2I]
  with silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g): the backward recomputes s from the saved gate
  instead of keeping silu(gate) alive, so the op saves only its input.

Row offsets are int64 (R * 2I passes 2**31 at T >= 65,536 tokens for DeepSeek-V3: K=8, 2I=4096).
"""

import triton
import triton.language as tl

from ._jit_common import round_to


@triton.jit
def _load_gate_up(gu_ptr, stride_gu_r, R, I, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (rows, cols, mask, gate fp32, up fp32)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    mask = (rows < R)[:, None] & (cols < I)[None, :]
    gate_ptrs = gu_ptr + rows[:, None] * stride_gu_r + cols[None, :]
    g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(
    gu_ptr,  # [R, 2I] gate | up, unit stride along columns
    h_ptr,  # [R, I] output, unit stride along columns
    R, I,
    stride_gu_r, stride_h_r,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask, g, u = _load_gate_up(gu_ptr, stride_gu_r, R, I, BLOCK_R, BLOCK_C)
    # g / (1 + exp(-g)): torch's own silu formula; exp overflows to inf for g < -88 and gives -0, not NaN.
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + rows[:, None] * stride_h_r + cols[None, :], round_to(h, h_ptr.dtype.element_ty, INTERPRET),
             mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr,  # [R, I] gradient of h, any row stride, unit stride along columns
    gu_ptr,  # [R, 2I] the forward's input
    dgu_ptr,  # [R, 2I] output: d gate | d up, unit stride along columns
    R, I,
    stride_dh_r, stride_gu_r, stride_dgu_r,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask, g, u = _load_gate_up(gu_ptr, stride_gu_r, R, I, BLOCK_R, BLOCK_C)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    d_gate = dh * u * (s * (1.0 + g * (1.0 - s)))
    d_up = dh * (g * s)
    dgate_ptrs = dgu_ptr + rows[:, None] * stride_dgu_r + cols[None, :]
    out_ty = dgu_ptr.dtype.element_ty
    tl.store(dgate_ptrs, round_to(d_gate, out_ty, INTERPRET), mask=mask)
    tl.store(dgate_ptrs + I, round_to(d_up, out_ty, INTERPRET), mask=mask)
