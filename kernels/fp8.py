"""FP8 (E4M3) expert GEMMs with DeepSeek-V3's fine-grained scaling: quantizers, grouped GEMMs for the forward,
input gradient and weight gradient, the autograd of one expert linear layer, and their PyTorch twins.

Convention (report sec. 3.3): x = x_fp8 * scale, scale fp32 = tile amax / 448 with no power-of-two
rounding; an all-zero tile gets scale 1 (zeros stay zeros, never 0/0); a tile holding NaN gets scale NaN and
one holding inf scale inf, so non-finite input makes the GEMM output non-finite. Scale shapes use ceil
divisions, so D or N need not be multiples of 128. The GEMM reduction dimension is D (K is top-k here):

    x_fp8, x_scale = quantize_fp8_rows(x, 128)      # x [M, D] -> x_scale [M, cdiv(D, 128)]   (1 x 128)
    w_fp8, w_scale = quantize_fp8_blocks(w, 128)    # w [G, N, D] -> [G, cdiv(N, 128), cdiv(D, 128)]
    y = grouped_gemm_fp8(x_fp8, x_scale, w_fp8, w_scale, group_sizes)        # bf16 [M, N], fp32 accumulation
    dx = grouped_gemm_fp8(dy_fp8, dy_scale, w_fp8.transpose(1, 2), w_scale.transpose(1, 2), group_sizes)
    dy_t, dy_ts = quantize_fp8_cols(dy, group_sizes, 128)   # 128 x 1 tiles, restarting at every group
    x_t, x_ts = quantize_fp8_cols(x, group_sizes, 128)
    dw = grouped_gemm_fp8_wgrad(dy_t, dy_ts, x_t, x_ts, group_sizes)         # [G, N, D] fp32

The input gradient needs no second weight quantization: a 128 x 128 block read transposed is the same block,
so its scale is w_scale transposed. The weight gradient reduces over rows, so both of its operands are
quantized in 128-row x 1-column tiles that restart at each group's first row (no tile spans two groups, so
each reduction step has one scale per column). quantize_fp8_cols returns them transposed and group-padded,
[C, 128 * TILES] with TILES = cdiv(M, 128) + G (tile t in columns [128 t, 128 t + 128), zeros past its
group's end), and scales [TILES, C]: fp8 wgmma reads K-major operands only, and 128-aligned tiles keep every
load of the weight gradient aligned and unmasked along the reduction.

``grouped_linear_fp8(x, w, group_sizes, src_rows, row_map, weight_cache)`` is one expert linear layer in FP8
as the report's Fig. 6 runs it: all three GEMMs in FP8, the master weight untouched (dW comes back in its
dtype), the activation kept for the backward in FP8 with its scales, and the weight quantized once per
training step when the caller owns an ``Fp8WeightCache``. With src_rows/row_map (permute's routing) the
token rows are quantized once, before the gather, and the GEMM reads them through the index: quantizing a
row does not depend on where its copies go, so this equals quantizing the permuted copy.

Every op is a ``torch.library`` custom op with a fake implementation (the layer's op with autograd), so
the path traces under torch.compile. Each op's body runs on the backend ``backend_for`` gives its input:
compiled Triton kernels on CUDA, the same kernels in Triton's interpreter on CPU with TRITON_INTERPRET=1,
the PyTorch twins otherwise. The twins (``<op>_torch``) quantize with the same tiles and compute the
dequantized product in fp32 with the same block structure (per 128-wide reduction step: the fp32 product
of the e4m3 values times the two scales, summed in order), so the kernels match their bytes exactly and
their GEMM outputs to the rounding of the output dtype. ``TRITONMOE_FP8_GEMM_CONFIG="BM,BN,warps,stages"`` pins one GEMM config (for
the weight gradient BM x BN is the dW tile over N x D).
"""

import contextlib
import weakref
from typing import NamedTuple

import torch

from ._backend import Backend, backend_for, launch_backend
from .permute import _unpermute_op, unpermute_torch

try:
    import triton

    from ._fp8_kernels import (grouped_mm_fp8_kernel, grouped_mm_fp8_wgrad_kernel, quantize_blocks_kernel,
                               quantize_cols_kernel, quantize_rows_kernel)
    from ._tuning import block_g, launch, pinned_config, rows_bucket
except ImportError:  # no Triton wheel for this platform (Linux only): the twins run everywhere
    triton = None

BLOCK = 128  # DeepSeek-V3's tile: 1 x 128 activations, 128 x 128 weights, promotion every 128 of D
FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
CONFIG_ENV = "TRITONMOE_FP8_GEMM_CONFIG"
SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)
SWIZZLE_M = 8


class Fp8GemmConfig(NamedTuple):
    """One tile configuration; the reduction step is always BLOCK. Forward / input gradient: a
    block_m x block_n tile of the output (block_n divides 128: one weight block row per tile). Weight
    gradient: block_m x block_n is the dW tile over N x D."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def forward_configs() -> list[Fp8GemmConfig]:
    """Candidates for grouped_mm_fp8_kernel on Hopper (sm_90a compile report in bench/NOTES.md). A stage is
    (BM + BN) x 128 bytes; the per-step fp32 partial doubles the accumulator registers, so a thread holds
    two BM x BN / (32 * warps) fp32 tiles: a 128 x 256 tile on 8 warps spilled 248 bytes and 128 x 128 on
    4 warps 224 bytes (sm_90a, Triton 3.9), so 128 x 128 takes two warpgroups."""
    return [
        Fp8GemmConfig(128, 128, 8, 4),  # 128 KiB smem: large groups (>= 512 rows), DeepSeek-V3's N/D
        Fp8GemmConfig(128, 128, 8, 5),  # 160 KiB: one stage deeper, for the short D=2048 loop (down)
        Fp8GemmConfig(64, 128, 4, 4),  # 96 KiB: small groups, less waste on the ragged last tile
        Fp8GemmConfig(64, 64, 4, 4),  # 64 KiB: decode-sized groups, many CTAs
    ]


def wgrad_configs() -> list[Fp8GemmConfig]:
    """Candidates for grouped_mm_fp8_wgrad_kernel: a block_m x block_n tile of dW[g] over N x D, reducing
    over the group's rows 128 at a time (both operands K-major, M contiguous)."""
    return [
        Fp8GemmConfig(128, 128, 8, 4),  # 128 KiB smem, two warpgroups
        Fp8GemmConfig(128, 128, 8, 3),  # 96 KiB: short reductions (few tiles a group)
        Fp8GemmConfig(64, 128, 4, 4),  # 96 KiB, one warpgroup
    ]


# Small tiles under the interpreter (every program runs in Python; tests use tiny shapes).
INTERPRETER_CONFIG = Fp8GemmConfig(32, 32, 4, 1)
_QUANT_ROWS_BLOCK_M = 32  # rows per program of quantize_rows_kernel: 32 x 128 elements, 4 warps
_QUANT_COLS_CHUNK_M = 32  # rows of a column tile in registers at a time (a whole 128 x 128 fp32 tile spills)


def _pinned_config() -> Fp8GemmConfig | None:
    return pinned_config(CONFIG_ENV, Fp8GemmConfig, "BM,BN,warps,stages", 2, max_block_n=BLOCK)


# ----------------------------------------------------------------------------------------------- launchers
# Launchers allocate (or take a pre-filled ``out``, which tests poison with NaN), pick tiles and launch. They
# never read group sizes on the host; user input is validated by the public functions and ops.

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _col_tiles(M: int, G: int) -> int:
    """Upper bound on the group-aligned 128-row tiles of M rows in G groups (the scale rows allocated)."""
    return _cdiv(M, BLOCK) + G


def _quantize_rows_launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, D = x.shape
    q = torch.empty(M, D, dtype=FP8, device=x.device)
    s = torch.empty(M, _cdiv(D, BLOCK), dtype=torch.float32, device=x.device)
    if M == 0 or D == 0:
        return q, s
    interpret = launch_backend(x) is Backend.INTERPRETER
    block_m = 64 if interpret else _QUANT_ROWS_BLOCK_M
    quantize_rows_kernel[(_cdiv(M, block_m), _cdiv(D, BLOCK))](
        x, q, s, M, D, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
        BLOCK_M=block_m, BLOCK_D=BLOCK, INTERPRET=interpret, num_warps=4)
    return q, s


def _quantize_blocks_launch(w: torch.Tensor, transposed: bool):
    """w [G, N, D] -> (q [G, N, D], scale [G, cdiv(N, 128), cdiv(D, 128)], q transposed [G, D, N] or None)."""
    G, N, D = w.shape
    q = torch.empty(G, N, D, dtype=FP8, device=w.device)
    qt = torch.empty(G, D, N, dtype=FP8, device=w.device) if transposed else None
    s = torch.empty(G, _cdiv(N, BLOCK), _cdiv(D, BLOCK), dtype=torch.float32, device=w.device)
    if s.numel() == 0:
        return q, s, qt
    quantize_blocks_kernel[(s.numel(),)](
        w, q, q if qt is None else qt, s, N, D, w.stride(0), w.stride(1), w.stride(2),
        BLOCK=BLOCK, WRITE_T=transposed, INTERPRET=launch_backend(w) is Backend.INTERPRETER, num_warps=8)
    return q, s, qt


def _quantize_cols_launch(x: torch.Tensor, group_sizes: torch.Tensor, x_scale: torch.Tensor | None = None,
                          rows: torch.Tensor | None = None, with_rows: bool = False):
    """Column tiles of x (dequantized first when x_scale is given, rows gathered through `rows`):
    (q [C, 128 * TILES] transposed and group-padded, scale [TILES, C]), TILES = cdiv(M, 128) + G; with_rows
    also the 1 x 128 row quantization (q_rows [M, C], scale [M, cdiv(C, 128)]) from the same read."""
    M = x.shape[0] if rows is None else rows.shape[0]
    C, G = x.shape[1], group_sizes.shape[0]
    tiles = _col_tiles(M, G)
    qt = torch.empty(C, BLOCK * tiles, dtype=FP8, device=x.device)
    st = torch.empty(tiles, C, dtype=torch.float32, device=x.device)
    qr = torch.empty(M, C, dtype=FP8, device=x.device) if with_rows else None
    sr = torch.empty(M, _cdiv(C, BLOCK), dtype=torch.float32, device=x.device) if with_rows else None
    if C > 0:
        group_sizes = group_sizes.contiguous()
        interpret = launch_backend(x) is Backend.INTERPRETER
        xs = x_scale if x_scale is not None else st  # never read unless SRC_SCALED
        quantize_cols_kernel[(tiles, _cdiv(C, BLOCK))](
            x, xs, group_sizes if rows is None else rows, qt, st, qt if qr is None else qr, st if sr is None else sr,
            group_sizes, M, C, G, x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), qt.stride(0), st.stride(0),
            C if qr is None else qr.stride(0), 1 if sr is None else sr.stride(0),
            BLOCK_G=block_g(G), BLOCK_M=BLOCK, BLOCK_C=BLOCK, CHUNK_M=BLOCK if interpret else _QUANT_COLS_CHUNK_M,
            SRC_SCALED=x_scale is not None, GATHER=rows is not None, WRITE_ROWS=with_rows, INTERPRET=interpret,
            num_warps=8)
    return (qt, st) if not with_rows else (qt, st, qr, sr)


def _launch(kernel, grid, args: tuple, names: tuple[str, str], key: list[str], bucket: int, backend: Backend,
            configs_fn, **constexprs) -> None:
    interpret = backend is Backend.INTERPRETER
    launch(kernel, grid, args, names=names, key=key, bucket=bucket, interpret=interpret,
           interpreter_config=INTERPRETER_CONFIG, pinned=_pinned_config(), configs=configs_fn,
           interpret_kw=dict(UPCAST=True, INTERPRET=True), compiled_kw=dict(UPCAST=False, INTERPRET=False),
           **constexprs)


def _gemm_fp8_launch(a, a_scale, b, b_scale, group_sizes, out_dtype, a_rows=None, out=None) -> torch.Tensor:
    """out[rows of g] = (a * a_scale)[rows of g] @ (b * b_scale)[g].T, promoted to fp32 every 128 of D.
    a [M, D] e4m3 (or [S, D] read through a_rows int64 [M]), a_scale [., cdiv(D, 128)]; b [G, N, D] e4m3 and
    b_scale [G, cdiv(N, 128), cdiv(D, 128)], any strides. Returns out [M, N] in out_dtype, written in full."""
    M = a.shape[0] if a_rows is None else a_rows.shape[0]
    D = a.shape[1]
    G, N, _ = b.shape
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if D == 0:
        return out.zero_()
    group_sizes = group_sizes.contiguous()
    args = (a, a_scale, group_sizes if a_rows is None else a_rows, b, b_scale, out, group_sizes, M, N, D, G,
            a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1), b.stride(2),
            b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0), out.stride(1))
    grid = lambda meta: ((_cdiv(M, meta["BLOCK_M"]) + G) * _cdiv(N, meta["BLOCK_N"]),)
    # stride_bd in the key: the forward (1 along D) and the input gradient through strides are different GEMMs.
    _launch(grouped_mm_fp8_kernel, grid, args, ("BLOCK_M", "BLOCK_N"), ["N", "D", "stride_bd", "GATHER_A"],
            rows_bucket(M, G), launch_backend(a), forward_configs,
            BLOCK_G=block_g(G), BLOCK_D=BLOCK, SWIZZLE_M=SWIZZLE_M, GATHER_A=a_rows is not None)
    return out


def _gemm_fp8_wgrad_launch(dy_t, dy_ts, x_t, x_ts, group_sizes, out_dtype, out=None) -> torch.Tensor:
    """dw[g] = sum over the rows of g of dy[m]^T x[m] from column tiles (quantize_fp8_cols): dy_t [N, 128 T]
    and x_t [D, 128 T] e4m3, unit stride along the tiles, scales [T, N] and [T, D]. Returns dw [G, N, D] in
    out_dtype, every element written (empty groups get zeros)."""
    N, D, G, tiles = dy_t.shape[0], x_t.shape[0], group_sizes.shape[0], dy_ts.shape[0]
    if out is None:
        out = torch.empty(G, N, D, dtype=out_dtype, device=dy_t.device)
    if G == 0 or N == 0 or D == 0:
        return out
    assert dy_t.stride(1) == 1 and x_t.stride(1) == 1, "column tiles are stored transposed"
    group_sizes = group_sizes.contiguous()
    args = (dy_t, dy_ts, x_t, x_ts, out, group_sizes, N, D, G, tiles, dy_t.stride(0), dy_ts.stride(0),
            x_t.stride(0), x_ts.stride(0), out.stride(0), out.stride(1), out.stride(2))
    grid = lambda meta: (G * _cdiv(N, meta["BLOCK_N"]) * _cdiv(D, meta["BLOCK_D"]),)
    _launch(grouped_mm_fp8_wgrad_kernel, grid, args, ("BLOCK_N", "BLOCK_D"), ["N", "D"],
            rows_bucket(BLOCK * (tiles - G), G), launch_backend(dy_t), wgrad_configs, BLOCK_G=block_g(G), BLOCK_M=BLOCK)
    return out


# ------------------------------------------------------------------------------------------------- checks

def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_block(op: str, block) -> None:
    if block != BLOCK:
        _fail(op, f"block={block!r} unsupported; only {BLOCK} (DeepSeek-V3's tile and the GEMMs' reduction step)")


def _check_source(op: str, name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        _fail(op, f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in SOURCE_DTYPES:
        _fail(op, f"{name}.dtype={t.dtype} unsupported (float32, float16, bfloat16)")


def _check_sizes_arg(op: str, group_sizes, G: int | None, device) -> None:
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.dim() != 1:
        got = tuple(group_sizes.shape) if isinstance(group_sizes, torch.Tensor) else type(group_sizes).__name__
        _fail(op, f"group_sizes must be a 1-D tensor, got {got}")
    if group_sizes.dtype.is_floating_point or group_sizes.dtype.is_complex or group_sizes.dtype == torch.bool:
        _fail(op, f"group_sizes.dtype={group_sizes.dtype} must be an integer type")
    if G is not None and group_sizes.shape[0] != G:
        _fail(op, f"len(group_sizes)={group_sizes.shape[0]} != number of groups {G}")
    if group_sizes.device != device:
        _fail(op, f"group_sizes is on {group_sizes.device}, the data on {device}")


def _check_sizes(op: str, group_sizes: torch.Tensor, M: int) -> None:
    """Values of the sizes: ValueError on CPU; on CUDA an asynchronous device assert (no host sync; the
    kernels clamp and mask, so bad sizes never write out of bounds before it fires)."""
    if group_sizes.device.type == "cpu":
        if group_sizes.numel() and bool((group_sizes < 0).any()):
            _fail(op, f"negative group sizes {group_sizes[group_sizes < 0].tolist()}")
        if int(group_sizes.sum()) != M:
            _fail(op, f"group_sizes sum to {int(group_sizes.sum())}, but there are M={M} rows")
    else:
        torch._assert_async((group_sizes >= 0).all() & (group_sizes.sum() == M),
                            f"{op}: group sizes must be >= 0 and sum to the number of rows")


def _check_tiles(op: str, group_sizes: torch.Tensor, tiles: int) -> None:
    """The sizes fit the column tiles they were quantized with: >= 0 and sum of cdiv(size, 128) <= tiles
    (ValueError on CPU, device assert on CUDA; the kernel never reads past `tiles` either way)."""
    need = ((group_sizes.clamp_min(0) + BLOCK - 1) // BLOCK).sum()
    if group_sizes.device.type == "cpu":
        if group_sizes.numel() and bool((group_sizes < 0).any()):
            _fail(op, f"negative group sizes {group_sizes[group_sizes < 0].tolist()}")
        if int(need) > tiles:
            _fail(op, f"group_sizes need {int(need)} column tiles, the operands hold {tiles}")
    else:
        torch._assert_async((group_sizes >= 0).all() & (need <= tiles),
                            f"{op}: group sizes must be >= 0 and fit the operands' column tiles")


def _check_rows_index(op: str, rows: torch.Tensor, S: int) -> None:
    """A gather index: int [M] with values in [0, S) (ValueError on CPU, device assert on CUDA)."""
    if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
        _fail(op, "src_rows must be a 1-D int32/int64 tensor")
    if rows.numel() == 0:
        return
    ok = (rows >= 0).all() & (rows < S).all()
    if rows.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            bad = rows[(rows < 0) | (rows >= S)][0].item()
            _fail(op, f"src_rows holds {bad}, outside [0, {S})")
    else:
        torch._assert_async(ok, f"{op}: src_rows outside [0, {S})")


def _check_fp8(op: str, name: str, q, s, shape: tuple, scale_shape: tuple) -> None:
    for n, t in ((name, q), (name.replace("fp8", "scale"), s)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype != FP8:
        _fail(op, f"{name}.dtype={q.dtype} must be torch.float8_e4m3fn")
    if s.dtype != torch.float32:
        _fail(op, f"{name.replace('fp8', 'scale')}.dtype={s.dtype} must be torch.float32")
    if tuple(q.shape) != shape:
        _fail(op, f"{name} has shape {tuple(q.shape)}, expected {shape}")
    if tuple(s.shape) != scale_shape:
        _fail(op, f"{name.replace('fp8', 'scale')} has shape {tuple(s.shape)}, expected {scale_shape} "
                  f"(ceil divisions by {BLOCK})")
    if s.device != q.device:
        _fail(op, f"{name} is on {q.device} but its scale is on {s.device}")


# ------------------------------------------------------------------------------ torch.library ops + autograd
# Each body runs on the backend of its data: kernels (compiled or interpreted) or the twins.

def _twin(t: torch.Tensor) -> bool:
    return backend_for(t) is Backend.TWIN


@torch.library.custom_op("tritonmoe::fp8_quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_rows_torch(x) if _twin(x) else _quantize_rows_launch(x)


@_quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], _cdiv(x.shape[1], BLOCK), dtype=torch.float32)


@torch.library.custom_op("tritonmoe::fp8_quantize_blocks", mutates_args=())
def _quantize_blocks_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _twin(w):
        return quantize_fp8_blocks_torch(w)
    return _quantize_blocks_launch(w, False)[:2]


@_quantize_blocks_op.register_fake
def _(w):
    G, N, D = w.shape
    return w.new_empty(w.shape, dtype=FP8), w.new_empty(G, _cdiv(N, BLOCK), _cdiv(D, BLOCK), dtype=torch.float32)


@torch.library.custom_op("tritonmoe::fp8_quantize_weight", mutates_args=())
def _quantize_weight_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_fp8 [G, N, D], scale, w_fp8 transposed [G, D, N] contiguous): the input gradient's K-major copy,
    written by the same pass. fp8 wgmma reads K-major operands only: read through strides instead
    (_sm90_jobs.fp8_jobs' dgrad-strided), Triton 3.9 keeps cp.async for dY alone and transposes each weight
    tile in registers (48 byte permutes and 72 shared stores per step in the PTX, against 8)."""
    if _twin(w):
        q, s = quantize_fp8_blocks_torch(w)
        return q, s, q.transpose(1, 2).contiguous()
    return _quantize_blocks_launch(w, True)


@_quantize_weight_op.register_fake
def _(w):
    G, N, D = w.shape
    return (w.new_empty(w.shape, dtype=FP8), w.new_empty(G, _cdiv(N, BLOCK), _cdiv(D, BLOCK), dtype=torch.float32),
            w.new_empty(G, D, N, dtype=FP8))


def _cols_fake(x, group_sizes, rows):
    tiles = _col_tiles(x.shape[0] if rows is None else rows.shape[0], group_sizes.shape[0])
    return (x.new_empty(x.shape[1], BLOCK * tiles, dtype=FP8), x.new_empty(tiles, x.shape[1], dtype=torch.float32))


@torch.library.custom_op("tritonmoe::fp8_quantize_cols", mutates_args=())
def _quantize_cols_op(x: torch.Tensor, group_sizes: torch.Tensor, x_scale: torch.Tensor | None,
                      src_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if _twin(x):
        return quantize_fp8_cols_torch(x, group_sizes, x_scale=x_scale, src_rows=src_rows)
    return _quantize_cols_launch(x, group_sizes, x_scale, src_rows)


@_quantize_cols_op.register_fake
def _(x, group_sizes, x_scale, src_rows):
    return _cols_fake(x, group_sizes, src_rows)


@torch.library.custom_op("tritonmoe::fp8_quantize_rows_cols", mutates_args=())
def _quantize_rows_cols_op(x: torch.Tensor, group_sizes: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dY's two quantizations from one read: (rows [M, N] + scales for the input gradient, column tiles
    + scales for the weight gradient)."""
    if _twin(x):
        return (*quantize_fp8_rows_torch(x), *quantize_fp8_cols_torch(x, group_sizes))
    qc, sc, qr, sr = _quantize_cols_launch(x, group_sizes, with_rows=True)
    return qr, sr, qc, sc


@_quantize_rows_cols_op.register_fake
def _(x, group_sizes):
    M, C = x.shape
    return (x.new_empty(M, C, dtype=FP8), x.new_empty(M, _cdiv(C, BLOCK), dtype=torch.float32),
            *_cols_fake(x, group_sizes, None))


@torch.library.custom_op("tritonmoe::grouped_mm_fp8", mutates_args=())
def _grouped_mm_fp8_op(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       group_sizes: torch.Tensor, src_rows: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    M = x_fp8.shape[0] if src_rows is None else src_rows.shape[0]
    _check_sizes("grouped_gemm_fp8", group_sizes, M)
    if _twin(x_fp8):
        return grouped_gemm_fp8_torch(x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows=src_rows,
                                      out_dtype=out_dtype)
    return _gemm_fp8_launch(x_fp8, x_scale, w_fp8, w_scale, group_sizes, out_dtype, a_rows=src_rows)


@_grouped_mm_fp8_op.register_fake
def _(x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows, out_dtype):
    M = x_fp8.shape[0] if src_rows is None else src_rows.shape[0]
    return x_fp8.new_empty(M, w_fp8.shape[1], dtype=out_dtype)


@torch.library.custom_op("tritonmoe::grouped_mm_fp8_wgrad", mutates_args=())
def _grouped_mm_fp8_wgrad_op(dy_fp8: torch.Tensor, dy_scale: torch.Tensor, x_fp8: torch.Tensor,
                             x_scale: torch.Tensor, group_sizes: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_tiles("grouped_gemm_fp8_wgrad", group_sizes, dy_scale.shape[0])
    if _twin(dy_fp8):
        return grouped_gemm_fp8_wgrad_torch(dy_fp8, dy_scale, x_fp8, x_scale, group_sizes, out_dtype=out_dtype)
    return _gemm_fp8_wgrad_launch(dy_fp8, dy_scale, x_fp8, x_scale, group_sizes, out_dtype)


@_grouped_mm_fp8_wgrad_op.register_fake
def _(dy_fp8, dy_scale, x_fp8, x_scale, group_sizes, out_dtype):
    return dy_fp8.new_empty(group_sizes.shape[0], dy_fp8.shape[0], x_fp8.shape[0], dtype=out_dtype)


@torch.library.custom_op("tritonmoe::grouped_linear_fp8", mutates_args=())
def _grouped_linear_fp8_op(x: torch.Tensor, x_fp8: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor,
                           w_fp8: torch.Tensor, w_scale: torch.Tensor, w_fp8_t: torch.Tensor,
                           group_sizes: torch.Tensor, src_rows: torch.Tensor | None,
                           row_map: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] in x.dtype = FP8 GEMM of x's quantized rows (gathered through src_rows) with the quantized w.
    x and w themselves are not read: they are here so that autograd returns their gradients."""
    return _grouped_mm_fp8_op(x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows, x.dtype)


@_grouped_linear_fp8_op.register_fake
def _(x, x_fp8, x_scale, w, w_fp8, w_scale, w_fp8_t, group_sizes, src_rows, row_map):
    M = x.shape[0] if src_rows is None else src_rows.shape[0]
    return x.new_empty(M, w.shape[1])


def _linear_setup_context(ctx, inputs, output):
    x, x_fp8, x_scale, w, w_fp8, w_scale, w_fp8_t, group_sizes, src_rows, row_map = inputs
    # The activation is kept in FP8 with its scales (x itself is not saved), the weight as its transposed copy.
    ctx.save_for_backward(x_fp8, x_scale, w_scale, w_fp8_t, group_sizes, src_rows, row_map)
    ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype


@torch.autograd.function.once_differentiable
def _linear_backward(ctx, dy):
    x_fp8, x_scale, w_scale, w_fp8_t, group_sizes, src_rows, row_map = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx = dw = None
    if need_dx and need_dw:
        dy_fp8, dy_scale, dy_t, dy_ts = _quantize_rows_cols_op(dy, group_sizes)  # one read of dY for both
    elif need_dx:
        dy_fp8, dy_scale = _quantize_rows_op(dy)
    elif need_dw:
        dy_t, dy_ts = _quantize_cols_op(dy, group_sizes, None, None)
    if need_dx:
        # dX = dY @ w[g]: dY in 1 x 128 tiles along N, the weight's transposed bytes and scales.
        dx = _grouped_mm_fp8_op(dy_fp8, dy_scale, w_fp8_t, w_scale.transpose(1, 2), group_sizes, None, ctx.x_dtype)
        if src_rows is not None:  # the gather's adjoint: each token sums its copies (fp32, no atomics)
            dx = unpermute_torch(dx, row_map) if _twin(dx) else _unpermute_op(dx, row_map, None)
    if need_dw:
        # dW[g] = dY[rows g]^T @ X[rows g]: X's saved rows dequantized and re-quantized in column tiles.
        x_t, x_ts = _quantize_cols_op(x_fp8, group_sizes, x_scale, src_rows)
        dw = _grouped_mm_fp8_wgrad_op(dy_t, dy_ts, x_t, x_ts, group_sizes, ctx.w_dtype)
    return dx, None, None, dw, None, None, None, None, None, None


_grouped_linear_fp8_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ------------------------------------------------------------------------------------------------- public

def quantize_fp8_rows(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, D] fp32/fp16/bf16 -> (x_fp8 [M, D] float8_e4m3fn, scale [M, cdiv(D, 128)] fp32), one scale per
    1 x 128 tile (the last one partial when D % 128 != 0): scale = amax / 448, 1 for an all-zero tile,
    x ~= x_fp8 * scale. Not differentiable."""
    _check_block("quantize_fp8_rows", block)
    _check_source("quantize_fp8_rows", "x", x, 2)
    return _quantize_rows_op(x.detach())


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [G, N, D] (or [N, D]) fp32/fp16/bf16 -> (w_fp8 of w's shape, scale [G, cdiv(N, 128), cdiv(D, 128)]
    (or [cdiv(N, 128), cdiv(D, 128)]) fp32), one scale per 128 x 128 block. Not differentiable."""
    _check_block("quantize_fp8_blocks", block)
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3):
        _fail("quantize_fp8_blocks", f"w must be [G, N, D] or [N, D], got "
                                     f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    _check_source("quantize_fp8_blocks", "w", w, w.dim())
    q, s = _quantize_blocks_op(w.detach() if w.dim() == 3 else w.detach()[None])
    return (q, s) if w.dim() == 3 else (q[0], s[0])


def quantize_fp8_cols(x: torch.Tensor, group_sizes: torch.Tensor, block: int = BLOCK, *,
                      x_scale: torch.Tensor | None = None, src_rows: torch.Tensor | None = None):
    """Column tiles for the weight gradient: 128 rows x 1 column, restarting at each group's first row.

    x [M, C] fp32/fp16/bf16, rows grouped as group_sizes says (sum == M). Or x an e4m3 tensor [S, C] with its
    1 x 128 row scales `x_scale` (quantize_fp8_rows' output: dequantized first, as the forward GEMM read it),
    and src_rows int [M] gathering its rows (row m is x[src_rows[m]]). Returns, with TILES = cdiv(M, 128) + G,
    (x_fp8_t [C, 128 * TILES] float8_e4m3fn, scale [TILES, C] fp32): transposed and group-padded, row m of
    group g is column 128 * tile_start(g) + (m - row_start(g)) of x_fp8_t, with tile_start(g) = sum over
    g' < g of cdiv(size_g', 128) (col_positions gives it); columns no row lands on are zero, and scale rows
    past the last tile are 1. Not differentiable."""
    op = "quantize_fp8_cols"
    _check_block(op, block)
    if x_scale is None:
        _check_source(op, "x", x, 2)
    else:
        _check_fp8(op, "x_fp8", x, x_scale, tuple(x.shape), (x.shape[0], _cdiv(x.shape[1], BLOCK)))
    _check_sizes_arg(op, group_sizes, None, x.device)
    if src_rows is not None:
        _check_rows_index(op, src_rows, x.shape[0])
        src_rows = src_rows.long()
    _check_sizes(op, group_sizes, x.shape[0] if src_rows is None else src_rows.shape[0])
    return _quantize_cols_op(x.detach(), group_sizes, x_scale, src_rows)


def _check_gemm(op: str, x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows) -> None:
    """Sync-free checks of grouped_gemm_fp8's operands (valid on fake tensors too)."""
    for name, t in (("x_fp8", x_fp8), ("w_fp8", w_fp8)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x_fp8.dim() != 2:
        _fail(op, f"x_fp8 must be [M, D], got shape {tuple(x_fp8.shape)}")
    if w_fp8.dim() != 3:
        _fail(op, f"w_fp8 must be [G, N, D], got shape {tuple(w_fp8.shape)}")
    S, D = x_fp8.shape
    G, N, Dw = w_fp8.shape
    if Dw != D:
        _fail(op, f"w_fp8.shape[2]={Dw} != x_fp8.shape[1]={D}")
    _check_fp8(op, "x_fp8", x_fp8, x_scale, (S, D), (S, _cdiv(D, BLOCK)))
    _check_fp8(op, "w_fp8", w_fp8, w_scale, (G, N, D), (G, _cdiv(N, BLOCK), _cdiv(D, BLOCK)))
    if w_fp8.device != x_fp8.device:
        _fail(op, f"x_fp8 is on {x_fp8.device} but w_fp8 is on {w_fp8.device}")
    _check_sizes_arg(op, group_sizes, G, x_fp8.device)
    if src_rows is not None:
        _check_rows_index(op, src_rows, S)


def grouped_gemm_fp8(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                     group_sizes: torch.Tensor, *, src_rows: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y[rows of g] = (x_fp8 * x_scale)[rows of g] @ (w_fp8 * w_scale)[g].T in one launch, no host sync.

    x_fp8 [M, D] e4m3 with 1 x 128 row scales x_scale [M, cdiv(D, 128)] (quantize_fp8_rows), rows sorted by
    group; w_fp8 [G, N, D] e4m3 with 128 x 128 block scales w_scale [G, cdiv(N, 128), cdiv(D, 128)]
    (quantize_fp8_blocks), any strides: the input gradient passes w_fp8.transpose(1, 2) and
    w_scale.transpose(1, 2). group_sizes int [G] >= 0, summing to M, zeros allowed. With src_rows (int [M]),
    row m is x_fp8[src_rows[m]] (x_fp8 may then have any number of rows): the gather of the first expert
    GEMM. Each 128-wide step of D is summed in fp32 and scaled into an fp32 accumulator; the result is
    rounded once to out_dtype (bfloat16 or float32). Not differentiable (grouped_linear_fp8 is)."""
    op = "grouped_gemm_fp8"
    _check_gemm(op, x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows)
    if out_dtype not in OUT_DTYPES:
        _fail(op, f"out_dtype={out_dtype} unsupported (bfloat16, float32)")
    return _grouped_mm_fp8_op(x_fp8, x_scale, w_fp8, w_scale, group_sizes,
                              None if src_rows is None else src_rows.long(), out_dtype)


def grouped_gemm_fp8_wgrad(dy_fp8: torch.Tensor, dy_scale: torch.Tensor, x_fp8: torch.Tensor,
                           x_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW[g] = dY[rows of g]^T @ X[rows of g] from column tiles: quantize_fp8_cols of dY [M, N] and of X [M, D]
    with the same group_sizes, so dy_fp8 [N, 128 T], dy_scale [T, N], x_fp8 [D, 128 T], x_scale [T, D]. One
    fp32 partial per 128-row tile, scaled by dY's column scales (rows of dW) and X's (columns), summed in fp32.
    Returns dW [G, N, D] in out_dtype (float32 or bfloat16); an empty group's gradient is an exact zero."""
    op = "grouped_gemm_fp8_wgrad"
    if not isinstance(dy_fp8, torch.Tensor) or not isinstance(x_fp8, torch.Tensor):
        _fail(op, "dy_fp8 and x_fp8 must be tensors")
    if dy_fp8.dim() != 2 or x_fp8.dim() != 2 or dy_fp8.shape[1] != x_fp8.shape[1] or dy_fp8.shape[1] % BLOCK:
        _fail(op, f"dy_fp8 [N, 128 T] and x_fp8 [D, 128 T] must share their tiles (quantize_fp8_cols' layout), "
                  f"got {tuple(dy_fp8.shape)} and {tuple(x_fp8.shape)}")
    _check_sizes_arg(op, group_sizes, None, x_fp8.device)
    tiles = x_fp8.shape[1] // BLOCK
    _check_fp8(op, "dy_fp8", dy_fp8, dy_scale, tuple(dy_fp8.shape), (tiles, dy_fp8.shape[0]))
    _check_fp8(op, "x_fp8", x_fp8, x_scale, tuple(x_fp8.shape), (tiles, x_fp8.shape[0]))
    for name, t in (("dy_fp8", dy_fp8), ("x_fp8", x_fp8)):
        if t.stride(1) != 1:
            _fail(op, f"{name} must have unit stride along its tiles (as quantize_fp8_cols returns), got strides "
                      f"{t.stride()}")
    if dy_fp8.device != x_fp8.device:
        _fail(op, f"dy_fp8 is on {dy_fp8.device} but x_fp8 is on {x_fp8.device}")
    if out_dtype not in OUT_DTYPES:
        _fail(op, f"out_dtype={out_dtype} unsupported (float32, bfloat16)")
    return _grouped_mm_fp8_wgrad_op(dy_fp8, dy_scale, x_fp8, x_scale, group_sizes, out_dtype)


class Fp8Weight(NamedTuple):
    """A weight [G, N, D] quantized for the three GEMMs."""
    fp8: torch.Tensor  # [G, N, D] float8_e4m3fn, the forward's operand
    scale: torch.Tensor  # [G, cdiv(N, 128), cdiv(D, 128)] fp32 block scales (transposed for the input gradient)
    fp8_t: torch.Tensor  # [G, D, N] float8_e4m3fn: fp8 transposed, contiguous (the input gradient's operand)


def quantize_fp8_weight(w: torch.Tensor) -> Fp8Weight:
    """quantize_fp8_blocks(w) plus the transposed copy the input gradient reads, from one pass over w."""
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        _fail("quantize_fp8_weight", f"w must be [G, N, D], got "
                                     f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    _check_source("quantize_fp8_weight", "w", w, 3)
    return Fp8Weight(*_quantize_weight_op(w.detach()))


class Fp8WeightCache:
    """Expert weights quantized once per training step, reused across micro-batches and activation
    checkpointing's recompute. The caller owns it and scopes it:

        cache = Fp8WeightCache()
        with cache.step():                 # every forward/backward of one optimizer step
            for micro_batch in batches:
                loss(model(micro_batch)).backward()    # layers call grouped_linear_fp8(..., weight_cache=cache)
        optimizer.step()                   # after the block: the block's exit dropped every entry

    Outside a step block nothing is kept (each call quantizes), so a cache never serves a stale weight to a
    caller that forgot the block. Inside one, an entry is keyed on the weight tensor object, or the tensor it
    is a view of (``DTensor.to_local()`` returns a new view of the same local tensor at every call), held by
    weak reference so a tensor created later at a recycled id() never matches; and on the version counter
    (bumped by in-place writes to an ordinary parameter: an optimizer step inside the block re-quantizes),
    shape, strides, storage offset, dtype and device. Not the data pointer: FSDP2 re-gathers its unsharded
    parameter into new memory before each forward, same object, same values within a step. Nor can the
    version alone make steps safe: FSDP2's unsharded parameter keeps version 0 across optimizer steps, and
    an in-place update of a DTensor parameter left its local tensor's version at 0 (both measured, torch
    2.13), which is why entries live only as long as the block. Quantization runs after FSDP's all-gather
    (its scales never depend on the sharding). Under torch.compile the lookup is skipped and quantizing
    stays in the graph.
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}
        self._open = False
        self.hits = 0  # lookups served from the cache
        self.misses = 0  # quantizations run through the cache

    @contextlib.contextmanager
    def step(self):
        """The scope of one optimizer step; entries are dropped on exit."""
        if self._open:
            raise RuntimeError("Fp8WeightCache.step() blocks do not nest: one block is one optimizer step")
        self._open = True
        try:
            yield self
        finally:
            self._open = False
            self._entries.clear()

    def get(self, w: torch.Tensor) -> Fp8Weight:
        """The quantized weight: cached inside a step block, quantized anew otherwise."""
        if not self._open or torch.compiler.is_compiling():
            return quantize_fp8_weight(w)
        owner = w._base if w._base is not None else w
        meta = (w._version, tuple(w.shape), w.stride(), w.storage_offset(), w.dtype, w.device)
        entry = self._entries.get(id(owner))
        if entry is not None and entry[0]() is owner and entry[1] == meta:
            self.hits += 1
            return entry[2]
        value = quantize_fp8_weight(w)
        self.misses += 1
        self._entries[id(owner)] = (weakref.ref(owner), meta, value)
        return value


def _check_gather_pair(op: str, x: torch.Tensor, src_rows, row_map, M_expected=None) -> None:
    if (src_rows is None) != (row_map is None):
        _fail(op, "src_rows and row_map come together (permute's routing: row_map is src_rows' inverse)")
    if src_rows is None:
        return
    _check_rows_index(op, src_rows, x.shape[0])
    if not isinstance(row_map, torch.Tensor) or row_map.dtype not in (torch.int32, torch.int64):
        _fail(op, "row_map must be an int32/int64 tensor")
    if row_map.dim() != 2 or row_map.shape[0] != x.shape[0] or row_map.numel() != src_rows.numel():
        _fail(op, f"row_map must be [S, C] with S = x.shape[0] = {x.shape[0]} and S * C = len(src_rows) = "
                  f"{src_rows.numel()}, got shape {tuple(row_map.shape)}")
    if src_rows.device != x.device or row_map.device != x.device:
        _fail(op, f"src_rows on {src_rows.device} and row_map on {row_map.device}, x on {x.device}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and src_rows.numel():
        flat, M = row_map.reshape(-1).long(), src_rows.numel()
        owner = torch.arange(x.shape[0]).repeat_interleave(row_map.shape[1])
        if not (bool(((flat >= 0) & (flat < M)).all()) and bool((torch.bincount(flat, minlength=M) == 1).all())
                and torch.equal(src_rows.long()[flat], owner)):
            _fail(op, "src_rows and row_map are not inverse to each other (src_rows[row_map[s, c]] must be s, "
                      "each row once)")


def grouped_linear_fp8(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                       src_rows: torch.Tensor | None = None, row_map: torch.Tensor | None = None,
                       weight_cache: Fp8WeightCache | None = None) -> torch.Tensor:
    """One expert linear layer in FP8: y[rows of g] = x[rows of g] @ w[g].T with all three GEMMs in FP8.

    x [M, D] fp32/fp16/bf16 rows sorted by group, or token rows [S, D] with permute's routing: src_rows
    int [M] (row m of the GEMM is x[src_rows[m]]) and row_map [S, C] (its inverse, for dX). w [G, N, D], the
    master weight (any float dtype, left untouched). Returns y [M, N] in x.dtype. Forward: x quantized in
    1 x 128 tiles (once per token row, before the gather), w in 128 x 128 blocks (once per step through
    `weight_cache`, see Fp8WeightCache). Saved for the backward: x_fp8 and its scales, not x. Backward: dX from
    dY quantized 1 x 128 along N with the weight's transposed blocks; dW from dY and X in group-aligned
    128 x 1 column tiles, returned in w.dtype. Differentiable in x and w.
    """
    op = "grouped_linear_fp8"
    _check_source(op, "x", x, 2)
    _check_source(op, "w", w, 3)
    if w.shape[2] != x.shape[1]:
        _fail(op, f"w.shape[2]={w.shape[2]} != x.shape[1]={x.shape[1]} (x {tuple(x.shape)}, w {tuple(w.shape)})")
    if w.device != x.device:
        _fail(op, f"x is on {x.device} but w is on {w.device}")
    _check_sizes_arg(op, group_sizes, w.shape[0], x.device)
    _check_gather_pair(op, x, src_rows, row_map)
    wq = weight_cache.get(w) if weight_cache is not None else quantize_fp8_weight(w)
    x_fp8, x_scale = _quantize_rows_op(x.detach())
    if src_rows is not None:
        src_rows = src_rows.long()
    return _grouped_linear_fp8_op(x, x_fp8, x_scale, w, wq.fp8, wq.scale, wq.fp8_t, group_sizes, src_rows, row_map)


# -------------------------------------------------------------------------------------------------- twins

def _scale_torch(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, 1 where that is 0; NaN and inf pass (torch's amax propagates NaN)."""
    s = amax / E4M3_MAX
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_fp8_rows_torch(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of quantize_fp8_rows: the same tiles, division and cast, so the same bytes."""
    _check_block("quantize_fp8_rows_torch", block)
    M, D = x.shape
    nb = _cdiv(D, block)
    tiles = torch.nn.functional.pad(x.float(), (0, nb * block - D)).view(M, nb, block)
    s = _scale_torch(tiles.abs().amax(-1)) if nb else tiles.new_empty(M, 0)
    q = (tiles / s[..., None]).to(FP8).view(M, nb * block)[:, :D].contiguous()
    return q, s


def quantize_fp8_blocks_torch(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of quantize_fp8_blocks ([G, N, D] or [N, D])."""
    _check_block("quantize_fp8_blocks_torch", block)
    w3 = w if w.dim() == 3 else w[None]
    G, N, D = w3.shape
    nb, db = _cdiv(N, block), _cdiv(D, block)
    blocks = torch.nn.functional.pad(w3.float(), (0, db * block - D, 0, nb * block - N)).view(G, nb, block, db, block)
    s = _scale_torch(blocks.abs().amax(dim=(2, 4))) if nb * db else blocks.new_empty(G, nb, db)
    q = (blocks / s[:, :, None, :, None]).to(FP8).view(G, nb * block, db * block)[:, :N, :D].contiguous()
    return (q, s) if w.dim() == 3 else (q[0], s[0])


def col_positions(group_sizes: torch.Tensor, M: int) -> torch.Tensor:
    """int64 [M]: the column of quantize_fp8_cols' output that holds each row (128 * tile + row in tile).
    Reads the sizes on the host."""
    sizes = group_sizes.long().clamp_min(0).cpu()
    tiles = (sizes + BLOCK - 1) // BLOCK
    tile_start, row_start = torch.cumsum(tiles, 0) - tiles, torch.cumsum(sizes, 0) - sizes
    g = torch.repeat_interleave(torch.arange(len(sizes)), sizes, output_size=M)
    return (BLOCK * tile_start[g] + torch.arange(M) - row_start[g]).to(group_sizes.device)


def _dequantize_rows_torch(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.repeat_interleave(BLOCK, dim=1)[:, :q.shape[1]]


def quantize_fp8_cols_torch(x: torch.Tensor, group_sizes: torch.Tensor, block: int = BLOCK, *,
                            x_scale: torch.Tensor | None = None, src_rows: torch.Tensor | None = None):
    """PyTorch twin of quantize_fp8_cols: rows placed in zero-padded 128-row tiles per group, amax per
    (tile, column), the same division and cast."""
    _check_block("quantize_fp8_cols_torch", block)
    xf = _dequantize_rows_torch(x, x_scale) if x_scale is not None else x.float()
    if src_rows is not None:
        xf = xf[src_rows.long()]
    M, C = xf.shape
    tiles = _col_tiles(M, group_sizes.shape[0])
    pos = col_positions(group_sizes, M)
    padded = xf.new_zeros(tiles * block, C)
    padded[pos] = xf
    s = _scale_torch(padded.view(tiles, block, C).abs().amax(1)) if C else xf.new_empty(tiles, 0)
    padded[pos] = xf / s[pos // block]  # padding rows stay exact zeros, whatever the tile's scale
    return padded.to(FP8).t().contiguous(), s


def grouped_gemm_fp8_torch(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                           group_sizes: torch.Tensor, *, src_rows: torch.Tensor | None = None,
                           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """PyTorch twin of grouped_gemm_fp8: the dequantized product with the kernel's block structure. Per group
    and per 128-wide step of D: the e4m3 values' product in fp32, times (row scale * block scale), added in
    order to an fp32 accumulator; rounded once to out_dtype. Reads the sizes on the host."""
    if src_rows is not None:
        x_fp8, x_scale = x_fp8[src_rows.long()], x_scale[src_rows.long()]
    M, D = x_fp8.shape
    G, N, _ = w_fp8.shape
    nb = _cdiv(D, BLOCK)
    # Contiguous fp32 copies: the same values then take the same matmul path whatever w's strides.
    xq, wq = x_fp8.float().contiguous(), w_fp8.float().contiguous()
    out = torch.zeros(M, N, dtype=torch.float32, device=x_fp8.device)
    start = 0
    for g, size in enumerate(group_sizes.tolist()):
        rows = slice(start, start + size)
        start += size
        if size == 0:
            continue
        sw = w_scale[g].repeat_interleave(BLOCK, dim=0)[:N]  # [N, nb]: each row of w's block scales
        acc = out[rows]
        for kb in range(nb):
            cols = slice(kb * BLOCK, min(D, (kb + 1) * BLOCK))
            part = xq[rows, cols] @ wq[g, :, cols].t()
            acc += part * (x_scale[rows, kb, None] * sw[None, :, kb])
    return out.to(out_dtype)


def grouped_gemm_fp8_wgrad_torch(dy_fp8: torch.Tensor, dy_scale: torch.Tensor, x_fp8: torch.Tensor,
                                 x_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PyTorch twin of grouped_gemm_fp8_wgrad: per group and per 128-column tile of the transposed operands,
    the fp32 product of the e4m3 values, times dY's column scales (rows of dW) then X's, added in order."""
    N, D, G = dy_fp8.shape[0], x_fp8.shape[0], group_sizes.shape[0]
    dyq, xq = dy_fp8.float().contiguous(), x_fp8.float().contiguous()
    out = torch.zeros(G, N, D, dtype=torch.float32, device=dy_fp8.device)
    tile = 0
    for g, size in enumerate(group_sizes.tolist()):
        for _ in range(_cdiv(size, BLOCK)):
            cols = slice(tile * BLOCK, (tile + 1) * BLOCK)
            out[g] += dyq[:, cols] @ xq[:, cols].t() * dy_scale[tile, :, None] * x_scale[tile, None, :]
            tile += 1
    return out.to(out_dtype)


class _GroupedLinearFp8Twin(torch.autograd.Function):
    """grouped_linear_fp8's forward and backward written with the twins alone (no cache, no ops)."""

    @staticmethod
    def forward(ctx, x, w, group_sizes, src_rows, row_map):
        x_fp8, x_scale = quantize_fp8_rows_torch(x)
        w_fp8, w_scale = quantize_fp8_blocks_torch(w)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows, row_map)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return grouped_gemm_fp8_torch(x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows=src_rows,
                                      out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x_fp8, x_scale, w_fp8, w_scale, group_sizes, src_rows, row_map = ctx.saved_tensors
        dy_fp8, dy_scale = quantize_fp8_rows_torch(dy)
        dx = grouped_gemm_fp8_torch(dy_fp8, dy_scale, w_fp8.transpose(1, 2), w_scale.transpose(1, 2), group_sizes,
                                    out_dtype=ctx.x_dtype)
        if src_rows is not None:
            dx = unpermute_torch(dx, row_map)
        dy_t, dy_ts = quantize_fp8_cols_torch(dy, group_sizes)
        x_t, x_ts = quantize_fp8_cols_torch(x_fp8, group_sizes, x_scale=x_scale, src_rows=src_rows)
        dw = grouped_gemm_fp8_wgrad_torch(dy_t, dy_ts, x_t, x_ts, group_sizes, out_dtype=ctx.w_dtype)
        return dx, dw, None, None, None


def grouped_linear_fp8_torch(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                             src_rows: torch.Tensor | None = None, row_map: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch twin of grouped_linear_fp8 (same quantization at every step, twins only, no weight cache)."""
    return _GroupedLinearFp8Twin.apply(x, w, group_sizes, None if src_rows is None else src_rows.long(), row_map)
