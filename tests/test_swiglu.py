"""swiglu: the Triton kernels (through the interpreter on CPU) against the PyTorch twin.

Launchers write into NaN-poisoned outputs, so an element a kernel forgets shows; the public autograd path is
held to the twin's gradients; autograd must keep only the input (the point of the op); opcheck covers the
registration; the last test compiles both kernels for sm_90a and reads the PTX.
"""

import importlib

import pytest
import torch

from helpers import LaunchRecorder, assert_close, global_accesses, poison_, sm90_job
from tritonmoe.kernels import Backend, force_twins, swiglu, swiglu_torch
from tritonmoe.kernels.swiglu import _swiglu_bwd_launch, _swiglu_launch

sw = importlib.import_module("tritonmoe.kernels.swiglu")

# 16-bit outputs are rounded once from fp32 in both; the kernel's exp may differ from torch's by an ulp of
# fp32, which can flip a rounding: one 16-bit ulp relative (fp16 2^-11, bf16 2^-8).
DTYPES = [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, id="bf16"),
]
# (R, I): ragged against every tile, one row, one column, wider than one column tile, and empty.
SHAPES = [(37, 45), (1, 1), (5, 1), (3, 1500), (0, 8), (6, 0)]


def _gu(R, I, dtype, scale=3.0):
    return (torch.randn(R, 2 * I) * scale).to(dtype)


def _twin_grad(gu, dh):
    g = gu.detach().float().requires_grad_()
    swiglu_torch(g).backward(dh.float())
    return g.grad


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("R,I", SHAPES)
def test_forward_launcher_poisoned(R, I, dtype, tol):
    gu = _gu(R, I, dtype)
    out = poison_(torch.empty(R, I, dtype=dtype))
    assert _swiglu_launch(gu, out=out) is out
    assert_close(out, swiglu_torch(gu), tol, what="h")


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("R,I", SHAPES)
def test_backward_launcher_poisoned(R, I, dtype, tol):
    gu, dh = _gu(R, I, dtype), torch.randn(R, I).to(dtype)
    out = poison_(torch.empty(R, 2 * I, dtype=dtype))
    assert _swiglu_bwd_launch(dh, gu, out=out) is out
    # The reference takes the same 16-bit inputs in fp32 and is rounded once, like the kernel.
    assert_close(out, _twin_grad(gu, dh).to(dtype), tol, what="d gate_up")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_outputs_round_to_nearest_even(dtype):
    # The same fp32 arithmetic on the same (16-bit representable) inputs, then one rounding: the 16-bit
    # outputs must be torch's round-to-nearest-even of the kernel's own fp32 results, bit for bit (the
    # interpreter's bf16 cast truncates unless the kernel rounds by hand).
    gu, dh = _gu(64, 96, dtype), torch.randn(64, 96).to(dtype)
    assert torch.equal(_swiglu_launch(gu), _swiglu_launch(gu.float()).to(dtype))
    assert torch.equal(_swiglu_bwd_launch(dh, gu), _swiglu_bwd_launch(dh.float(), gu.float()).to(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp, by design
def test_extreme_gates_stay_finite():
    # exp(-g) overflows to inf for g < -88 (fp32): silu must give -0 and its gradient 0, never NaN.
    g = torch.tensor([[-1e4, -100.0, -88.7, -20.0, 0.0, 20.0, 100.0, 1e4]])
    gu = torch.cat([g, torch.full_like(g, 2.0)], dim=1)
    h = _swiglu_launch(gu)
    assert torch.isfinite(h).all()
    assert_close(h, swiglu_torch(gu), 1e-6, what="h")
    dgu = _swiglu_bwd_launch(torch.ones(1, 8), gu)
    assert torch.isfinite(dgu).all()
    assert_close(dgu, _twin_grad(gu, torch.ones(1, 8)), 1e-6, what="d gate_up")


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_autograd_matches_twin_with_leading_dims(dtype, tol):
    gu = _gu(2 * 3 * 7, 24, dtype).view(2, 3, 7, 48)
    ours, ref = gu.clone().requires_grad_(), gu.clone().requires_grad_()
    h, h_ref = swiglu(ours), swiglu_torch(ref)
    assert h.shape == (2, 3, 7, 24) and h.dtype == dtype
    assert_close(h, h_ref, tol, what="h")
    dh = torch.randn_like(h)
    h.backward(dh)
    assert_close(ours.grad, _twin_grad(gu, dh).to(dtype), tol, what="d gate_up")


def test_non_contiguous_input_and_gradient():
    # gate_up as a column slice of a wider buffer (row stride > 2I), and an expanded incoming gradient.
    buf = torch.randn(9, 70)
    gu = buf[:, 3:63].requires_grad_()
    h = swiglu(gu)
    assert_close(h, swiglu_torch(buf[:, 3:63]), 1e-6, what="h")
    dh = torch.randn(1, 30).expand(9, 30)
    (dgu,) = torch.autograd.grad(h, gu, dh)
    assert_close(dgu, _twin_grad(buf[:, 3:63], dh), 1e-6, what="d gate_up")
    # A transposed [.., 2I] view: the last dim is not contiguous.
    gu_t = torch.randn(12, 5).t()
    assert_close(swiglu(gu_t), swiglu_torch(gu_t), 1e-6, what="h of transposed")


def test_autograd_keeps_only_the_input():
    # The op's reason to exist: eager silu(gate) * up also keeps silu(gate), an extra [R, I].
    def saved_bytes(fn, gu):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gu)
        return sum(seen.values())

    R, I = 64, 32
    gu = torch.randn(R, 2 * I, requires_grad=True)
    eager = lambda t: torch.nn.functional.silu(t[:, :I]) * t[:, I:]  # noqa: E731
    assert saved_bytes(swiglu, gu) == R * 2 * I * 4
    assert saved_bytes(eager, gu) == R * 3 * I * 4


def test_double_backward_is_refused():
    gu = torch.randn(4, 6, requires_grad=True)
    # The backward kernel records no graph; a second derivative must fail loudly, not come back as zero.
    (dgu,) = torch.autograd.grad(swiglu(gu).pow(2).sum(), gu, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dgu.sum().backward()


@pytest.mark.parametrize("bad,match", [
    (torch.randn(4, 5), "must be even"),
    (torch.tensor(1.0), "scalar"),
    (torch.randn(4, 6).to(torch.float64), "float32, float16 or bfloat16"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        swiglu(bad)


def test_twin_without_interpreter(monkeypatch):
    # The CPU user's path: no Triton launch, the twin's autograd.
    monkeypatch.setattr(sw, "_swiglu_op", None)  # a call would fail
    gu = torch.randn(5, 8, requires_grad=True)
    with force_twins():
        swiglu(gu).sum().backward()
    assert_close(gu.grad, _twin_grad(gu, torch.ones(5, 4)), 1e-6, what="d gate_up")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_library_opcheck(dtype):
    torch.library.opcheck(sw._swiglu_op, (torch.randn(6, 20, dtype=dtype).requires_grad_(),))
    torch.library.opcheck(sw._swiglu_bwd_op, (torch.randn(6, 10, dtype=dtype), torch.randn(6, 20, dtype=dtype)))


def test_kernels_compile_for_sm90a_with_16_byte_accesses_and_no_spills(monkeypatch):
    # DeepSeek-V3's I = 2048 in bf16 and fp32, as the launchers would issue them for CUDA tensors: every
    # operand moves in 16-byte vectors, gate and up are each read once, nothing spills.
    from tritonmoe.kernels._sm90 import compile_sm90_all

    launches = []
    for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
        monkeypatch.setattr(sw, name, LaunchRecorder(getattr(sw, name), launches))
    monkeypatch.setattr(sw, "launch_backend", lambda t: Backend.COMPILED)  # tile as for a CUDA tensor
    for dtype in (torch.bfloat16, torch.float32):
        gu = torch.randn(16, 4096, dtype=dtype)
        _swiglu_launch(gu)
        _swiglu_bwd_launch(torch.randn(16, 2048, dtype=dtype), gu)
    jobs = [sm90_job(kernel, args, dict(kwargs)) for kernel, args, kwargs in launches]
    assert len(jobs) == 4
    for job, rep in zip(jobs, compile_sm90_all(jobs)):
        assert rep.spill_bytes == 0 and rep.local_ops == 0, f"{rep.name}: spills {rep.spill_bytes} bytes"
        c = job.constexprs
        elem = 2 if "bf16" in job.signature["gu_ptr"] else 4
        # 16-byte accesses per thread across the tile: (BLOCK_R * BLOCK_C * elem / 16) / threads each.
        per_operand = c["BLOCK_R"] * c["BLOCK_C"] * elem // 16 // (32 * job.num_warps)
        fwd = job.kernel.__name__ == "_swiglu_fwd_kernel"
        expected = {"ld16": (2 if fwd else 3) * per_operand, "st16": (1 if fwd else 2) * per_operand}
        assert global_accesses(rep.ptx) == expected, f"{rep.name}: {global_accesses(rep.ptx)}"
