"""Triton kernels behind permute / unpermute: row moves between token order [T, H] and expert order [R, H].

Three kernels, each one pass over the rows, all driven by row_map [T, K] (row of the expert-ordered tensor
holding token t's j-th choice), so every token-order row is touched exactly once per kernel:

- ``_scatter_rows_kernel``  token row -> its K expert-order rows, optionally scaled by w[t, j]
  (permute forward: pure copy; unpermute backward for d y_sorted when no weight gradient is needed).
- ``_gather_rows_kernel``   K expert-order rows -> one token row, optionally weighted, summed in fp32
  (unpermute forward; permute backward, which is an unweighted unpermute).
- ``_unpermute_bwd_kernel`` the scatter above fused with the weight gradient dw[t, j] = <dy[t], y_sorted[row]>:
  one program per token walks all of H, so the dot products reduce in registers without atomics.

Layout: rows are tiled over H in BLOCK_H-wide power-of-two blocks; the launcher sizes BLOCK_H so that each
thread moves 16 bytes per access (8 bf16 / 4 fp32) when the row stride along H is 1. Tails are masked.
Row offsets are int64: R * H = T * K * H passes 2**31 at T >= 37,450 tokens for DeepSeek-V3 (K=8, H=7168).
A row_map entry outside [0, R) is masked off rather than followed, so a bad map can never read or write out
of bounds (the launcher checks values on CPU and with torch._assert_async on CUDA).

Interpreter note (Triton 3.9, TRITON_INTERPRET=1): bf16 values are held as uint16, so arithmetic happens
only after ``.to(tl.float32)`` (exact), and the interpreter's fp32 -> bf16 cast truncates instead of
rounding; ``_jit_common.round_to`` rounds to nearest even by hand there so CPU results match compiled ones
bit for bit.
"""

import triton
import triton.language as tl

from ._jit_common import round_to as _round_to


@triton.jit
def _scatter_rows_kernel(
    src_ptr,  # [T, H] fp32/fp16/bf16 token-order rows, any strides
    row_map_ptr,  # [T, K] int32/int64: destination row of token t's j-th copy, distinct entries in [0, R)
    w_ptr,  # [T, K] fp32/fp16/bf16 per-copy scale; read only when HAS_W
    dst_ptr,  # [R, H] expert-order rows, row stride stride_dst_r, unit stride along H
    H,
    R,
    stride_src_t,
    stride_src_h,
    stride_map_t,
    stride_map_k,
    stride_w_t,
    stride_w_k,
    stride_dst_r,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # int64 from the start: t * stride and row * stride pass 2**31 once T * K * H does (T >= 37,450 at DSv3).
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_h = tl.max_contiguous(tl.multiple_of(offs_h, BLOCK_H), BLOCK_H)
    mask_h = offs_h < H
    # The token row is read once and written K times.
    vals = tl.load(src_ptr + t * stride_src_t + offs_h.to(tl.int64) * stride_src_h, mask=mask_h)
    for j in tl.static_range(K):
        row = tl.load(row_map_ptr + t * stride_map_t + j * stride_map_k).to(tl.int64)
        # Outside [0, R) the row is masked off entirely (limit 0): a bad map never touches memory.
        h_lim = tl.where((row >= 0) & (row < R), H, 0)
        if HAS_W:
            w = tl.load(w_ptr + t * stride_w_t + j * stride_w_k).to(tl.float32)
            out = _round_to(vals.to(tl.float32) * w, dst_ptr.dtype.element_ty, INTERPRET)
        else:
            out = vals  # a pure move: bit-exact, no rounding
        tl.store(dst_ptr + row * stride_dst_r + offs_h, out, mask=offs_h < h_lim)


@triton.jit
def _gather_rows_kernel(
    src_ptr,  # [R, H] fp32/fp16/bf16 expert-order rows, any strides
    row_map_ptr,  # [T, K] int32/int64: source row of token t's j-th choice, in [0, R)
    w_ptr,  # [T, K] fp32/fp16/bf16 combine weights; read only when HAS_W
    dst_ptr,  # [T, H] token-order output, row stride stride_dst_t, unit stride along H
    H,
    R,
    stride_src_r,
    stride_src_h,
    stride_map_t,
    stride_map_k,
    stride_w_t,
    stride_w_k,
    stride_dst_t,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # int64 from the start: row * stride passes 2**31 once T * K * H does (T >= 37,450 at DSv3).
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_h = tl.max_contiguous(tl.multiple_of(offs_h, BLOCK_H), BLOCK_H)
    mask_h = offs_h < H
    offs_src_h = offs_h.to(tl.int64) * stride_src_h
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    # K rows read once each, summed in fp32 (upcast before any arithmetic: see the interpreter note).
    for j in tl.static_range(K):
        row = tl.load(row_map_ptr + t * stride_map_t + j * stride_map_k).to(tl.int64)
        # Outside [0, R) the row is masked off entirely (limit 0): a bad map never touches memory.
        h_lim = tl.where((row >= 0) & (row < R), H, 0)
        vals = tl.load(src_ptr + row * stride_src_r + offs_src_h, mask=offs_h < h_lim, other=0.0)
        vals = vals.to(tl.float32)
        if HAS_W:
            vals = vals * tl.load(w_ptr + t * stride_w_t + j * stride_w_k).to(tl.float32)
        acc += vals
    tl.store(dst_ptr + t * stride_dst_t + offs_h, _round_to(acc, dst_ptr.dtype.element_ty, INTERPRET), mask=mask_h)


@triton.jit
def _unpermute_bwd_kernel(
    dy_ptr,  # [T, H] fp32/fp16/bf16 gradient of unpermute's output, any strides (expanded grads have 0)
    y_sorted_ptr,  # [R, H] unpermute's input rows, any strides
    row_map_ptr,  # [T, K] int32/int64, distinct entries in [0, R)
    w_ptr,  # [T, K] fp32/fp16/bf16 combine weights
    dys_ptr,  # [R, H] d y_sorted, unit stride along H; written only when NEED_DYS
    dw_ptr,  # [T, K] d topk_weights, in the weights' dtype
    H,
    R,
    stride_dy_t,
    stride_dy_h,
    stride_ys_r,
    stride_ys_h,
    stride_map_t,
    stride_map_k,
    stride_w_t,
    stride_w_k,
    stride_dys_r,
    stride_dw_t,
    stride_dw_k,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NEED_DYS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program per token walking all of H, so dw[t, :] reduces in registers (no atomics, no second pass).
    t = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    dw_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        offs_h = tl.max_contiguous(tl.multiple_of(offs_h, BLOCK_H), BLOCK_H)
        mask_h = offs_h < H
        # dy[t] block read once, used for all K rows.
        dy = tl.load(dy_ptr + t * stride_dy_t + offs_h.to(tl.int64) * stride_dy_h, mask=mask_h, other=0.0)
        dy = dy.to(tl.float32)
        for j in tl.static_range(K):
            # int64: row * stride passes 2**31 once T * K * H does (T >= 37,450 at DSv3).
            row = tl.load(row_map_ptr + t * stride_map_t + j * stride_map_k).to(tl.int64)
            h_lim = tl.where((row >= 0) & (row < R), H, 0)  # masked off outside [0, R)
            if NEED_DYS:
                w = tl.load(w_ptr + t * stride_w_t + j * stride_w_k).to(tl.float32)
                dys = _round_to(dy * w, dys_ptr.dtype.element_ty, INTERPRET)
                tl.store(dys_ptr + row * stride_dys_r + offs_h, dys, mask=offs_h < h_lim)
            ys = tl.load(y_sorted_ptr + row * stride_ys_r + offs_h.to(tl.int64) * stride_ys_h,
                         mask=offs_h < h_lim, other=0.0)
            dw_acc = tl.where(offs_k == j, dw_acc + tl.sum(dy * ys.to(tl.float32), axis=0), dw_acc)
    dw = _round_to(dw_acc, dw_ptr.dtype.element_ty, INTERPRET)
    tl.store(dw_ptr + t * stride_dw_t + offs_k * stride_dw_k, dw, mask=offs_k < K)
