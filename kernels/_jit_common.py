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


@triton.jit
def group_of_tile(group_sizes_ptr, t, M, G, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The device-side group schedule: (g, first row of g, end row of g, first row of virtual m-tile t) for
    group-aligned BLOCK_M-row tiles. Tile t belongs to group g when the tiles of groups < g end at or before t;
    g == G means t is past the last real tile. The grid bound sum_g cdiv(size_g, BLOCK_M) <= cdiv(M, BLOCK_M) + G
    needs no host read of the sizes. Sizes outside [0, M] (rejected on CPU, asserted asynchronously on CUDA)
    are clamped into it, so they never move a pointer and their sum (at most G * M) cannot wrap around int64."""
    offs_g = tl.arange(0, BLOCK_G)
    sizes = tl.load(group_sizes_ptr + offs_g, mask=offs_g < G, other=0).to(tl.int64)
    sizes = tl.minimum(tl.maximum(sizes, 0), M)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    # The running tile count never decreases, so `before` is exactly offs_g < g; lanes past G hold the total
    # and only join `before` when t is past the last real tile, which makes g >= G.
    before = tl.cumsum(tiles, 0) <= t
    g = tl.sum(before.to(tl.int32), 0)
    row_start = tl.sum(tl.where(before, sizes, 0), 0)
    row_end = row_start + tl.sum(tl.where(offs_g == g, sizes, 0), 0)
    tile_row = row_start + (t - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M
    return g, row_start, row_end, tile_row


@triton.jit
def swizzled_tile(pid, M, N, G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIZZLE_M: tl.constexpr):
    """(virtual m-tile, n-tile) of program pid over a grid of (cdiv(M, BLOCK_M) + G) x cdiv(N, BLOCK_N) tiles,
    in bands of SWIZZLE_M m-tiles that walk the n-tiles together (L2 reuse of both operands). Integer division
    instead of tl.cdiv: under the interpreter each triton.language helper call costs ~2 ms per program."""
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M + G
    pids_per_band = SWIZZLE_M * num_pid_n
    first_pid_m = pid // pids_per_band * SWIZZLE_M
    band_m = min(num_pid_m - first_pid_m, SWIZZLE_M)
    return first_pid_m + (pid % pids_per_band) % band_m, (pid % pids_per_band) // band_m


@triton.jit
def tile_rows(rows_ptr, tile_row, row_end, M, BLOCK_M: tl.constexpr, GATHER: tl.constexpr):
    """The BLOCK_M logical rows of an m-tile from tile_row on (int64: row * stride reaches T*K*H = 9.4e8 at
    DeepSeek-V3's T=16384 and passes 2^31 at T >= 37,450), their mask (inside the group and below M, so sizes
    that overrun M never write out of bounds), and the rows of the operand they read: rows_ptr[row] when GATHER
    (the permute fused into the prologue: token rows read straight from x, the expert-ordered copy never
    written; masked lanes read row 0, never used), else the rows themselves."""
    offs_m = tile_row + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = (offs_m < row_end) & (offs_m < M)
    if GATHER:
        src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src = offs_m
    return offs_m, mask_m, src
