"""The compiled Triton kernels on a CUDA GPU against the PyTorch twins: what CI (CPU only) cannot run.

Run on a GPU machine, in its own invocation, with the interpreter off (the rest of the suite turns it on,
and an interpreted kernel would run on CUDA tensors too):

    TRITON_INTERPRET=0 pytest tests/test_cuda.py

Skipped without a GPU or with TRITON_INTERPRET=1. What it checks, at DeepSeek-V3's shapes where it matters:
every grouped-GEMM tile config (pinned one at a time, so the autotuner cannot hide a broken one) for the
forward, input gradient and weight gradient in bf16, fp16 and fp32 (tf32 and full precision), with skewed
group sizes and empty groups, into NaN-poisoned outputs; permute / unpermute / swiglu forward and backward;
the MoE layer on CUDA against the same layer on CPU; and that the kernels' forward and backward never make
the host wait for the device.
"""

import importlib
import os

import pytest
import torch

from helpers import assert_close, poison_

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="interpreter on: run as TRITON_INTERPRET=0 pytest tests/test_cuda.py"),
]

from tritonmoe.kernels import (  # noqa: E402
    grouped_gemm, grouped_gemm_torch, permute, permute_torch, swiglu, swiglu_torch, unpermute, unpermute_torch,
)

gg = importlib.import_module("tritonmoe.kernels.grouped_gemm")
DEV = torch.device("cuda")

# fp32 products in the reference; the kernels accumulate in fp32 in another order and round once
# (tf32 operands keep 10 mantissa bits).
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5, "tf32": 4e-3}


def _zipf_sizes(G: int, rows_per_group: int) -> torch.Tensor:
    """Skewed sizes summing to G * rows_per_group with every 8th group empty (the bench's distribution)."""
    from bench.bench_grouped_gemm import group_sizes_for

    return torch.tensor(group_sizes_for(G, rows_per_group, "zipf"))


def _gemm_cases():
    cases = []
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        for wgrad in (False, True):
            for cfg in (gg.wgrad_configs if wgrad else gg.forward_configs)(dtype, precision):
                tag = f"{str(dtype)[6:]}-{precision}-{'wgrad' if wgrad else 'fwd+dgrad'}-" + "x".join(map(str, cfg))
                cases.append(pytest.param(dtype, precision, wgrad, cfg, id=tag))
    return cases


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield lambda p: torch.set_float32_matmul_precision("highest" if p == "ieee" else "high")
    torch.set_float32_matmul_precision(saved)


# (G, rows per group, N, K): DeepSeek-V3's gate/up (7168 -> 4096) and down (2048 -> 7168) with 8 local experts
# and skewed sizes, and a ragged small case that lands on no tile edge.
GEMM_SHAPES = [(8, 256, 4096, 7168), (8, 256, 7168, 2048), (7, 45, 200, 136)]


@pytest.mark.parametrize("dtype,precision,wgrad,cfg", _gemm_cases())
def test_grouped_gemm_every_config(monkeypatch, matmul_precision, dtype, precision, wgrad, cfg):
    monkeypatch.setenv(gg.CONFIG_ENV, ",".join(map(str, cfg)))
    matmul_precision(precision)
    tol = TOL["tf32"] if dtype == torch.float32 and precision == "tf32" else TOL[dtype]
    for G, rows, N, K in GEMM_SHAPES:
        sizes = _zipf_sizes(G, rows) if rows > 64 else torch.tensor([0, 45, 3, 0, 130, 1, 91])
        M = int(sizes.sum())
        x = torch.randn(M, K, device=DEV).to(dtype)
        w = (torch.randn(G, N, K, device=DEV) / K**0.5).to(dtype)
        dy = torch.randn(M, N, device=DEV).to(dtype)
        sizes = sizes.to(DEV)
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        y_ref = grouped_gemm_torch(xr, wr, sizes)
        y_ref.backward(dy.double())
        what = f"G={G} M={M} N={N} K={K}"
        if wgrad:
            dw = poison_(torch.empty_like(w))
            gg._grouped_mm_wgrad_launch(dy, x, sizes, G, out=dw)
            assert_close(dw, wr.grad, tol, what=f"dW {what}")
        else:
            y = poison_(torch.empty(M, N, device=DEV, dtype=dtype))
            gg._grouped_mm_launch(x, w, sizes, out=y)
            assert_close(y, y_ref, tol, what=f"Y {what}")
            dx = poison_(torch.empty_like(x))
            gg._grouped_mm_launch(dy, w.transpose(1, 2), sizes, out=dx)
            assert_close(dx, xr.grad, tol, what=f"dX {what}")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_grouped_gemm_autotuned_autograd(dtype):
    # The public op as training calls it: autotuned, int32 sizes, 64 groups with a quarter empty.
    sizes = _zipf_sizes(64, 96).to(DEV, torch.int32)
    M, N, K = int(sizes.sum()), 512, 384
    x = torch.randn(M, K, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(64, N, K, device=DEV, dtype=dtype) / K**0.5).requires_grad_()
    y = grouped_gemm(x, w, sizes)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = grouped_gemm_torch(xr, wr, sizes)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), dy.double())
    tol = TOL["tf32"] if dtype == torch.float32 else TOL[dtype]  # torch's default "highest" is not forced here
    for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert_close(a, b, max(tol, 1e-5), what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_permute_unpermute_at_dsv3_width(dtype):
    T, K, E, H = 4096, 8, 256, 7168
    x = torch.randn(T, H, device=DEV, dtype=dtype, requires_grad=True)
    topk_idx = torch.rand(T, E, device=DEV).topk(K, dim=1).indices
    w = torch.rand(T, K, device=DEV, requires_grad=True)
    xs, sizes, rm = permute(x, topk_idx, E)
    xs_ref, sizes_ref, rm_ref = permute_torch(x.detach(), topk_idx, E)
    assert torch.equal(xs, xs_ref) and torch.equal(sizes.long(), sizes_ref) and torch.equal(rm.long(), rm_ref.long())
    ys = torch.randn_like(xs).requires_grad_()
    y = unpermute(ys, rm, w)
    dy = torch.randn_like(y)
    dys, dw = torch.autograd.grad(y, (ys, w), dy)
    (dx,) = torch.autograd.grad(xs, x, ys.detach())
    ys_r, w_r = ys.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = unpermute_torch(ys_r, rm_ref, w_r)
    dys_ref, dw_ref = torch.autograd.grad(y_ref, (ys_r, w_r), dy)
    dx_ref = unpermute_torch(ys.detach(), rm_ref)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, a, b in (("y", y, y_ref), ("d y_sorted", dys, dys_ref), ("d w", dw, dw_ref), ("dx", dx, dx_ref)):
        assert_close(a, b, tol, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_swiglu_at_dsv3_width(dtype):
    gu = (torch.randn(4096 * 8, 4096, device=DEV) * 3).to(dtype).requires_grad_()
    h = swiglu(gu)
    dh = torch.randn_like(h)
    (dgu,) = torch.autograd.grad(h, gu, dh)
    ref = gu.detach().float().requires_grad_()
    h_ref = swiglu_torch(ref)
    (dgu_ref,) = torch.autograd.grad(h_ref, ref, dh.float())
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-6
    assert_close(h, h_ref, tol, what="h")
    assert_close(dgu, dgu_ref, tol, what="d gate_up")


def test_kernels_never_sync():
    # The package's contract: no device-to-host sync in the kernels' forward (or backward). "error" raises on any sync.
    T, K, E, H, I = 512, 8, 64, 1024, 256
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    topk_idx = torch.rand(T, E, device=DEV).topk(K, dim=1).indices
    topk_w = torch.rand(T, K, device=DEV, requires_grad=True)
    w13 = (torch.randn(E, 2 * I, H, device=DEV) / H**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(E, H, I, device=DEV) / I**0.5).bfloat16().requires_grad_()
    for mode in ("default", "error"):  # the first pass autotunes (which syncs by design); the second must not
        torch.cuda.set_sync_debug_mode(mode)
        try:
            xs, sizes, rm = permute(x, topk_idx, E)
            h = grouped_gemm(swiglu(grouped_gemm(xs, w13, sizes)), w2, sizes)
            y = unpermute(h, rm, topk_w)
            torch.autograd.grad(y, (x, topk_w, w13, w2), torch.ones_like(y))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_layer_on_cuda_matches_cpu(dtype):
    # The drop-in layer: CUDA (compiled kernels) against a copy on CPU (twins) with the same weights, and at
    # most one host sync per training forward (the EP split sizes; the local dispatcher needs none).
    from tritonmoe.dsv3 import DeepseekV3Config, MoE

    cfg = DeepseekV3Config.from_hf("tiny", hidden_size=256, moe_intermediate_size=128, n_routed_experts=16,
                                   num_experts_per_tok=4, n_group=4, topk_group=2)
    torch.manual_seed(0)
    cpu = MoE(cfg).train()
    gpu = MoE(cfg).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(DEV, dtype)
    cpu = cpu.to(dtype=dtype)
    x = torch.randn(4, 64, cfg.hidden_size, dtype=dtype)
    xc, xg = x.clone().requires_grad_(), x.to(DEV).requires_grad_()
    gpu(xg)  # warm-up: autotuning syncs by design
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yg = gpu(xg)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    yc = cpu(xc)  # CPU tensors take the twins (TRITON_INTERPRET is off in this module)
    dy = torch.randn_like(yc)
    yg.backward(dy.to(DEV))
    yc.backward(dy)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(yg, yc, tol, what="y")
    assert_close(xg.grad, xc.grad, tol, what="dx")
    for (name, pg), (_, pc) in zip(gpu.named_parameters(), cpu.named_parameters()):
        if pc.grad is not None:
            assert_close(pg.grad, pc.grad, tol if dtype == torch.float32 else 5e-2, what=f"d {name}")
