"""Grouped GEMM over experts: y[rows of g] = x[rows of g] @ w[g].T for every group g in one launch.

Shape letters: M rows, N output features, D the reduction (dot) dimension, G groups (K is top-k in the rest of
the package and never a GEMM dimension here).

In: x [M, D] (rows sorted by group), w [G, N, D] (each group an nn.Linear weight, out x in), group_sizes [G]
integer (sum == M, zeros allowed). Out: y [M, N] in x.dtype, accumulated in fp32. Differentiable in x and w:

* forward and input gradient share ``grouped_mm_kernel``; dX = dY @ w[g] passes w.transpose(1, 2) as strides;
* the weight gradient dW[g] = dY[rows g].T @ X[rows g] is grouped along the reduction dimension and has its
  own kernel, which writes every tile, so an empty group's gradient is an exact zero.

``gather_grouped_gemm`` / ``permute_grouped_gemm`` run the same kernels with x's rows read through an index
(x[src_rows]), so the expert-ordered copy of the tokens is neither written nor kept for the backward.

Neither kernel needs the group sizes on the host: each program derives its (group, tile) from the sizes on
the device (see _grouped_gemm_kernels.py), so the forward has no device-to-host sync.

Backends: CUDA tensors run the compiled kernels, autotuned over ``forward_configs()`` / ``wgrad_configs()``
(per dtype) keyed on (N, D) and a power-of-two bucket of rows per group;
``TRITONMOE_GEMM_CONFIG="BM,BN,BD,warps,stages"`` pins one config for both kernels (for the
weight gradient BM is the reduction step and BN x BD the output tile). CPU tensors run the same kernels in
Triton's interpreter when ``TRITON_INTERPRET=1``, else the plain-PyTorch twin ``grouped_gemm_torch``.
The ops are registered with ``torch.library`` (fake + autograd), so they trace under ``torch.compile``.
"""

from typing import NamedTuple

import torch

from ._backend import Backend, backend_for, launch_backend
from .permute import SourceRows, _check_permute_args, _host_checks, _route, _unpermute_op

try:
    import triton

    from ._grouped_gemm_kernels import grouped_mm_kernel, grouped_mm_wgrad_kernel
    from ._tuning import block_g, launch, pinned_config, rows_bucket
except ImportError:  # no Triton wheel for this platform (Linux only): the twin runs everywhere
    triton = None

CONFIG_ENV = "TRITONMOE_GEMM_CONFIG"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GemmConfig(NamedTuple):
    """One tile configuration. For the weight gradient block_m is the reduction step and block_n x block_d
    the output tile of dW[g]."""
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def forward_configs(dtype: torch.dtype = torch.bfloat16, input_precision: str = "tf32") -> list[GemmConfig]:
    """Candidates for grouped_mm_kernel (forward and dX) on Hopper, for DeepSeek-V3's shapes: D=7168 -> N=4096
    (fused gate/up), D=2048 -> N=7168 (down), ~R/E = 512 rows per expert at 16K tokens, fewer at 256 experts
    and small batches. BLOCK_M 64/128 x BLOCK_N 128/256 are wgmma's native 64xN tiles; BLOCK_D 64 is one
    128-byte swizzled bf16 row. 128x256 with 8 warps (two warpgroups, 128 accumulator registers a thread)
    is the large-GEMM shape; 64-row tiles waste less on the ragged last tile of small groups.

    fp32 operands take twice the shared memory a tile: see _fp32_configs."""
    if dtype == torch.float32:
        return _fp32_configs(input_precision, wgrad=False)
    return [
        GemmConfig(128, 256, 64, 8, 3),  # 144 KiB smem: big groups, N=4096/7168
        GemmConfig(128, 128, 64, 8, 4),  # 128 KiB smem: more CTAs when G * tiles is small
        GemmConfig(128, 128, 64, 4, 4),  # one warpgroup, 128 regs of accumulator a thread
        GemmConfig(64, 256, 64, 4, 3),  # small groups (many experts, few tokens) with wide N
        GemmConfig(64, 128, 64, 4, 4),  # smallest: tiny groups, decode-sized batches
    ]


def wgrad_configs(dtype: torch.dtype = torch.bfloat16, input_precision: str = "tf32") -> list[GemmConfig]:
    """Candidates for grouped_mm_wgrad_kernel: output tile BLOCK_N x BLOCK_D of dW[g] ([N, D] = [4096, 7168]
    or [7168, 2048]), reducing over the group's rows 64 at a time; 256 groups x 512 rows means short
    reductions, so the output tile is kept large and pipelining deep enough to cover the few iterations."""
    if dtype == torch.float32:
        return _fp32_configs(input_precision, wgrad=True)
    return [
        GemmConfig(64, 128, 256, 8, 3),  # 144 KiB smem, two warpgroups
        GemmConfig(64, 128, 128, 8, 4),  # 128 KiB smem
        GemmConfig(64, 128, 128, 4, 4),  # one warpgroup
        GemmConfig(64, 256, 128, 8, 3),  # wide N tile for N=7168 (down projection's dW)
    ]


def _fp32_configs(input_precision: str, wgrad: bool) -> list[GemmConfig]:
    """fp32 operands on Hopper (sm_90a compile reports, Triton 3.9, in bench/NOTES.md).

    tf32 (torch.set_float32_matmul_precision("high")): the 16-bit tiles with BLOCK_D halved, the same bytes of
    shared memory per stage; the 16-bit lists as they are need 192-288 KiB, past the 227 KiB an H100 CTA gets,
    so every weight-gradient config failed to launch. "ieee" (torch's default "highest") cannot use wgmma and
    runs on FMA: small tiles, because the 64-256-wide 16-bit tiles spill 13-19 KB a thread there."""
    if input_precision != "ieee":
        if wgrad:
            return [GemmConfig(64, 128, 128, 8, 3), GemmConfig(64, 128, 64, 8, 4), GemmConfig(64, 128, 64, 4, 4),
                    GemmConfig(32, 128, 128, 8, 3)]
        return [GemmConfig(128, 256, 32, 8, 3), GemmConfig(128, 128, 32, 8, 4), GemmConfig(128, 128, 32, 4, 4),
                GemmConfig(64, 256, 32, 4, 3), GemmConfig(64, 128, 32, 4, 4)]
    if wgrad:
        return [GemmConfig(32, 64, 32, 4, 2), GemmConfig(32, 64, 64, 4, 2)]
    return [GemmConfig(32, 64, 32, 4, 2), GemmConfig(64, 64, 16, 4, 2)]


# Small tiles under the interpreter: every program runs in Python, and tests use tiny shapes.
INTERPRETER_CONFIG = GemmConfig(32, 32, 32, 4, 1)
SWIZZLE_M = 8


def _pinned_config() -> GemmConfig | None:
    return pinned_config(CONFIG_ENV, GemmConfig, "BM,BN,BD,warps,stages", 3)


# ----------------------------------------------------------------------------------------------- launchers

_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_D")


def _launch(kernel, configs_fn, key: list[str], grid_fn, args: tuple, dtype: torch.dtype, bucket: int,
            interpret: bool, **constexprs) -> None:
    # Follows torch's own fp32 matmul setting: "highest" (torch's default) keeps full fp32 products.
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    launch(kernel, grid_fn, args, names=_BLOCKS, key=key, bucket=bucket, interpret=interpret,
           interpreter_config=INTERPRETER_CONFIG, pinned=_pinned_config(), configs=lambda: configs_fn(dtype, precision),
           interpret_kw=dict(UPCAST=True, INPUT_PRECISION="ieee"),
           compiled_kw=dict(UPCAST=False, INPUT_PRECISION=precision), **constexprs)


def _grouped_mm_launch(a: torch.Tensor, b: torch.Tensor, group_sizes: torch.Tensor,
                       out: torch.Tensor | None = None, a_rows: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows of g] = a[rows of g] @ b[g].T; a [M, D], b [G, N, D] any strides, out [M, N] in a.dtype.
    With `a_rows` (int64 [M]) logical row m is a[a_rows[m]] and a may have any number of rows.
    `out` (tests pass it pre-filled with NaN) is written in full, so unwritten rows would show."""
    M, D = a.shape if a_rows is None else (a_rows.shape[0], a.shape[1])
    G, N, _ = b.shape
    if out is None:
        out = a.new_empty(M, N)
    if M == 0 or N == 0:
        return out
    if D == 0:
        return out.zero_()
    group_sizes = group_sizes.contiguous()  # G integers; the kernels read them as one vector
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + G) * triton.cdiv(N, meta["BLOCK_N"]),)
    # stride_bd in the key: the forward (w, D-major) and the input gradient (w.transpose(1, 2)) of one shape
    # are different GEMMs to tune; it is 1 for the first and the weight's row length for the second.
    # GATHER_A in the key: a gathered A loads rows through an index and may prefer another tile.
    _launch(grouped_mm_kernel, forward_configs, ["N", "D", "stride_bd", "GATHER_A"], grid,
            (a, group_sizes if a_rows is None else a_rows, b, out, group_sizes, M, N, D, G, a.stride(0),
             a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1)),
            a.dtype, rows_bucket(M, G), launch_backend(a) is Backend.INTERPRETER, BLOCK_G=block_g(G), SWIZZLE_M=SWIZZLE_M,
            GATHER_A=a_rows is not None)
    return out


def _grouped_mm_wgrad_launch(dy: torch.Tensor, x: torch.Tensor, group_sizes: torch.Tensor, num_groups: int,
                             out: torch.Tensor | None = None, x_rows: torch.Tensor | None = None) -> torch.Tensor:
    """dw[g] = dy[rows of g].T @ x[rows of g]; dy [M, N], x [M, D] -> dw [G, N, D] in x.dtype, every element
    written (empty groups get zeros). With `x_rows` (int64 [M]) row m of the forward input is x[x_rows[m]]."""
    M, N = dy.shape
    D = x.shape[1]
    G = num_groups
    if out is None:
        out = x.new_empty(G, N, D)
    if G == 0 or N == 0 or D == 0:
        return out
    if M == 0:
        return out.zero_()
    group_sizes = group_sizes.contiguous()  # G integers; the kernels read them as one vector
    grid = lambda meta: (G * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(D, meta["BLOCK_D"]),)
    _launch(grouped_mm_wgrad_kernel, wgrad_configs, ["N", "D", "GATHER_X"], grid,
            (dy, x, group_sizes if x_rows is None else x_rows, out, group_sizes, M, N, D, G, dy.stride(0),
             dy.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2)),
            x.dtype, rows_bucket(M, G), launch_backend(x) is Backend.INTERPRETER, BLOCK_G=block_g(G), GATHER_X=x_rows is not None)
    return out


# ------------------------------------------------------------------------------------------------ checks

def _check_args(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> None:
    """Sync-free checks: ranks, shapes, dtypes, devices (valid on fake tensors under torch.compile too)."""
    for name, t in (("x", x), ("w", w), ("group_sizes", group_sizes)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"grouped_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"grouped_gemm: x must be [M, D], got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"grouped_gemm: w must be [G, N, D], got shape {tuple(w.shape)}")
    if group_sizes.dim() != 1:
        raise ValueError(f"grouped_gemm: group_sizes must be [G], got shape {tuple(group_sizes.shape)}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"grouped_gemm: w.shape[2]={w.shape[2]} != x.shape[1]={x.shape[1]} "
                         f"(x {tuple(x.shape)}, w {tuple(w.shape)})")
    if group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_gemm: len(group_sizes)={group_sizes.shape[0]} != w.shape[0]={w.shape[0]}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"grouped_gemm: x.dtype={x.dtype} unsupported (float32, float16, bfloat16)")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_gemm: w.dtype={w.dtype} != x.dtype={x.dtype}; cast the weights first")
    if group_sizes.dtype.is_floating_point or group_sizes.dtype.is_complex or group_sizes.dtype == torch.bool:
        raise ValueError(f"grouped_gemm: group_sizes.dtype={group_sizes.dtype} must be an integer type")
    if not (x.device == w.device == group_sizes.device):
        raise ValueError(f"grouped_gemm: tensors on different devices: x on {x.device}, w on {w.device}, "
                         f"group_sizes on {group_sizes.device}")


def _check_sizes(group_sizes: torch.Tensor, M: int) -> None:
    """Every size in [0, M] and the sizes summing to M. Bounding each size by M first also keeps the int64 sum
    from wrapping around to M ([2**62, 2**62, 2**62, 2**62 + 16] sums to 16). Eager CPU: ValueError naming the
    values. CUDA or compiled: an asynchronous device assert (no host sync, no graph break); the kernels clamp
    sizes to [0, M] and mask rows >= M, so bad sizes never reach memory out of bounds before it fires."""
    if group_sizes.numel() == 0:
        ok = torch.tensor(M == 0, device=group_sizes.device)
    else:
        ok = (group_sizes >= 0).all() & (group_sizes <= M).all() & (group_sizes.sum() == M)
    if not _host_checks(group_sizes):
        torch._assert_async(ok, "grouped_gemm: group sizes must lie in [0, x.shape[0]] and sum to x.shape[0]")
        return
    if bool(ok):
        return
    if bool((group_sizes < 0).any()):
        raise ValueError(f"grouped_gemm: negative group sizes {group_sizes[group_sizes < 0].tolist()}")
    if bool((group_sizes > M).any()):
        raise ValueError(f"grouped_gemm: group sizes {group_sizes[group_sizes > M].tolist()} exceed the M={M} rows "
                         "of x")
    raise ValueError(f"grouped_gemm: group_sizes sum to {int(group_sizes.sum())}, but x has M={M} rows")


# ------------------------------------------------------------------------------ torch.library ops + autograd
# Forward ops carry their own autograd (so a direct call is differentiable), but the public functions call them
# with w detached and take dW from a separate autograd node (_WeightGradLink): the input gradient and the weight
# gradient are then two nodes, and a zero-bubble pipeline schedule, which runs an input-gradient pass and a
# weight-gradient pass over the same graph, runs each GEMM once per pass instead of both GEMMs in both passes.
# On the twin backend the ops compute with the twins: eager CPU calls never get here (they differentiate the
# twin itself), but a torch.compile'd graph does, so that the twin's host read of the group sizes happens inside
# an op the graph does not trace (no graph break on the CPU path).

@torch.library.custom_op("tritonmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    if backend_for(x) is Backend.TWIN:
        return grouped_gemm_torch(x, w, group_sizes)
    return _grouped_mm_launch(x, w, group_sizes)


@_grouped_mm_op.register_fake
def _(x, w, group_sizes):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("tritonmoe::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(dy: torch.Tensor, x: torch.Tensor, group_sizes: torch.Tensor,
                         x_rows: torch.Tensor | None = None) -> torch.Tensor:
    if backend_for(x) is Backend.TWIN:
        return _wgrad_twin(dy, x if x_rows is None else x.index_select(0, x_rows), group_sizes)
    return _grouped_mm_wgrad_launch(dy, x, group_sizes, group_sizes.shape[0], x_rows=x_rows)


@_grouped_mm_wgrad_op.register_fake
def _(dy, x, group_sizes, x_rows=None):
    return x.new_empty(group_sizes.shape[0], dy.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, group_sizes = inputs
    ctx.save_for_backward(x, w, group_sizes)


def _backward(ctx, dy):
    x, w, group_sizes = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dX[rows g] = dY[rows g] @ w[g]: the forward kernel with w's last two strides swapped.
        dx = _grouped_mm_op(dy, w.transpose(1, 2), group_sizes)
    if ctx.needs_input_grad[1]:
        dw = _grouped_mm_wgrad_op(dy, x, group_sizes)
    return dx, dw, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("tritonmoe::gather_grouped_mm", mutates_args=())
def _gather_grouped_mm_op(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, src_rows: torch.Tensor,
                          row_map: torch.Tensor) -> torch.Tensor:
    """y [M, N]: y[m] = x[src_rows[m]] @ w[g(m)].T. row_map [S, C] is src_rows' inverse (used by the
    backward): every row m appears in it exactly once, at a position (s, c) with src_rows[m] = s."""
    if backend_for(x) is Backend.TWIN:
        return gather_grouped_gemm_torch(x, w, group_sizes, src_rows, row_map)
    return _grouped_mm_launch(x, w, group_sizes, a_rows=src_rows)


@_gather_grouped_mm_op.register_fake
def _(x, w, group_sizes, src_rows, row_map):
    return x.new_empty(src_rows.shape[0], w.shape[1])


def _gather_setup_context(ctx, inputs, output):
    x, w, group_sizes, src_rows, row_map = inputs
    ctx.save_for_backward(x, w, group_sizes, src_rows, row_map)  # x [S, D], not the gathered [M, D]


def _gather_backward(ctx, dy):
    x, w, group_sizes, src_rows, row_map = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dX[s] = sum over the rows m gathered from s of dA[m]: the GEMM's own input gradient dA [M, D],
        # summed back through row_map by the unpermute kernel (no atomics, so deterministic).
        dx = _unpermute_op(_grouped_mm_op(dy, w.transpose(1, 2), group_sizes), row_map, None)
    if ctx.needs_input_grad[1]:
        dw = _grouped_mm_wgrad_op(dy, x, group_sizes, src_rows)
    return dx, dw, None, None, None


_gather_grouped_mm_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


class _WeightGradLink(torch.autograd.Function):
    """The weight gradient of one grouped GEMM as its own autograd node: forward returns a zero-stride [M, N]
    stand-in for y (no memory), backward receives dY through it and computes dW[g] = dY[rows g].T @ x[rows g]
    (x read through x_rows when the GEMM gathered its rows)."""

    @staticmethod
    def forward(ctx, w, x, group_sizes, x_rows, M, N, dtype):
        ctx.save_for_backward(x, group_sizes, x_rows)
        return w.new_zeros((), dtype=dtype).expand(M, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, group_sizes, x_rows = ctx.saved_tensors
        return _grouped_mm_wgrad_op(dy, x, group_sizes, x_rows), None, None, None, None, None, None


class _JoinWeightGrad(torch.autograd.Function):
    """y unchanged; in backward dY goes both to the GEMM's input-gradient node and to its _WeightGradLink."""

    @staticmethod
    def forward(ctx, y, link):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy, dy


def _with_weight_grad(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor, group_sizes: torch.Tensor,
                      x_rows: torch.Tensor | None = None) -> torch.Tensor:
    """y, with w's gradient wired through a node of its own (see the section comment)."""
    if not (w.requires_grad and torch.is_grad_enabled()):
        return y
    # x detached: the link's only autograd edge is w's, so an input-gradient pass (autograd.grad w.r.t. the
    # activations) never runs it; with x attached it did, and a zero-bubble schedule computed dW twice.
    return _JoinWeightGrad.apply(y, _WeightGradLink.apply(w, x.detach(), group_sizes, x_rows, y.shape[0],
                                                          y.shape[1], y.dtype))


def _grouped_gemm_kernels(x, w, group_sizes):
    return _with_weight_grad(_grouped_mm_op(x, w.detach(), group_sizes), w, x, group_sizes)


def _gather_grouped_gemm_kernels(x, w, group_sizes, src_rows, row_map):
    return _with_weight_grad(_gather_grouped_mm_op(x, w.detach(), group_sizes, src_rows, row_map), w, x,
                             group_sizes, src_rows)


# ------------------------------------------------------------------------------------------------- public

def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[g].T.

    x [M, D] rows sorted by group; w [G, N, D]; group_sizes integer [G], each in [0, M], summing to M (empty
    groups allowed). Returns y [M, N] in x.dtype with fp32 accumulation; differentiable in x and w. x and w
    must share a dtype (float32, float16 or bfloat16) and a device. Raises ValueError naming the offending
    value, whichever backend runs.
    """
    _check_args(x, w, group_sizes)
    _check_sizes(group_sizes, x.shape[0])
    if backend_for(x) is Backend.TWIN and not torch.compiler.is_compiling():
        return grouped_gemm_torch(x, w, group_sizes)
    return _grouped_gemm_kernels(x, w, group_sizes)


def _check_gather(x: torch.Tensor, src_rows: torch.Tensor, row_map: torch.Tensor) -> None:
    """Shapes, dtypes and devices of a gather's index pair; on eager CPU also that they are inverse to each other
    (on CUDA that read would sync: the kernel masks nothing by them, so callers must pass permute's)."""
    for name, t in (("src_rows", src_rows), ("row_map", row_map)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"gather_grouped_gemm: {name} must be an int32/int64 tensor")
        if t.device != x.device:
            raise ValueError(f"gather_grouped_gemm: {name} is on {t.device} but x is on {x.device}")
    if src_rows.dim() != 1:
        raise ValueError(f"gather_grouped_gemm: src_rows must be [M], got shape {tuple(src_rows.shape)}")
    if row_map.dim() != 2 or row_map.shape[0] != x.shape[0] or row_map.numel() != src_rows.numel():
        raise ValueError(f"gather_grouped_gemm: row_map must be [S, C] with S = x.shape[0] = {x.shape[0]} and "
                         f"S * C = len(src_rows) = {src_rows.numel()}, got shape {tuple(row_map.shape)}")
    if _host_checks(x) and src_rows.numel():
        flat, M = row_map.reshape(-1).long(), src_rows.numel()
        owner = torch.arange(x.shape[0]).repeat_interleave(row_map.shape[1])
        # In range, each row once, and each row's source is the token that maps to it (in this order: the
        # later checks index with flat).
        if not (bool(((flat >= 0) & (flat < M)).all()) and bool((torch.bincount(flat, minlength=M) == 1).all())
                and torch.equal(src_rows.long()[flat], owner)):
            raise ValueError("gather_grouped_gemm: src_rows and row_map are not inverse to each other "
                             "(src_rows[row_map[s, c]] must be s, each row once)")


def gather_grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, src_rows: torch.Tensor,
                        row_map: torch.Tensor) -> torch.Tensor:
    """grouped_gemm(x[src_rows], w, group_sizes) without materialising x[src_rows]: the gather runs in the
    GEMM's operand loads, and autograd keeps x itself rather than the gathered [M, D] copy.

    x [S, D]; src_rows int [M] (row m of the GEMM input is x[src_rows[m]], rows grouped as group_sizes says);
    row_map int [S, C], src_rows' inverse: each m appears once, at (s, c) with src_rows[m] = s (permute's
    row_map is exactly this for src_rows = the token of each sorted row; a bijection is C = 1).
    Returns y [M, N]; differentiable in x (dX summed through row_map, no atomics) and w. The same checks run on
    every backend.
    """
    _check_args(x, w, group_sizes)
    _check_gather(x, src_rows, row_map)
    _check_sizes(group_sizes, src_rows.shape[0])
    return gather_grouped_gemm_unchecked(x, w, group_sizes, SourceRows(src_rows.long(), row_map))


def gather_grouped_gemm_unchecked(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor,
                                  src: SourceRows) -> torch.Tensor:
    """gather_grouped_gemm for callers whose index pair is right by construction (``route``, the expert-parallel
    dispatcher): no value checks (the inverse-map check alone is a bincount over every row on CPU)."""
    if backend_for(x) is Backend.TWIN and not torch.compiler.is_compiling():
        return gather_grouped_gemm_torch(x, w, group_sizes, src.index, src.inverse)
    return _gather_grouped_gemm_kernels(x, w, group_sizes, src.index, src.inverse)


def gather_grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, src_rows: torch.Tensor,
                              row_map: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of gather_grouped_gemm: index_select, then grouped_gemm_torch (row_map is not needed)."""
    return grouped_gemm_torch(x.index_select(0, src_rows.long()), w, group_sizes)


def permute_grouped_gemm(x: torch.Tensor, topk_idx: torch.Tensor, w: torch.Tensor):
    """The first expert GEMM with the permute fused into it: returns (y_sorted, group_sizes, row_map) equal to

        x_sorted, group_sizes, row_map = permute(x, topk_idx, w.shape[0])
        y_sorted = grouped_gemm(x_sorted, w, group_sizes)

    but x_sorted [T*K, H] is never written: the GEMM reads each token's row of x [T, H] once per expert it
    chose, and autograd keeps x instead of x_sorted (T*K*H elements less per MoE layer: 1.75 GiB at
    DeepSeek-V3's T = 16K in bf16). y_sorted, group_sizes and row_map keep permute's contract (expert
    order, then token order), so the rest of the layer (activation, second GEMM, unpermute) is unchanged.
    Differentiable in x and w.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"permute_grouped_gemm: w must be a [E, N, H] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    E = _check_permute_args(x, topk_idx, w.shape[0])
    group_sizes, row_map, src_rows = _route(topk_idx, E)
    src = SourceRows(src_rows, row_map)
    _check_args(x, w, group_sizes)
    return gather_grouped_gemm_unchecked(x, w, group_sizes, src), group_sizes, src.inverse


def _wgrad_twin(dy: torch.Tensor, x: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """dw[g] = dy[rows g].T @ x[rows g] in fp32, rounded once to x.dtype; zeros for empty groups (no autograd)."""
    sizes = group_sizes.tolist()
    dw = [torch.mm(dy_g.float().t(), x_g.float()) for dy_g, x_g in zip(dy.split(sizes), x.split(sizes))]
    return torch.stack(dw).to(x.dtype) if dw else x.new_zeros(0, dy.shape[1], x.shape[1])


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of grouped_gemm (same contract; reads the sizes on the host, one mm per group).

    The reference for the tests and the CPU path of the training example; autograd differentiates it.
    Products are taken in fp32 and rounded once to x.dtype, like the kernels.
    """
    sizes = group_sizes.tolist()
    # unbind rather than w[g]: the backward of G selects builds G zero tensors of w's full size and adds
    # them (forward + backward 1.4x slower at G=16, M=4096 on one CPU thread); unbind's backward is one stack.
    outs = [torch.mm(xg.float(), wg.float().t()) for xg, wg in zip(torch.split(x, sizes), w.unbind(0))]
    if not outs:
        return x.new_empty(x.shape[0], w.shape[1])
    return torch.cat(outs).to(x.dtype)
