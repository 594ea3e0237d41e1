"""permute / unpermute: the Triton kernels (through the interpreter on CPU) against the PyTorch twins.

Index outputs (x_sorted, group_sizes, row_map) must match the twin exactly; sums and gradients are compared
with per-dtype tolerances against the twin run in fp32. Launcher outputs are poisoned before each launch so
an unwritten row shows as NaN / -1. torch.library.opcheck covers the registered ops, and a small MoE expert
path compiled with fullgraph=True proves permute -> grouped_gemm -> swiglu -> unpermute trace without a graph break.
The last tests compile every kernel variant the launchers issue for sm_90a and read the PTX: 16-byte global
accesses, each token row read once / written K times, no spills.
"""

import importlib

import pytest
import torch

from helpers import LaunchRecorder, assert_close, global_accesses, poison_, sm90_job
from tritonmoe.kernels import grouped_gemm, permute, permute_torch, swiglu, unpermute, unpermute_torch

# The module itself (the package attribute `permute` is the function): launchers and kernels.
pm = importlib.import_module("tritonmoe.kernels.permute")
_backend = importlib.import_module("tritonmoe.kernels._backend")

# dtype with its tolerance (max relative error; rms defaults to a quarter). Moves are exact; the fp32 sums
# round once to the output dtype, so the bound is about one ulp of the largest element.
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16"),
]

# (T, H, K, E, routing): routing "topk" gives distinct experts per token like the router, "dup" draws with
# repeats (a token may pick one expert twice), "one" sends everything to expert E // 2.
CASES = [
    # T = 1, one expert: the smallest grid. (The grid has one program per token, so there is no T tile to
    # under-fill; "H_below_vec" is the shape smaller than a tile.)
    pytest.param(1, 40, 1, 1, "topk", id="T1-K1-E1"),
    pytest.param(9, 40, 8, 8, "topk", id="K_eq_E"),  # K = E: every token visits every expert
    pytest.param(13, 72, 3, 7, "topk", id="primeE"),  # prime E, H not a multiple of any power of two > 8
    pytest.param(11, 48, 4, 5, "one", id="all_to_one"),  # all rows in one group, the other experts empty
    pytest.param(5, 24, 2, 64, "topk", id="sparse_E64"),  # most of 64 experts get zero tokens
    pytest.param(10, 33, 6, 4, "dup", id="dup_experts"),  # a token lists an expert twice: j stays ascending
    pytest.param(2, 3, 2, 3, "topk", id="H_below_vec"),  # H smaller than one 16-byte vector: tail only
]


def make_routing(T, K, E, routing):
    if routing == "topk":
        return torch.rand(T, E).topk(K, dim=1).indices
    if routing == "one":
        return torch.full((T, K), E // 2, dtype=torch.int64)
    return torch.randint(0, E, (T, K))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every launch the public ops make writes into a NaN-filled output, so a row a kernel skips fails the
    comparison. Only full maps (R == T*K) are poisoned: otherwise the launcher zero-fills on purpose."""
    scatter, gather, bwd = pm._scatter_rows, pm._gather_rows, pm._unpermute_bwd

    def scatter_poisoned(src, row_map, w, num_rows, out=None):
        if out is None and num_rows == row_map.numel():
            out = poison_(src.new_empty(num_rows, src.shape[1]))
        return scatter(src, row_map, w, num_rows, out=out)

    def gather_poisoned(src, row_map, w, out=None):
        return gather(src, row_map, w, out=poison_(src.new_empty(row_map.shape[0], src.shape[1])))

    def bwd_poisoned(dy, y_sorted, row_map, w, need_dys, dys_out=None, dw_out=None):
        if need_dys and y_sorted.shape[0] == row_map.numel():
            dys_out = poison_(torch.empty_like(y_sorted, memory_format=torch.contiguous_format))
        return bwd(dy, y_sorted, row_map, w, need_dys, dys_out=dys_out, dw_out=poison_(torch.empty_like(w)))

    monkeypatch.setattr(pm, "_scatter_rows", scatter_poisoned)
    monkeypatch.setattr(pm, "_gather_rows", gather_poisoned)
    monkeypatch.setattr(pm, "_unpermute_bwd", bwd_poisoned)


@pytest.fixture
def small_tiles(monkeypatch):
    """Pin BLOCK_H to 16 so the test shapes span several H tiles and a ragged tail."""
    monkeypatch.setenv("TRITONMOE_PERMUTE_BLOCK_H", "16")


# ---------------------------------------------------------------------------------------------------------
# permute


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("T,H,K,E,routing", CASES)
def test_permute_matches_twin(T, H, K, E, routing, dtype, tol):
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    topk_idx = make_routing(T, K, E, routing)
    xs, gs, rm = permute(x, topk_idx, E)
    xs_ref, gs_ref, rm_ref = permute_torch(x.detach(), topk_idx, E)
    assert torch.equal(xs, xs_ref) and torch.equal(gs, gs_ref) and torch.equal(rm, rm_ref)
    assert gs.dtype == torch.int64 and rm.dtype == torch.int64 and gs.shape == (E,)
    # The contract independently of the twin: rows sorted by (expert, token, j).
    key = (topk_idx * T * K + torch.arange(T).unsqueeze(1) * K + torch.arange(K)).reshape(-1)
    assert torch.equal(rm.reshape(-1), torch.argsort(torch.argsort(key)))

    # dx[t] = sum_j g[row_map[t, j]], against the twin's gradient taken in fp32.
    g = torch.randn_like(xs)
    (dx,) = torch.autograd.grad(xs, x, g)
    x32 = x.detach().float().requires_grad_()
    (dx_ref,) = torch.autograd.grad(permute_torch(x32, topk_idx, E)[0], x32, g.float())
    assert dx.dtype == dtype
    assert_close(dx, dx_ref, tol, what="permute dx")


@pytest.mark.parametrize("K", range(1, 9))
def test_permute_every_k(K):
    # K = 1..8 (DeepSeek-V3 routes 8); E = 8 so K = 8 is also K = E.
    x = torch.randn(6, 20)
    topk_idx = make_routing(6, K, 8, "topk")
    for got, ref in zip(permute(x, topk_idx, 8), permute_torch(x, topk_idx, 8)):
        assert torch.equal(got, ref)


def test_permute_multi_tile_launcher_poisoned(small_tiles):
    # H = 40 over BLOCK_H = 16: two full tiles and a tail of 8. Every row of the poisoned output is written.
    x = torch.randn(7, 40, dtype=torch.bfloat16)
    topk_idx = make_routing(7, 3, 5, "topk")
    xs_ref, _, rm = permute_torch(x, topk_idx, 5)
    out = poison_(torch.empty(21, 40, dtype=torch.bfloat16))
    assert torch.equal(pm._scatter_rows(x, rm, None, 21, out=out), xs_ref)
    # Backward of permute is an unweighted gather.
    g = torch.randn(21, 40, dtype=torch.bfloat16)
    dx = pm._gather_rows(g, rm, None, out=poison_(torch.empty(7, 40, dtype=torch.bfloat16)))
    assert_close(dx, unpermute_torch(g.float(), rm), 1.6e-2, what="dx multi-tile")


def test_permute_empty_and_int32_indices():
    # T = 0: nothing to launch, shapes still right; int32 expert ids (some routers emit them) are accepted.
    xs, gs, rm = permute(torch.randn(0, 16), torch.zeros(0, 4, dtype=torch.int32), 3)
    assert xs.shape == (0, 16) and torch.equal(gs, torch.zeros(3, dtype=torch.int64)) and rm.shape == (0, 4)
    x = torch.randn(5, 16)
    idx32 = make_routing(5, 2, 4, "topk").int()
    for got, ref in zip(permute(x, idx32, 4), permute_torch(x, idx32.long(), 4)):
        assert torch.equal(got, ref)


def test_narrow_index_dtypes_against_a_wide_bound():
    # int8 expert ids with 256 experts: `idx < 256` in int8 would wrap the bound to 0 and fail every id. The
    # range check CUDA asserts on (_in_range) must widen instead; CPU computes the same predicate.
    x = torch.randn(5, 16)
    idx8 = torch.tensor([[3, 100], [127, 0], [5, 6], [100, 3], [1, 2]], dtype=torch.int8)
    assert bool(pm._in_range(idx8, 256)) and not bool(pm._in_range(idx8 - 1, 256))
    assert bool(pm._in_range(torch.tensor([[30000]], dtype=torch.int16), 40000))
    assert not bool(pm._in_range(torch.tensor([[200]], dtype=torch.uint8), 150))
    for got, ref in zip(permute(x, idx8, 256), permute_torch(x, idx8.long(), 256)):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------------------
# unpermute


@pytest.mark.parametrize("weights", ["fp32", "same", None], ids=["w_fp32", "w_rowdtype", "no_w"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("T,H,K,E,routing", CASES)
def test_unpermute_matches_twin(T, H, K, E, routing, dtype, tol, weights):
    # Routing weights are usually fp32 over bf16 rows ("w_fp32"); "w_rowdtype" keeps them in the row dtype.
    _, _, rm = permute_torch(torch.empty(T, 1), make_routing(T, K, E, routing), E)
    ys = torch.randn(T * K, H, dtype=dtype, requires_grad=True)
    w = None
    if weights is not None:
        w = torch.rand(T, K, dtype=torch.float32 if weights == "fp32" else dtype).add_(0.1).requires_grad_()
    y = unpermute(ys, rm, w)
    ys32 = ys.detach().float().requires_grad_()
    w32 = None if w is None else w.detach().float().requires_grad_()
    y_ref = unpermute_torch(ys32, rm, w32)
    assert y.dtype == dtype
    assert_close(y, y_ref, tol, what="unpermute y")

    dy = torch.randn_like(y)
    inputs, inputs_ref = (ys,) if w is None else (ys, w), (ys32,) if w is None else (ys32, w32)
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, dy.float())
    assert grads[0].dtype == dtype
    assert_close(grads[0], grads_ref[0], tol, what="d y_sorted")
    if w is not None:
        assert grads[1].dtype == w.dtype
        # dw is an H-long fp32 dot product rounded once to the weights' dtype.
        assert_close(grads[1], grads_ref[1], 1e-5 if w.dtype == torch.float32 else tol, what="d topk_weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_unpermute_rounds_like_torch(dtype):
    # K = 1: y = w * y_sorted[row] rounded once, so the kernel must equal torch's own rounding bit for bit
    # (catches the interpreter's truncating fp32 -> bf16 cast); without weights it is an exact move.
    _, _, rm = permute_torch(torch.empty(64, 1), make_routing(64, 1, 4, "topk"), 4)
    ys = torch.randn(64, 40, dtype=dtype)
    w = torch.rand(64, 1)
    assert torch.equal(unpermute(ys, rm, w), (ys.float()[rm[:, 0]] * w).to(dtype))
    assert torch.equal(unpermute(ys, rm), ys[rm[:, 0]])


@pytest.mark.parametrize("need_dys", [True, False], ids=["dys_and_dw", "dw_only"])
def test_unpermute_launchers_poisoned(small_tiles, need_dys):
    # Every launcher output prefilled with NaN; tiles of 16 over H = 40 leave a ragged tail.
    T, H, K, E = 6, 40, 3, 5
    _, _, rm = permute_torch(torch.empty(T, 1), make_routing(T, K, E, "topk"), E)
    ys = torch.randn(T * K, H, dtype=torch.bfloat16)
    w = torch.rand(T, K)
    dy = torch.randn(T, H, dtype=torch.bfloat16)

    y = pm._gather_rows(ys, rm, w, out=poison_(torch.empty(T, H, dtype=torch.bfloat16)))
    assert_close(y, unpermute_torch(ys.float(), rm, w), 1.6e-2, what="y")

    ys32, w32 = ys.float().requires_grad_(), w.clone().requires_grad_()
    dys_ref, dw_ref = torch.autograd.grad(unpermute_torch(ys32, rm, w32), (ys32, w32), dy.float())
    dys, dw = pm._unpermute_bwd(dy, ys, rm, w, need_dys,
                                dys_out=poison_(torch.empty(T * K, H, dtype=torch.bfloat16)),
                                dw_out=poison_(torch.empty(T, K)))
    assert_close(dw, dw_ref, 1e-5, what="dw")
    if need_dys:
        assert_close(dys, dys_ref, 1.6e-2, what="dys fused")
    else:
        assert dys is None
    # Without a weight gradient, d y_sorted is the plain weighted scatter.
    dys = pm._scatter_rows(dy, rm, w, T * K, out=poison_(torch.empty(T * K, H, dtype=torch.bfloat16)))
    assert_close(dys, dys_ref, 1.6e-2, what="dys scatter")


def test_unpermute_unreferenced_rows_get_zero_grad():
    # R > T*K (rows no token points at, e.g. padding): their gradient is an exact zero, not garbage.
    rm = torch.tensor([[4, 0], [2, 5]])
    ys = torch.randn(7, 24, requires_grad=True)
    w = torch.rand(2, 2, requires_grad=True)
    dys, _ = torch.autograd.grad(unpermute(ys, rm, w), (ys, w), torch.randn(2, 24))
    assert torch.equal(dys[[1, 3, 6]], torch.zeros(3, 24))
    (dys_nw,) = torch.autograd.grad(unpermute(ys, rm), ys, torch.randn(2, 24))
    assert torch.equal(dys_nw[[1, 3, 6]], torch.zeros(3, 24))


def test_kernels_never_touch_rows_outside_the_map():
    # A bad row_map (caught on the host here, only asynchronously on CUDA) must not move memory outside
    # [0, R): the destination is a view into a larger poisoned buffer whose extra rows must stay NaN.
    rm = torch.tensor([[0, 3], [-1, 1], [2, 9]])  # -1 and 9 are outside [0, 4)
    x = torch.randn(3, 16)
    buf = poison_(torch.empty(6, 16))
    pm._scatter_rows(x, rm, None, 4, out=buf[1:5])
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[5]).all()
    assert torch.equal(buf[1:5][[0, 3, 1, 2]], x[[0, 0, 1, 2]])
    src = torch.randn(4, 16)
    y = pm._gather_rows(src, rm, None)
    assert torch.equal(y, torch.stack([src[0] + src[3], src[1], src[2]]))


# ---------------------------------------------------------------------------------------------------------
# Validation, layouts, backend choice


def _bad_permute_calls():
    x, idx = torch.randn(4, 8), torch.randint(0, 3, (4, 2))
    return [
        pytest.param(lambda: permute(x[0], idx, 3), "2-D", id="x_1d"),
        pytest.param(lambda: permute(x, idx[:, 0], 3), "2-D", id="idx_1d"),
        pytest.param(lambda: permute(x, idx.float(), 3), "float32", id="idx_float"),
        pytest.param(lambda: permute(x, idx[:3], 3), "3 rows", id="T_mismatch"),
        pytest.param(lambda: permute(x, idx.clone().index_fill_(0, torch.tensor([2]), 3), 3), "got 3",
                     id="idx_too_big"),
        pytest.param(lambda: permute(x, idx.clone().index_fill_(0, torch.tensor([1]), -2), 3), "got -2",
                     id="idx_negative"),
        pytest.param(lambda: permute(x, idx, 0), "got 0", id="E_zero"),
        pytest.param(lambda: permute(x, idx, 2.5), "got 2.5", id="E_float"),
        pytest.param(lambda: permute(x.double(), idx, 3), "float64", id="x_fp64"),
        pytest.param(lambda: permute(x, idx.to("meta"), 3), "meta", id="devices"),
    ]


def _bad_unpermute_calls():
    ys, rm, w = torch.randn(8, 8), torch.arange(8).view(4, 2), torch.rand(4, 2)
    return [
        pytest.param(lambda: unpermute(ys[0], rm), "2-D", id="ys_1d"),
        pytest.param(lambda: unpermute(ys, rm.view(-1)), "2-D", id="map_1d"),
        pytest.param(lambda: unpermute(ys, rm.float()), "float32", id="map_float"),
        pytest.param(lambda: unpermute(ys.to(torch.int32), rm), "int32", id="ys_int"),
        pytest.param(lambda: unpermute(ys, rm, w[:3]), r"\(3, 2\)", id="w_shape"),
        pytest.param(lambda: unpermute(ys, rm, w.double()), "float64", id="w_fp64"),
        pytest.param(lambda: unpermute(ys, rm + 1), "got 8", id="map_out_of_range"),
        pytest.param(lambda: unpermute(ys, rm.to("meta")), "meta", id="map_device"),
        pytest.param(lambda: unpermute(ys, rm, w.to("meta")), "meta", id="w_device"),
        pytest.param(lambda: unpermute(ys.requires_grad_(), rm.clamp(max=6)), "repeats row 6", id="map_repeats"),
    ]


@pytest.mark.parametrize("call,match", _bad_permute_calls() + _bad_unpermute_calls())
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_contiguous_inputs():
    # Column-major x, a strided slice of y_sorted, transposed index/weight tensors and an expanded dy
    # (what sum().backward() sends, stride 0) all go straight to the kernels through their strides.
    T, H, K, E = 7, 24, 3, 5
    x = torch.randn(H, T, dtype=torch.bfloat16).t().requires_grad_()
    topk_idx = make_routing(T, K, E, "topk").t().contiguous().t()
    xs, gs, rm = permute(x, topk_idx, E)
    for got, ref in zip((xs, gs, rm), permute_torch(x.detach(), topk_idx, E)):
        assert torch.equal(got, ref)
    (dx,) = torch.autograd.grad(xs.float().sum(), x)
    assert torch.equal(dx, torch.full((T, H), float(K), dtype=torch.bfloat16))

    big = torch.randn(T * K, 2 * H)
    ys = big[:, ::2].requires_grad_()
    rm_t = rm.t().contiguous().t()
    w = torch.rand(K, T).t().requires_grad_()
    y = unpermute(ys, rm_t, w)
    assert_close(y, unpermute_torch(ys.detach(), rm, w.detach()), 1e-5, what="strided y")
    dys, dw = torch.autograd.grad(y.sum(), (ys, w))
    ys_ref, w_ref = ys.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dys_ref, dw_ref = torch.autograd.grad(unpermute_torch(ys_ref, rm, w_ref).sum(), (ys_ref, w_ref))
    assert_close(dys, dys_ref, 1e-5, what="dys, expanded dy")
    assert_close(dw, dw_ref, 1e-5, what="dw, expanded dy")


def test_double_backward_is_refused():
    # The backward kernels record no graph; a second derivative must fail loudly, not come back as zero.
    x = torch.randn(4, 8, requires_grad=True)
    xs, _, rm = permute(x, make_routing(4, 2, 3, "topk"), 3)
    y = unpermute(xs, rm, torch.rand(4, 2, requires_grad=True))
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_twins_run_without_interpreter(monkeypatch):
    # The CPU training path: the twins, still validated and differentiable.
    monkeypatch.setattr(_backend, "_twins_forced", 1)
    calls = []
    monkeypatch.setattr(pm, "_scatter_rows", lambda *a, **k: calls.append(a))
    x = torch.randn(5, 8, requires_grad=True)
    topk_idx = make_routing(5, 2, 3, "topk")
    xs, _, rm = permute(x, topk_idx, 3)
    y = unpermute(xs, rm, torch.full((5, 2), 0.5))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert not calls
    assert_close(y, x, 1e-6, what="round trip")
    assert_close(dx, torch.ones_like(x), 1e-6, what="round trip dx")
    with pytest.raises(ValueError, match="got 3"):
        permute(x, topk_idx + 1, 3)


# ---------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def _op_sample(name, dtype):
    """(op, args) for the tritonmoe:: op `name` at small shapes, with inputs that need grad where the op is
    differentiable (so opcheck runs its autograd formula too)."""
    T, H, K, E = 5, 24, 3, 4
    _, _, rm = permute_torch(torch.empty(T, 1), make_routing(T, K, E, "topk"), E)
    x, ys, dy = torch.randn(T, H, dtype=dtype), torch.randn(T * K, H, dtype=dtype), torch.randn(T, H, dtype=dtype)
    w = torch.rand(T, K) + 0.1  # fp32 routing weights over `dtype` rows, as the router gives them
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    return {
        "permute_rows": (pm._permute_rows_op, (grad(x), rm)),
        "unpermute_w": (pm._unpermute_op, (grad(ys), rm, grad(w))),
        "unpermute_no_w": (pm._unpermute_op, (grad(ys), rm, None)),
        # num_rows > T*K: rows no (t, j) maps to (padding) are zero-filled, not left empty.
        "unpermute_dgrad": (pm._unpermute_dgrad_op, (dy, rm, w, T * K + 2)),
        "unpermute_bwd": (pm._unpermute_bwd_op, (dy, ys, rm, w)),
        "unpermute_wgrad": (pm._unpermute_wgrad_op, (dy, ys, rm, w)),
    }[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["permute_rows", "unpermute_w", "unpermute_no_w", "unpermute_dgrad",
                                  "unpermute_bwd", "unpermute_wgrad"])
def test_torch_library_opcheck(name, dtype):
    # Schema (no input mutated or aliased), the fake kernel against the real one (shapes, strides, dtypes),
    # autograd registration, and the op traced by AOTAutograd with static and dynamic shapes.
    op, args = _op_sample(name, dtype)
    torch.library.opcheck(op, args)


def _moe_experts(x, topk_idx, topk_weights, w13, w2):
    """A small MoE expert path: dispatch, fused gate/up GEMM, SwiGLU, down GEMM, weighted combine."""
    x_sorted, group_sizes, row_map = permute(x, topk_idx, w13.shape[0])
    h = grouped_gemm(swiglu(grouped_gemm(x_sorted, w13, group_sizes)), w2, group_sizes)
    return unpermute(h, row_map, topk_weights)


def test_compiled_moe_path_has_no_graph_break():
    # fullgraph=True fails on any graph break, so permute, grouped_gemm and unpermute (index work, validation
    # and kernels) all trace into one graph; forward and every gradient equal eager bit for bit.
    T, H, K, E, I = 8, 32, 2, 4, 16
    args = (torch.randn(T, H), make_routing(T, K, E, "topk"), torch.rand(T, K),
            torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5)
    grads_of = (0, 2, 3, 4)  # all but the expert ids
    eager = [a.clone().requires_grad_(i in grads_of) for i, a in enumerate(args)]
    compiled = [a.clone().requires_grad_(i in grads_of) for i, a in enumerate(args)]
    torch._dynamo.reset()
    y_ref = _moe_experts(*eager)
    compiled_fn = torch.compile(_moe_experts, fullgraph=True, backend="aot_eager")
    y = compiled_fn(*compiled)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    grads_ref = torch.autograd.grad(y_ref, [eager[i] for i in grads_of], dy)
    grads = torch.autograd.grad(y, [compiled[i] for i in grads_of], dy)
    for name, g, g_ref in zip(("dx", "d topk_weights", "d w13", "d w2"), grads, grads_ref):
        assert torch.equal(g, g_ref), name
    # Inside the graph the host-side ValueError checks are device asserts (RuntimeError on CPU).
    with pytest.raises(RuntimeError, match=r"topk_idx has values outside \[0, 4\)"):
        compiled_fn(compiled[0], compiled[1] + E, *compiled[2:])


# ---------------------------------------------------------------------------------------------------------
# Hopper: compile what the launchers issue for sm_90a (no GPU needed) and read the PTX.

def _record_dsv3_launches(monkeypatch):
    """Every kernel variant a DeepSeek-V3 layer launches (H=7168, K=8, fp32 routing weights) for bf16 and fp32
    rows (fp16 compiles to the same 16-bit moves as bf16; the interpreter tests cover its arithmetic)."""
    launches = []
    for name in ("_scatter_rows_kernel", "_gather_rows_kernel", "_unpermute_bwd_kernel"):
        monkeypatch.setattr(pm, name, LaunchRecorder(getattr(pm, name), launches))
    T, H, K, E = 4, 7168, 8, 16
    topk_idx = make_routing(T, K, E, "topk")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(T, H, dtype=dtype, requires_grad=True)
        xs, _, rm = permute(x, topk_idx, E)  # scatter, no weights
        torch.autograd.grad(xs, x, torch.randn_like(xs))  # gather, no weights
        ys = torch.randn(T * K, H, dtype=dtype)
        w = torch.rand(T, K)
        for ys_grad, w_grad in ((True, True), (False, True), (True, False)):  # fused; dw only; weighted scatter
            ys_, w_ = ys.clone().requires_grad_(ys_grad), w.clone().requires_grad_(w_grad)
            y = unpermute(ys_, rm, w_)  # weighted gather
            torch.autograd.grad(y, [t for t in (ys_, w_) if t.requires_grad], torch.randn_like(y))
    return launches


def _expected_accesses(name, constexprs):
    """Global accesses per program and H tile: 16-byte row accesses, plus scalar row_map (b64) and weight
    (b32) loads and the dw store. Exact counts pin 'each token row read once, written K times'."""
    K = constexprs["K"]
    if name == "_scatter_rows_kernel":
        counts = {"ld16": 1, "st16": K, "ld.global.b64": K, "ld.global.b32": K * constexprs["HAS_W"]}
    elif name == "_gather_rows_kernel":
        counts = {"ld16": K, "st16": 1, "ld.global.b64": K, "ld.global.b32": K * constexprs["HAS_W"]}
    else:
        need_dys = constexprs["NEED_DYS"]
        counts = {"ld16": 1 + K, "st16": K * need_dys, "ld.global.b64": K, "ld.global.b32": K * need_dys,
                  "st.global.b32": 1}
    return {op: n for op, n in counts.items() if n}


def test_kernels_compile_for_sm90a_with_16_byte_accesses_and_no_spills(monkeypatch):
    from tritonmoe.kernels._sm90 import compile_sm90_all

    launches = _record_dsv3_launches(monkeypatch)
    jobs = {}
    for kernel, args, kwargs in launches:
        job = sm90_job(kernel, args, dict(kwargs))
        jobs[(job.kernel.__name__, tuple(sorted(job.signature.items())), tuple(sorted(job.constexprs.items())))] = job
    # 2 dtypes x (scatter, gather, weighted gather, fused bwd, dw-only bwd, weighted scatter).
    assert len(jobs) == 12
    for job, rep in zip(jobs.values(), compile_sm90_all(list(jobs.values()))):
        assert rep.spill_bytes == 0 and rep.local_ops == 0, f"{rep.name}: spills {rep.spill_bytes} bytes"
        got = global_accesses(rep.ptx)
        assert got == _expected_accesses(job.kernel.__name__, job.constexprs), f"{rep.name}: {got}"
