"""Grouped GEMM kernels (run through Triton's interpreter on CPU) against the PyTorch twin.

Forward, input gradient and weight gradient are each checked by calling the launcher with a NaN-poisoned
output, so rows a kernel forgets to write show up; the public autograd path is checked end to end.
"""

import contextlib
import importlib

import pytest
import torch

from helpers import assert_close, poison_
from tritonmoe.kernels import Backend, backend_for, force_twins, grouped_gemm, grouped_gemm_torch
from tritonmoe.kernels.grouped_gemm import _grouped_mm_launch, _grouped_mm_wgrad_launch
from tritonmoe.kernels import _tuning

# The package re-exports the function under the module's name, so reach the module itself this way.
gg_module = importlib.import_module("tritonmoe.kernels.grouped_gemm")

# dtype with its tolerance (max relative, rms relative): fp32 products are exact up to summation order;
# 16-bit outputs are rounded once from fp32 (the interpreter truncates fp32 -> bf16: up to 2^-8 relative).
DTYPES = [
    pytest.param(torch.float32, 1e-5, 3e-6, id="fp32"),
    pytest.param(torch.float16, 2e-3, 5e-4, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 5e-3, id="bf16"),
]

# (group sizes, K, N); the interpreter's tiles are 32 x 32 x 32, so 45/50/37 are multiples of no block.
SHAPES = [
    pytest.param([37], 45, 50, id="G1"),  # one group, ragged in every dimension
    pytest.param([0, 37, 5, 0, 70, 1, 0], 45, 50, id="G7-prime-empty-first-last"),  # prime G, empties at ends
    pytest.param([0, 0, 91, 0, 0], 33, 20, id="all-rows-one-group"),  # one group holds every row; N < tile
    pytest.param([32, 64, 1], 64, 32, id="block-multiples"),  # sizes and dims exactly on tile edges, plus one
    pytest.param("G64", 40, 24, id="G64"),  # 64 groups, random sizes incl. zeros, more groups than m-tiles
    pytest.param([0, 1], 17, 3, id="one-row"),  # M = 1, tiny N and K
    pytest.param([0, 0, 0], 16, 16, id="M0"),  # no rows at all
]


def _sizes(spec) -> torch.Tensor:
    if spec == "G64":
        sizes = torch.randint(0, 7, (64,))
        sizes[::5] = 0  # every fifth group empty
        return sizes
    return torch.tensor(spec, dtype=torch.int64)


def _inputs(spec, K, N, dtype):
    sizes = _sizes(spec)
    M, G = int(sizes.sum()), len(sizes)
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(G, N, K) / K**0.5).to(dtype)
    return x, w, sizes


def _twin_grads(x, w, sizes, dy):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = grouped_gemm_torch(xr, wr, sizes)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("dtype,tol,rms", DTYPES)
@pytest.mark.parametrize("spec,K,N", SHAPES)
def test_forward(spec, K, N, dtype, tol, rms):
    x, w, sizes = _inputs(spec, K, N, dtype)
    out = poison_(torch.empty(x.shape[0], N, dtype=dtype))
    y = _grouped_mm_launch(x, w, sizes, out=out)
    assert y is out
    assert_close(y, grouped_gemm_torch(x, w, sizes), tol, rms, what="forward")


@pytest.mark.parametrize("dtype,tol,rms", DTYPES)
@pytest.mark.parametrize("spec,K,N", SHAPES)
def test_input_grad(spec, K, N, dtype, tol, rms):
    x, w, sizes = _inputs(spec, K, N, dtype)
    dy = torch.randn(x.shape[0], N).to(dtype)
    _, dx_ref, _ = _twin_grads(x, w, sizes, dy)
    dx = poison_(torch.empty_like(x))
    _grouped_mm_launch(dy, w.transpose(1, 2), sizes, out=dx)  # the backward's own call
    assert_close(dx, dx_ref, tol, rms, what="dX")


@pytest.mark.parametrize("dtype,tol,rms", DTYPES)
@pytest.mark.parametrize("spec,K,N", SHAPES)
def test_weight_grad(spec, K, N, dtype, tol, rms):
    x, w, sizes = _inputs(spec, K, N, dtype)
    dy = torch.randn(x.shape[0], N).to(dtype)
    _, _, dw_ref = _twin_grads(x, w, sizes, dy)
    dw = poison_(torch.empty_like(w))
    _grouped_mm_wgrad_launch(dy, x, sizes, len(sizes), out=dw)
    assert_close(dw, dw_ref, tol, rms, what="dW")
    empty = sizes == 0
    if empty.any():
        assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "empty groups must get exact zero dW"


@pytest.mark.parametrize("dtype,tol,rms", DTYPES)
@pytest.mark.parametrize("spec,K,N", [SHAPES[1], SHAPES[6]])  # the wiring: ragged with empties, and M = 0
def test_autograd_matches_twin(spec, K, N, dtype, tol, rms):
    x, w, sizes = _inputs(spec, K, N, dtype)
    dy = torch.randn(x.shape[0], N).to(dtype)
    y_ref, dx_ref, dw_ref = _twin_grads(x, w, sizes, dy)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_gemm(xk, wk, sizes)
    y.backward(dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, tol, rms, what="forward")
    assert_close(xk.grad, dx_ref, tol, rms, what="dX")
    assert_close(wk.grad, dw_ref, tol, rms, what="dW")
    assert torch.equal(wk.grad[sizes == 0], torch.zeros_like(wk.grad[sizes == 0]))


def test_non_contiguous_inputs():
    # x: every other column of a wider tensor; w: stored [G, K, N] and viewed as [G, N, K]; sizes: a strided
    # int32 view. All reach the kernels as strides, no copies.
    sizes = torch.tensor([5, 0, 40, 12, 0, 3], dtype=torch.int32)
    M, G, K, N = int(sizes.sum()), 6, 36, 44
    x_wide = torch.randn(M, 2 * K)
    x = x_wide[:, ::2]
    w = torch.randn(G, K, N).transpose(1, 2)
    sizes_view = torch.stack([sizes, sizes], dim=1)[:, 0]
    assert not x.is_contiguous() and not w.is_contiguous() and not sizes_view.is_contiguous()
    dy = torch.randn(N, M).t()  # the incoming gradient can be strided too
    y_ref, dx_ref, dw_ref = _twin_grads(x.contiguous(), w.contiguous(), sizes, dy.contiguous())
    xk, wk = x_wide.clone().requires_grad_(), w.detach().requires_grad_()
    y = grouped_gemm(xk[:, ::2], wk, sizes_view)
    y.backward(dy)
    assert_close(y, y_ref, 1e-5, what="forward")
    assert_close(xk.grad[:, ::2], dx_ref, 1e-5, what="dX")
    assert torch.equal(xk.grad[:, 1::2], torch.zeros(M, K))
    assert_close(wk.grad, dw_ref, 1e-5, what="dW")


@pytest.mark.parametrize("config", [
    "16,64,16,4,1",  # 16-row tiles: several m-tiles per group and swizzle bands that straddle groups
    "64,16,64,4,1",  # one m-tile can hold several small groups' rows (masked to its own group)
])
def test_pinned_config(monkeypatch, config):
    monkeypatch.setenv(gg_module.CONFIG_ENV, config)
    sizes = torch.tensor([3, 0, 50, 17, 0, 1, 29])
    x, w = torch.randn(int(sizes.sum()), 40), torch.randn(7, 33, 40)
    dy = torch.randn(x.shape[0], 33)
    y_ref, dx_ref, dw_ref = _twin_grads(x, w, sizes, dy)
    assert_close(_grouped_mm_launch(x, w, sizes, out=poison_(torch.empty_like(y_ref))), y_ref, 1e-5)
    assert_close(_grouped_mm_launch(dy, w.transpose(1, 2), sizes, out=poison_(torch.empty_like(x))), dx_ref, 1e-5)
    assert_close(_grouped_mm_wgrad_launch(dy, x, sizes, 7, out=poison_(torch.empty_like(w))), dw_ref, 1e-5)


@pytest.mark.parametrize("config", ["128,128", "a,b,c,d,e", "48,64,64,4,3"])
def test_bad_pinned_config(monkeypatch, config):
    monkeypatch.setenv(gg_module.CONFIG_ENV, config)
    with pytest.raises(ValueError, match=gg_module.CONFIG_ENV):
        grouped_gemm(torch.randn(4, 16), torch.randn(1, 16, 16), torch.tensor([4]))


@pytest.mark.parametrize("sizes", [
    [10, 20, 30],  # sums to 60 > M = 20: the kernels must mask rows >= M
    [30, -10, 0],  # negative size: clamped in-kernel, can never move a pointer backwards
])
def test_bad_sizes_never_write_out_of_bounds(sizes):
    # The public op rejects these (ValueError on CPU, async assert on CUDA) before launching; this drives the
    # launchers directly to show that even then nothing past row M is touched.
    sizes = torch.tensor(sizes)
    M, K, N = 20, 32, 32
    x, w = torch.randn(M, K), torch.randn(3, N, K)
    y_buf = poison_(torch.empty(M + 8, N))
    _grouped_mm_launch(x, w, sizes, out=y_buf[:M])
    assert torch.isnan(y_buf[M:]).all(), "rows past M were written"
    dw = _grouped_mm_wgrad_launch(torch.randn(M, N), x, sizes, 3)
    assert torch.isfinite(dw).all()


def test_backend_choice(monkeypatch):
    # CPU + TRITON_INTERPRET=1 runs the Triton kernels; CPU under force_twins() (or without it) runs the twin.
    calls = []
    twin = gg_module.grouped_gemm_torch
    monkeypatch.setattr(gg_module, "grouped_gemm_torch", lambda *a: calls.append(1) or twin(*a))
    x, w, sizes = torch.randn(9, 16), torch.randn(2, 8, 16), torch.tensor([4, 5])
    gg_module.grouped_gemm(x, w, sizes)
    assert calls == [] and backend_for(x) is Backend.INTERPRETER
    with force_twins():
        assert backend_for(x) is Backend.TWIN
        y = gg_module.grouped_gemm(x, w, sizes)
    assert backend_for(x) is Backend.INTERPRETER
    assert calls == [1]
    assert_close(y, twin(x, w, sizes), 1e-6)


def test_torch_library_registration():
    # Schema, fake (meta) kernel and autograd registration as torch.compile would use them.
    x, w, sizes = torch.randn(11, 16), torch.randn(3, 8, 16, requires_grad=True), torch.tensor([6, 0, 5])
    torch.library.opcheck(gg_module._grouped_mm_op, (x.requires_grad_(), w, sizes),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


_X, _W, _S = torch.randn(6, 8), torch.randn(2, 4, 8), torch.tensor([2, 4])
BAD_INPUTS = [
    pytest.param(_X[0], _W, _S, r"x must be \[M, D\], got shape \(8,\)", id="x-1d"),
    pytest.param(_X, _W[0], _S, r"w must be \[G, N, D\], got shape \(4, 8\)", id="w-2d"),
    pytest.param(_X, _W, _S[None], r"group_sizes must be \[G\], got shape \(1, 2\)", id="sizes-2d"),
    pytest.param(_X, torch.randn(2, 4, 7), _S, r"w.shape\[2\]=7 != x.shape\[1\]=8", id="K-mismatch"),
    pytest.param(_X, _W, torch.tensor([2, 4, 0]), r"len\(group_sizes\)=3 != w.shape\[0\]=2", id="G-mismatch"),
    pytest.param(_X.double(), _W.double(), _S, r"x.dtype=torch.float64 unsupported", id="float64"),
    pytest.param(_X.to(torch.int32), _W, _S, r"x.dtype=torch.int32 unsupported", id="int-x"),
    pytest.param(_X.bfloat16(), _W, _S, r"w.dtype=torch.float32 != x.dtype=torch.bfloat16", id="mixed-dtype"),
    pytest.param(_X, _W, _S.float(), r"group_sizes.dtype=torch.float32 must be an integer", id="float-sizes"),
    pytest.param(_X, _W, torch.tensor([True, False]), r"group_sizes.dtype=torch.bool", id="bool-sizes"),
    pytest.param(_X, _W.to("meta"), _S, r"different devices: x on cpu, w on meta", id="devices"),
    pytest.param(_X, _W, torch.tensor([7, -1]), r"negative group sizes \[-1\]", id="negative"),
    pytest.param(_X, _W, torch.tensor([2, 5]), r"sum to 7, but x has M=6 rows", id="sum-too-big"),
    pytest.param(_X, _W, torch.tensor([2, 3]), r"sum to 5, but x has M=6 rows", id="sum-too-small"),
]


@pytest.mark.parametrize("x,w,sizes,msg", BAD_INPUTS)
@pytest.mark.parametrize("twin", [False, True], ids=["kernel", "twin"])
def test_value_errors(twin, x, w, sizes, msg):
    with force_twins() if twin else contextlib.nullcontext(), pytest.raises(ValueError, match=msg):
        grouped_gemm(x, w, sizes)


def test_twin_empty_and_zero_rows():
    # The twin is the CPU training path: M = 0 and empty groups keep shapes and give zero weight grads.
    w = torch.randn(3, 5, 4, requires_grad=True)
    y = grouped_gemm_torch(torch.randn(0, 4), w, torch.tensor([0, 0, 0]))
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))



class _RecordingTuner:
    """Stands in for triton.autotune(...)(kernel): records the launch instead of compiling."""

    def __init__(self, log, kernel, configs, names, key, bucket):
        self.log, self.entry = log, dict(kernel=kernel, configs=list(configs), key=tuple(key), bucket=bucket)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append(self.entry | dict(dtype=args[0].dtype,
                                                                      precision=kw["INPUT_PRECISION"]))


def test_compiled_path_config_choice(monkeypatch):
    # The CUDA branch of _launch cannot run here; record what it hands triton.autotune. fp32 under torch's
    # default "highest" gets the FMA tiles and under "high" the tf32 ones (the 16-bit lists overflow an
    # H100's shared memory in fp32); every rows-per-group bucket tunes on its own; a pin is one config.
    log = []
    monkeypatch.setattr(_tuning, "autotuned", lambda *a: _RecordingTuner(log, *a))
    monkeypatch.setattr(gg_module, "launch_backend", lambda t: Backend.COMPILED)
    saved = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for dtype in (torch.bfloat16, torch.float32):
                for sizes in (torch.tensor([100, 0, 60]), torch.tensor([5000, 0, 1000])):  # 53 / 2000 rows a group
                    x, w = torch.empty(int(sizes.sum()), 16, dtype=dtype), torch.empty(3, 8, 16, dtype=dtype)
                    _grouped_mm_launch(x, w, sizes)
                    _grouped_mm_wgrad_launch(torch.empty(x.shape[0], 8, dtype=dtype), x, sizes, 3)
        monkeypatch.setenv(gg_module.CONFIG_ENV, "64,64,32,4,2")
        _grouped_mm_launch(x, w, sizes)
    finally:
        torch.set_float32_matmul_precision(saved)
    *tuned, pinned = log
    assert len(tuned) == 16 and {e["bucket"] for e in tuned} == {64, 2048}
    for e in tuned:
        wgrad = e["key"] == ("N", "D", "GATHER_X")
        precision = "ieee" if e["dtype"] == torch.float32 and e in tuned[:8] else "tf32"
        if e["dtype"] == torch.float32:
            assert e["precision"] == precision
        configs_fn = gg_module.wgrad_configs if wgrad else gg_module.forward_configs
        assert e["configs"] == configs_fn(e["dtype"], e["precision"]), e
        assert wgrad or e["key"] == ("N", "D", "stride_bd", "GATHER_A")
    assert gg_module.forward_configs(torch.float32, "ieee") != gg_module.forward_configs(torch.float32, "tf32")
    assert gg_module.forward_configs(torch.float32, "tf32") != gg_module.forward_configs(torch.bfloat16)
    assert pinned["configs"] == [gg_module.GemmConfig(64, 64, 32, 4, 2)] and pinned["bucket"] == 0


# ---------------------------------------------------------------------------------------------------------
# Rows of x read through an index: gather_grouped_gemm and the permute fused into the first expert GEMM.

@pytest.mark.parametrize("dtype,tol,rms", DTYPES)
@pytest.mark.parametrize("spec,K,N", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[6]])
def test_gathered_launchers_poisoned(spec, K, N, dtype, tol, rms):
    # Any gather (rows repeated, some never read): forward and weight gradient against the gathered copy.
    sizes = _sizes(spec)
    M, G = int(sizes.sum()), len(sizes)
    x = torch.randn(M // 2 + 1, K).to(dtype)
    rows = torch.randint(0, x.shape[0], (M,))
    w = (torch.randn(G, N, K) / K**0.5).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    y_ref, _, dw_ref = _twin_grads(x[rows], w, sizes, dy)
    y = _grouped_mm_launch(x, w, sizes, out=poison_(torch.empty(M, N, dtype=dtype)), a_rows=rows)
    assert_close(y, y_ref, tol, rms, what="gathered forward")
    dw = _grouped_mm_wgrad_launch(dy, x, sizes, G, out=poison_(torch.empty_like(w)), x_rows=rows)
    assert_close(dw, dw_ref, tol, rms, what="gathered dW")


def _routing(T, K, E):
    return torch.rand(T, E).topk(K, dim=1).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_permute_grouped_gemm_equals_permute_then_grouped_gemm(dtype):
    # Same products in the same order as the unfused pair, so forward and every gradient are bit-equal; only
    # what autograd keeps differs: x [T, H] instead of x_sorted [T*K, H].
    T, K, E, H, N = 23, 3, 5, 40, 24
    from tritonmoe.kernels import permute, permute_grouped_gemm

    topk_idx = _routing(T, K, E)
    x0, w0 = torch.randn(T, H).to(dtype), (torch.randn(E, N, H) / H**0.5).to(dtype)
    x1, w1 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    x_sorted, sizes_ref, rm_ref = permute(x1, topk_idx, E)
    y_ref = grouped_gemm(x_sorted, w1, sizes_ref)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y, sizes, rm = permute_grouped_gemm(x2, topk_idx, w2)
    assert torch.equal(y, y_ref) and torch.equal(sizes, sizes_ref) and torch.equal(rm, rm_ref)
    assert (T * K, H) not in saved and (T, H) in saved
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    assert torch.equal(x2.grad, x1.grad) and torch.equal(w2.grad, w1.grad)


def test_permute_grouped_gemm_twin_path(monkeypatch):
    # The twins on CPU: permute_torch then grouped_gemm_torch, the CPU training path.
    from tritonmoe.kernels import permute_grouped_gemm, permute_torch

    monkeypatch.setattr(gg_module, "_gather_grouped_mm_op", None)  # a call would fail
    topk_idx, x, w = _routing(9, 2, 4), torch.randn(9, 16), torch.randn(4, 8, 16)
    with force_twins():
        y, sizes, rm = permute_grouped_gemm(x, topk_idx, w)
    xs, sizes_ref, rm_ref = permute_torch(x, topk_idx, 4)
    assert torch.equal(y, grouped_gemm_torch(xs, w, sizes_ref)) and torch.equal(rm, rm_ref)


def test_gather_grouped_gemm_with_a_bijection():
    # C = 1: a reordering of rows (what an expert-parallel regroup is); dX is the inverse reordering of dA.
    from tritonmoe.kernels import gather_grouped_gemm, gather_grouped_gemm_torch

    M, K, N = 17, 24, 8
    src = torch.randperm(M)
    inverse = torch.empty_like(src)
    inverse[src] = torch.arange(M)
    sizes, w = torch.tensor([5, 0, 12]), torch.randn(3, N, K)
    x1 = torch.randn(M, K).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y = gather_grouped_gemm(x1, w, sizes, src, inverse[:, None])
    y_ref = gather_grouped_gemm_torch(x2, w, sizes, src, inverse[:, None])
    assert_close(y, y_ref, 1e-5, what="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x1.grad, x2.grad, 1e-5, what="dX")


@pytest.mark.parametrize("src,row_map,match", [
    (torch.tensor([0, 1, 1]), torch.tensor([[0], [1], [2]]), "not inverse"),  # row 2 is x[1], map says x[2]
    (torch.tensor([0, 1, 2]), torch.tensor([[0], [0], [2]]), "not inverse"),  # row 0 twice, row 1 never
    (torch.tensor([0, 1, 2]), torch.tensor([[0, 1], [2, 3]]), r"row_map must be \[S, C\]"),
    (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0], [1], [2]]), "int32/int64"),
])
def test_gather_grouped_gemm_rejects_inconsistent_maps(src, row_map, match):
    from tritonmoe.kernels import gather_grouped_gemm

    with pytest.raises(ValueError, match=match):
        gather_grouped_gemm(torch.randn(3, 8), torch.randn(1, 4, 8), torch.tensor([3]), src, row_map)


def test_permute_grouped_gemm_rejects_bad_weights():
    from tritonmoe.kernels import permute_grouped_gemm

    with pytest.raises(ValueError, match=r"w must be a \[E, N, H\] tensor"):
        permute_grouped_gemm(torch.randn(4, 8), _routing(4, 2, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"w.shape\[2\]=7 != x.shape\[1\]=8"):
        permute_grouped_gemm(torch.randn(4, 8), _routing(4, 2, 3), torch.randn(3, 5, 7))


def test_gather_ops_torch_library_registration():
    from tritonmoe.kernels.permute import _route

    T, K, E = 7, 2, 3
    sizes, rm, src = _route(_routing(T, K, E), E)
    x, w = torch.randn(T, 16, requires_grad=True), torch.randn(E, 8, 16, requires_grad=True)
    torch.library.opcheck(gg_module._gather_grouped_mm_op, (x, w, sizes, src, rm),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(gg_module._grouped_mm_wgrad_op, (torch.randn(T * K, 8), x.detach(), sizes, src),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("gather", [False, True], ids=["plain", "gathered"])
def test_input_and_weight_gradients_are_separate_autograd_nodes(gather):
    # A zero-bubble pipeline schedule asks autograd for the activations' gradient, then for the weights': each
    # pass must launch only its own GEMM (before the weight-gradient node took x detached, the first pass also
    # ran the weight gradient, so dW was computed twice).
    from tritonmoe.kernels import gather_grouped_gemm, permute

    calls = {"mm": 0, "wgrad": 0}
    real_mm, real_wgrad = gg_module._grouped_mm_launch, gg_module._grouped_mm_wgrad_launch

    def count(kind, fn):
        return lambda *a, **k: calls.__setitem__(kind, calls[kind] + 1) or fn(*a, **k)

    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    try:
        gg_module._grouped_mm_launch = count("mm", real_mm)
        gg_module._grouped_mm_wgrad_launch = count("wgrad", real_wgrad)
        if gather:
            _, sizes, row_map = permute(x.detach(), _routing(6, 2, 3), 3)
            src = torch.argsort(row_map.reshape(-1)) // 2  # the token of each expert-ordered row
            y = gather_grouped_gemm(x, w, sizes, src, row_map)
        else:
            y = grouped_gemm(x, w, torch.tensor([2, 0, 4]))
        assert calls == {"mm": 1, "wgrad": 0}
        torch.autograd.grad(y.sum(), inputs=[x], retain_graph=True)
        assert calls == {"mm": 2, "wgrad": 0}  # dX only
        torch.autograd.grad(y.sum(), inputs=[w])
        assert calls == {"mm": 2, "wgrad": 1}  # dW only
    finally:
        gg_module._grouped_mm_launch, gg_module._grouped_mm_wgrad_launch = real_mm, real_wgrad
