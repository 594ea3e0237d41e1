"""Pure ``@triton.jit`` code of the FP8 family (launchers, ops, autograd, configs and twins: fp8.py).

DeepSeek-V3's fine-grained scaling (report sec. 3.3): E4M3 values with one fp32 scale per 128-element tile,
x = x_fp8 * scale, scale = tile amax / 448 (1 for an all-zero tile, so zeros stay zeros; NaN when the tile
holds a NaN, inf when it holds an inf, so a non-finite input never comes out finite). Tiles:

* rows (``quantize_rows_kernel``): 1 x 128 along the reduction dimension D of the GEMM that reads them
  (activations for the forward, dY along N for the input gradient);
* blocks (``quantize_blocks_kernel``): 128 x 128 of a weight [G, N, D]. A block is the same set of elements
  read transposed, so the input gradient uses the transposed bytes (written in the same pass, K-major for
  wgmma) with the transposed scales: nothing is quantized twice;
* columns (``quantize_cols_kernel``): 128 rows x 1 column, for the weight gradient, which reduces over rows.
  Tiles are group-aligned: they restart at each group's first row, so no tile straddles two groups and
  the GEMM applies one scale per (column, 128-row step). Tile t of group g covers rows
  row_start(g) + 128 * (t - tile_start(g)) onward; there are at most cdiv(M, 128) + G tiles. The output is
  stored transposed and group-padded: [C, 128 * TILES], tile t in columns [128 t, 128 t + 128), zeros
  past its group's end. fp8 wgmma reads both operands K-major only, and a group's rows start anywhere, so
  without the padding the weight gradient's K-contiguous loads would be unaligned (sm_90a: no cp.async,
  registers spilled).

GEMMs (``grouped_mm_fp8_kernel`` for the forward and input gradient, ``grouped_mm_fp8_wgrad_kernel``) take
the group schedule of the bf16 kernels (_grouped_gemm_kernels.py: sizes read on the device, one launch, empty
groups, int64 offsets) and step the reduction 128 at a time: each step is a fresh tl.dot whose fp32 result
is scaled and added to the fp32 accumulator. That is the report's promotion to fp32 every 128 elements:
Triton's default for fp8 dots on sm_90 would otherwise keep the whole reduction in wgmma's accumulator,
whose fp8 path keeps ~14 bits (report sec. 3.3.2).

Interpreter notes (Triton 3.9, TRITON_INTERPRET=1): its fp32 -> fp8 cast rounds ties away from even and
turns NaN into a number, and its fp8 -> fp32 cast reads the NaN code as 480; ``to_e4m3`` / ``from_e4m3``
do both on the bits there (INTERPRET), exactly as the compiled cvt.rn.satfinite and torch's cast do.
Arithmetic on bf16 happens only after ``.to(tl.float32)``, as everywhere in this package.
"""

import triton
import triton.language as tl

from ._jit_common import group_of_tile, swizzled_tile, tile_rows
from ._jit_common import round_to as _round_to

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def to_e4m3(x, INTERPRET: tl.constexpr):
    """fp32 -> float8_e4m3fn, round to nearest even; finite values past 448 and inf saturate to +-448, NaN
    stays NaN (what the compiled cvt.rn.satfinite and torch's cast do; the scales keep |x| <= 448 anyway)."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = (bits & 0x7FFFFFFF).to(tl.int32)
        # Normal range (|x| >= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even; the carry runs into
        # the exponent, and 960 = (127 - 7) << 3 re-biases it.
        normal = tl.minimum(((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - 960, 0x7E)
        # Subnormal range: multiples of 2^-9; adding 2^23 in fp32 rounds to an integer, ties to even.
        small = tl.where(mag < 0x3C800000, tl.abs(x), 0.0)
        sub = ((small * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
        code = tl.where(mag < 0x3C800000, sub, normal)
        code = tl.where(mag > 0x7F800000, 0x7F, code)
        return (code.to(tl.uint32) | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def from_e4m3(q, INTERPRET: tl.constexpr):
    """float8_e4m3fn -> fp32, exact (the interpreter's own cast reads the NaN code 0x7F as 480)."""
    if INTERPRET:
        bits = q.to(tl.uint8, bitcast=True).to(tl.uint32)
        e = (bits >> 3) & 0xF
        m = bits & 0x7
        sub = (m.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m * 2^-9
        mag = tl.where(e == 0, sub, ((e + 120) << 23) | (m << 20))
        mag = tl.where((bits & 0x7F) == 0x7F, 0x7FC00000, mag)
        return (mag | ((bits & 0x80) << 24)).to(tl.float32, bitcast=True)
    else:
        return q.to(tl.float32)


@triton.jit
def _scale(amax, nan_count):
    """Tile scale from its amax and its NaN count: amax / 448 (correctly rounded, like torch's division),
    NaN if the tile holds one (tl.max drops NaN when compiled), 1 where amax / 448 is 0."""
    s = tl.math.div_rn(amax, 448.0)
    s = tl.where(nan_count > 0, float("nan"), s)
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def quantize_rows_kernel(
    x_ptr,  # [M, D] fp32/fp16/bf16, any strides
    q_ptr,  # [M, D] float8_e4m3fn, x / scale, unit stride along D
    s_ptr,  # [M, cdiv(D, BLOCK_D)] fp32 scale of each (row, BLOCK_D columns) tile, unit stride along D
    M, D,
    stride_xm, stride_xd,
    stride_qm, stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # the tile width (128)
    INTERPRET: tl.constexpr,
):
    # int64: m * stride reaches T*K*H = 9.4e8 at DeepSeek-V3's T=16384 and passes 2^31 at T >= 37,450; a
    # transposed x makes d * stride_xd reach D * M.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    # Masked elements read 0: they cannot raise a tile's amax.
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale(tl.max(tl.abs(x), 1), tl.sum((x != x).to(tl.int32), 1))
    q = to_e4m3(tl.math.div_rn(x, s[:, None]), INTERPRET)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_d, s, mask=mask_m)


@triton.jit
def quantize_blocks_kernel(
    w_ptr,  # [G, N, D] fp32/fp16/bf16, any strides
    q_ptr,  # [G, N, D] float8_e4m3fn, contiguous
    qt_ptr,  # [G, D, N] float8_e4m3fn, contiguous: q transposed (written when WRITE_T), dgrad's K-major operand
    s_ptr,  # [G, cdiv(N, BLOCK), cdiv(D, BLOCK)] fp32, contiguous: one scale per BLOCK x BLOCK block
    N, D,
    stride_wg, stride_wn, stride_wd,
    BLOCK: tl.constexpr,  # 128
    WRITE_T: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program per block, in the scale tensor's (g, n-block, d-block) order, so s_ptr + pid is its scale.
    pid = tl.program_id(0)
    blocks_n = (N + BLOCK - 1) // BLOCK
    blocks_d = (D + BLOCK - 1) // BLOCK
    g = (pid // (blocks_n * blocks_d)).to(tl.int64)  # g * N * D reaches 7.5e9 for DeepSeek-V3 gate/up
    offs_n = (pid // blocks_d) % blocks_n * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    offs_d = pid % blocks_d * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    w = tl.load(w_ptr + g * stride_wg + offs_n[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask,
                other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), 1), 0), tl.sum(tl.sum((w != w).to(tl.int32), 1), 0))
    q = to_e4m3(tl.math.div_rn(w, s), INTERPRET)
    tl.store(q_ptr + g * N * D + offs_n[:, None] * D + offs_d[None, :], q, mask=mask)
    if WRITE_T:
        tl.store(qt_ptr + g * N * D + offs_d[None, :] * N + offs_n[:, None], q, mask=mask)
    tl.store(s_ptr + pid, s)


@triton.jit
def _load_rows(x_ptr, x_scale_ptr, rows_ptr, first_row, row_end, pid_c, offs_c, mask_c, stride_xm, stride_xc,
               stride_xsm, stride_xsc, CHUNK_M: tl.constexpr, SRC_SCALED: tl.constexpr, GATHER: tl.constexpr,
               INTERPRET: tl.constexpr):
    """CHUNK_M logical rows from first_row on as fp32 [CHUNK_M, BLOCK_C] (0 past row_end), with their row
    indices and mask. int64 rows: row * stride passes 2^31 at DeepSeek-V3 sizes (see quantize_rows_kernel)."""
    offs_m = first_row + tl.arange(0, CHUNK_M).to(tl.int64)
    mask_m = offs_m < row_end
    mask = mask_m[:, None] & mask_c[None, :]
    if GATHER:
        src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src = offs_m
    x = tl.load(x_ptr + src[:, None] * stride_xm + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    if SRC_SCALED:
        # The e4m3 value times its row scale: exactly what the forward GEMM multiplied. The program's BLOCK_C
        # columns are one row tile of the source, so one scale per row (a [rows, BLOCK_C] tile of scales
        # spilled on sm_90a with Triton 3.6).
        xs = tl.load(x_scale_ptr + src * stride_xsm + pid_c * stride_xsc, mask=mask_m, other=0.0)
        x = from_e4m3(x, INTERPRET) * xs[:, None]
    else:
        x = x.to(tl.float32)
    return x, offs_m, mask_m


@triton.jit
def quantize_cols_kernel(
    x_ptr,  # [S, C] source: fp32/fp16/bf16, or float8_e4m3fn with row scales (SRC_SCALED); S = M unless GATHER
    x_scale_ptr,  # [S, cdiv(C, BLOCK_C)] fp32 1 x BLOCK_C row scales of an e4m3 source, read when SRC_SCALED
    rows_ptr,  # [M] int64, read when GATHER: logical row m is x[rows[m]]
    qt_ptr,  # [C, BLOCK_M * TILES] float8_e4m3fn: tile t in columns [BLOCK_M t, BLOCK_M (t + 1)), zero-padded
    st_ptr,  # [TILES, C] fp32 scale of each (tile, column), unit stride along C; 1 for tiles past the last
    qr_ptr,  # [M, C] float8_e4m3fn row-quantized copy (1 x BLOCK_C tiles), unit stride along C; WRITE_ROWS
    sr_ptr,  # [M, cdiv(C, BLOCK_C)] fp32 its scales, unit stride along C; WRITE_ROWS
    group_sizes_ptr,  # [G] int32/int64 rows per group, sum == M
    M, C, G,
    stride_xm, stride_xc, stride_xsm, stride_xsc,
    stride_qtc, stride_st, stride_qrm, stride_srm,
    BLOCK_G: tl.constexpr,  # next power of two >= G
    BLOCK_M: tl.constexpr,  # rows of a column tile (128)
    BLOCK_C: tl.constexpr,  # columns per program; the row tiles' width when WRITE_ROWS (128)
    CHUNK_M: tl.constexpr,  # rows held in registers at a time (a whole 128 x 128 fp32 tile spills)
    SRC_SCALED: tl.constexpr,  # dequantize an e4m3 source first (the forward's saved activation)
    GATHER: tl.constexpr,  # rows read through rows_ptr (the gather of the first expert GEMM)
    WRITE_ROWS: tl.constexpr,  # also write the 1 x BLOCK_C row quantization (dY: dgrad and wgrad in one pass)
    INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(M, BLOCK_M) + G virtual tiles) x column blocks. Each program writes its tile's BLOCK_M
    # columns of qt in full (zeros past the group's last row, all zeros past the last tile), so the weight
    # gradient reads aligned 128-byte rows with no mask along the reduction.
    t = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    g, row_start, row_end, tile_row = group_of_tile(group_sizes_ptr, t, M, G, BLOCK_G, BLOCK_M)
    row_end = tl.where(g < G, tl.minimum(row_end, M), 0)  # past the last tile: no rows, scale 1, zeros
    # Pass 1: the column amax over the tile (and the row quantization, which needs only the row itself).
    amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
    nans = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for r0 in tl.static_range(0, BLOCK_M, CHUNK_M):
        x, offs_m, mask_m = _load_rows(x_ptr, x_scale_ptr, rows_ptr, tile_row + r0, row_end, pid_c, offs_c,
                                       mask_c, stride_xm, stride_xc, stride_xsm, stride_xsc, CHUNK_M,
                                       SRC_SCALED, GATHER, INTERPRET)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
        nans += tl.sum((x != x).to(tl.int32), 0)
        if WRITE_ROWS:
            sr = _scale(tl.max(tl.abs(x), 1), tl.sum((x != x).to(tl.int32), 1))
            tl.store(qr_ptr + offs_m[:, None] * stride_qrm + offs_c[None, :],
                     to_e4m3(tl.math.div_rn(x, sr[:, None]), INTERPRET), mask=mask_m[:, None] & mask_c[None, :])
            tl.store(sr_ptr + offs_m * stride_srm + pid_c, sr, mask=mask_m)
    s = _scale(amax, nans)
    tl.store(st_ptr + t * stride_st + offs_c, s, mask=mask_c)
    # Pass 2: quantize with the column scales (the rows come back from L2), stored transposed.
    for r0 in tl.static_range(0, BLOCK_M, CHUNK_M):
        x, offs_m, mask_m = _load_rows(x_ptr, x_scale_ptr, rows_ptr, tile_row + r0, row_end, pid_c, offs_c,
                                       mask_c, stride_xm, stride_xc, stride_xsm, stride_xsc, CHUNK_M,
                                       SRC_SCALED, GATHER, INTERPRET)
        cols = t.to(tl.int64) * BLOCK_M + r0 + tl.arange(0, CHUNK_M)
        # Padding rows are exact zeros, even in a tile whose scale is NaN or inf.
        v = tl.where(mask_m[:, None], tl.math.div_rn(x, s[None, :]), 0.0)
        tl.store(qt_ptr + offs_c[None, :] * stride_qtc + cols[:, None], to_e4m3(v, INTERPRET), mask=mask_c[None, :])


@triton.jit
def grouped_mm_fp8_kernel(
    a_ptr,  # [M, D] float8_e4m3fn rows sorted by group (x, or dY for the input gradient); [S, D] when GATHER_A
    a_scale_ptr,  # [M, cdiv(D, BLOCK_D)] fp32 1 x 128 row scales of a ([S, ...] when GATHER_A)
    a_rows_ptr,  # [M] int64, read only when GATHER_A: logical row m of the GEMM is a[a_rows[m]]
    b_ptr,  # [G, N, D] float8_e4m3fn through strides (w; for the input gradient w's transposed copy)
    b_scale_ptr,  # [G, cdiv(N, 128), cdiv(D, 128)] fp32 128 x 128 block scales through strides
    out_ptr,  # [M, N] bf16/fp32, rows sorted by group like a
    group_sizes_ptr,  # [G] int32/int64 rows per group, sum == M
    M, N, D, G,
    stride_am, stride_ad, stride_asm, stride_asd,
    stride_bg, stride_bn, stride_bd, stride_bsg, stride_bsn, stride_bsd,
    stride_om, stride_on,
    BLOCK_G: tl.constexpr,  # next power of two >= G
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides 128, so a tile reads one weight block row per step: one scale
    BLOCK_D: tl.constexpr,  # the scale block (128): one promotion step
    SWIZZLE_M: tl.constexpr,  # m-tiles that share a band of n-tiles, for L2 reuse
    GATHER_A: tl.constexpr,  # rows of a (and of its scales) gathered through a_rows
    UPCAST: tl.constexpr,  # interpreter: decode e4m3 to fp32 by hand and dot in fp32 (exact products)
    INTERPRET: tl.constexpr,
):
    # The schedule of grouped_mm_kernel: a grid over an upper bound of the m-tiles, cdiv(M, BLOCK_M) + G.
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, G, BLOCK_M, BLOCK_N, SWIZZLE_M)
    g, row_start, row_end, tile_row = group_of_tile(group_sizes_ptr, pid_m, M, G, BLOCK_G, BLOCK_M)
    if g < G:
        # int64 rows and group offsets: see tile_rows and quantize_blocks_kernel.
        offs_m, mask_m, a_rows = tile_rows(a_rows_ptr, tile_row, row_end, M, BLOCK_M, GATHER_A)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_d[None, :] * stride_ad
        b_ptrs = (b_ptr + g.to(tl.int64) * stride_bg + offs_n[None, :].to(tl.int64) * stride_bn
                  + offs_d[:, None] * stride_bd)
        as_ptrs = a_scale_ptr + a_rows * stride_asm
        bs_ptr = b_scale_ptr + g.to(tl.int64) * stride_bsg + (pid_n * BLOCK_N // 128) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = offs_d < D - d0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            sa = tl.load(as_ptrs, mask=mask_m, other=0.0)
            sb = tl.load(bs_ptr)
            if UPCAST:
                part = tl.dot(from_e4m3(a, INTERPRET), from_e4m3(b, INTERPRET), input_precision="ieee")
            else:
                part = tl.dot(a, b)
            # Promotion: this step's products summed in fp32 and scaled once (the twin multiplies in the
            # same order: the two scales first).
            acc += part * (sa * sb)[:, None]
            a_ptrs += BLOCK_D * stride_ad
            b_ptrs += BLOCK_D * stride_bd
            as_ptrs += stride_asd
            bs_ptr += stride_bsd
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, _round_to(acc, out_ptr.dtype.element_ty, INTERPRET),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_mm_fp8_wgrad_kernel(
    dyt_ptr,  # [N, BLOCK_M * TILES] float8_e4m3fn dY in column tiles, transposed and group-padded (quantize_cols)
    dyt_scale_ptr,  # [TILES, N] fp32 scale per (tile, column of dY)
    xt_ptr,  # [D, BLOCK_M * TILES] float8_e4m3fn X in the same tiles
    xt_scale_ptr,  # [TILES, D] fp32
    dw_ptr,  # [G, N, D] fp32/bf16 weight gradient, written in full (zeros for empty groups)
    group_sizes_ptr,  # [G] int32/int64 rows per group
    N, D, G, TILES,
    stride_dyn, stride_dys, stride_xd, stride_xs,
    stride_dwg, stride_dwn, stride_dwd,
    BLOCK_G: tl.constexpr,  # next power of two >= G
    BLOCK_M: tl.constexpr,  # rows per reduction step = the column tile (128)
    BLOCK_N: tl.constexpr,  # output tile over N
    BLOCK_D: tl.constexpr,  # output tile over D
    UPCAST: tl.constexpr,  # interpreter, see grouped_mm_fp8_kernel
    INTERPRET: tl.constexpr,
):
    # Grid: G * n-tiles * d-tiles, group slowest (programs running together share the group's rows in L2).
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_d = (D + BLOCK_D - 1) // BLOCK_D
    g = pid // (num_pid_n * num_pid_d)
    pid_n = pid % (num_pid_n * num_pid_d) // num_pid_d
    pid_d = pid % num_pid_d

    offs_g = tl.arange(0, BLOCK_G)
    tiles = (tl.maximum(tl.load(group_sizes_ptr + offs_g, mask=offs_g < G, other=0).to(tl.int64), 0)
             + BLOCK_M - 1) // BLOCK_M
    tile_start = tl.sum(tl.where(offs_g < g, tiles, 0), 0)
    # Never past TILES, whatever the sizes say (they are checked against the operands before the launch).
    tile_end = tl.minimum(tile_start + tl.sum(tl.where(offs_g == g, tiles, 0), 0), TILES)

    # int64 columns: n * stride_dyn is N * (M + 128 G), past 2^31 at M = 300K rows (T >= 37,450, DeepSeek-V3).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    offs_r = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # One step per tile of the group (an empty group runs none and stores zeros). Tiles are 128-aligned and
    # zero-padded, so the reduction needs no mask: every load is whole 128-byte rows.
    for t in range(tile_start, tile_end):
        cols = t * BLOCK_M + offs_r
        a = tl.load(dyt_ptr + offs_n[:, None] * stride_dyn + cols[None, :], mask=mask_n[:, None],
                    other=0.0)  # [BLOCK_N, BLOCK_M], K-major
        b = tl.load(xt_ptr + offs_d[None, :] * stride_xd + cols[:, None], mask=mask_d[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_D], K-major
        sa = tl.load(dyt_scale_ptr + t * stride_dys + offs_n, mask=mask_n, other=0.0)
        sb = tl.load(xt_scale_ptr + t * stride_xs + offs_d, mask=mask_d, other=0.0)
        if UPCAST:
            part = tl.dot(from_e4m3(a, INTERPRET), from_e4m3(b, INTERPRET), input_precision="ieee")
        else:
            part = tl.dot(a, b)
        acc += part * sa[:, None] * sb[None, :]

    # g * stride_dwg reaches G*N*D = 7.5e9 for DeepSeek-V3 gate/up: int64.
    dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + offs_n[:, None] * stride_dwn + offs_d[None, :] * stride_dwd
    tl.store(dw_ptrs, _round_to(acc, dw_ptr.dtype.element_ty, INTERPRET), mask=mask_n[:, None] & mask_d[None, :])
