"""Pure ``@triton.jit`` code of the grouped GEMM family (launchers, autograd and configs: grouped_gemm.py).

Shape letters: M rows, N output features, D the reduction (dot) dimension, G groups (K is top-k elsewhere in the
package, never a GEMM dimension here).

Two kernels serve the three GEMMs of an expert layer:

* ``grouped_mm_kernel``: out[rows of g] = a[rows of g] @ b[g].T with b indexed [G, N, D] through explicit
  strides. The forward passes ``w`` ([G, N, D]); the input gradient passes ``w.transpose(1, 2)`` (a stride
  swap, no copy) so that dX[rows of g] = dY[rows of g] @ w[g].
* ``grouped_mm_wgrad_kernel``: dW[g] = dY[rows of g].T @ X[rows of g], a GEMM grouped along its reduction
  dimension. Every (g, n-tile, k-tile) program writes its tile even when group g is empty, so an empty
  group's gradient is an exact zero and never uninitialised memory.

Both can read their row operand (x) through a row index instead of contiguously (GATHER_A / GATHER_X): with
the source rows of a permute, the first expert GEMM reads token rows straight from x [T, H] and the
expert-ordered copy [T*K, H] is never written or kept for the backward.

Both read ``group_sizes`` on the device and derive their tile from it, so one launch covers every group and
the host never waits for the sizes. Calls into ``triton.language``'s own ``@jit`` helpers (tl.sum,
tl.cumsum, tl.cdiv) are kept to the few the schedule needs: under the interpreter each costs ~2 ms per
program, which is what CPU test time is made of.
"""

import triton
import triton.language as tl

from ._jit_common import group_of_tile, swizzled_tile, tile_rows


@triton.jit
def grouped_mm_kernel(
    a_ptr,  # [M, D] rows sorted by group (x in the forward, dY in the input gradient); [T, D] when GATHER_A
    a_rows_ptr,  # [M] int64, read only when GATHER_A: logical row m of the GEMM is a[a_rows[m]]
    b_ptr,  # [G, N, D] through strides (w in the forward, w.transpose(1, 2) in the input gradient)
    out_ptr,  # [M, N] rows sorted by group like a
    group_sizes_ptr,  # [G] int32/int64, rows per group, sum == M
    M, N, D, G,
    stride_am, stride_ad,
    stride_bg, stride_bn, stride_bd,
    stride_om, stride_on,
    BLOCK_G: tl.constexpr,  # next power of two >= G: the whole size vector is loaded at once
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SWIZZLE_M: tl.constexpr,  # m-tiles that share a band of n-tiles, for L2 reuse of a and b
    GATHER_A: tl.constexpr,  # rows of a gathered through a_rows (permute fused into the prologue)
    UPCAST: tl.constexpr,  # interpreter only: its bf16 is raw uint16, so dot fp32 copies instead
    INPUT_PRECISION: tl.constexpr,  # "ieee" / "tf32" for fp32 inputs; ignored for 16-bit inputs
):
    # One launch for every group: the grid is an upper bound on the m-tiles (cdiv(M, BLOCK_M) + G) and each
    # program finds its group on the device (group_of_tile), so the host never reads the sizes.
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, G, BLOCK_M, BLOCK_N, SWIZZLE_M)
    g, row_start, row_end, tile_row = group_of_tile(group_sizes_ptr, pid_m, M, G, BLOCK_G, BLOCK_M)
    if g < G:
        # int64 rows (tile_rows); g * stride_bg passes 2^31 at G*N*D = 256*4096*7168 = 7.5e9.
        offs_m, mask_m, a_rows = tile_rows(a_rows_ptr, tile_row, row_end, M, BLOCK_M, GATHER_A)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_d[None, :] * stride_ad
        b_ptrs = (b_ptr + g.to(tl.int64) * stride_bg + offs_n[None, :].to(tl.int64) * stride_bn
                  + offs_d[:, None] * stride_bd)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = offs_d < D - d0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_D * stride_ad
            b_ptrs += BLOCK_D * stride_bd

        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_mm_wgrad_kernel(
    dy_ptr,  # [M, N] output gradient, rows sorted by group
    x_ptr,  # [M, D] forward input, rows sorted by group; [T, D] when GATHER_X
    x_rows_ptr,  # [M] int64, read only when GATHER_X: logical row m of the forward input is x[x_rows[m]]
    dw_ptr,  # [G, N, D] weight gradient, written in full (zeros for empty groups)
    group_sizes_ptr,  # [G] int32/int64, rows per group, sum == M
    M, N, D, G,
    stride_dym, stride_dyn,
    stride_xm, stride_xd,
    stride_dwg, stride_dwn, stride_dwd,
    BLOCK_G: tl.constexpr,  # next power of two >= G
    BLOCK_M: tl.constexpr,  # rows reduced per step (the reduction dimension here)
    BLOCK_N: tl.constexpr,  # output tile over N
    BLOCK_D: tl.constexpr,  # output tile over D
    GATHER_X: tl.constexpr,  # rows of x gathered through x_rows, as in grouped_mm_kernel's GATHER_A
    UPCAST: tl.constexpr,  # interpreter only, see grouped_mm_kernel
    INPUT_PRECISION: tl.constexpr,
):
    # Grid: G * n-tiles * k-tiles, group slowest, so programs running together share a group's rows in L2.
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_d = (D + BLOCK_D - 1) // BLOCK_D
    g = pid // (num_pid_n * num_pid_d)
    tile = pid % (num_pid_n * num_pid_d)
    pid_n = tile // num_pid_d
    pid_d = tile % num_pid_d

    # Sizes clamped into [0, M] as in grouped_mm_kernel (no int64 wrap-around of their sum), and the group's end
    # clamped to M, so that sizes overrunning M never read past the end of dy or x.
    offs_g = tl.arange(0, BLOCK_G)
    sizes = tl.load(group_sizes_ptr + offs_g, mask=offs_g < G, other=0).to(tl.int64)
    sizes = tl.minimum(tl.maximum(sizes, 0), M)
    row_start = tl.sum(tl.where(offs_g < g, sizes, 0), 0)
    size_g = tl.minimum(tl.maximum(tl.load(group_sizes_ptr + g).to(tl.int64), 0), M)
    row_end = tl.minimum(row_start + size_g, M)

    # int64 columns too: a transposed dy or x (stride M along N or D, which the autograd path can pass)
    # makes n * stride_dyn reach N * M, past 2^31 at M = 300K rows (DeepSeek-V3 gate/up, T >= 37,450).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    offs_r = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # An empty group runs zero iterations and stores the zero accumulator.
    for r0 in range(row_start, row_end, BLOCK_M):
        # int64 rows: row * stride passes 2^31 for DeepSeek-V3 sizes (see grouped_mm_kernel).
        rows = r0 + offs_r.to(tl.int64)
        mask_r = (rows >= 0) & (rows < row_end)  # both bounds: no row outside [0, M) is ever read
        dy_t = tl.load(dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                       mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_M]
        if GATHER_X:
            x_rows = tl.load(x_rows_ptr + rows, mask=mask_r, other=0).to(tl.int64)
        else:
            x_rows = rows
        xt = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dy_t, xt, acc, input_precision=INPUT_PRECISION)

    # g * stride_dwg reaches G*N*D = 7.5e9 for DeepSeek-V3 gate/up: int64.
    dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + offs_n[:, None] * stride_dwn + offs_d[None, :] * stride_dwd
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
