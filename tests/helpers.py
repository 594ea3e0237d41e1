"""Shared test helpers: one assert_close for every numeric comparison in the suite."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, max_rel: float, rms_rel: float | None = None,
                 what: str = "") -> None:
    """Compare two tensors by max and RMS error relative to the reference's scale.

    max error / max|expected| <= max_rel and rms(error) / rms(expected) <= rms_rel (default max_rel / 4).
    Shapes must match exactly; NaN or inf anywhere in `actual` (e.g. a poisoned row left unwritten) fails.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    if e.numel() == 0:
        return
    err = (a - e).abs()
    scale = e.abs().max().clamp_min(1e-30)
    max_err = (err.max() / scale).item()
    rms_err = (err.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    rms_rel = max_rel / 4 if rms_rel is None else rms_rel
    assert max_err <= max_rel and rms_err <= rms_rel, (
        f"{what}: max rel err {max_err:.3e} (tol {max_rel:.1e}), rms rel err {rms_err:.3e} (tol {rms_rel:.1e})")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) or -1 (ints) so unwritten elements show."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


def use_twins(monkeypatch) -> None:
    """Route CPU kernel calls to the PyTorch twins for the rest of the test: the backend a CPU user gets without
    TRITON_INTERPRET=1 (the switch ``tritonmoe.kernels.force_twins()`` flips, undone when the test ends).

    For tests of model, balancing and training logic rather than of the kernels: an interpreted grouped-GEMM
    launch costs 0.1-1 s on CI's 2 cores. The kernels' own tests hold the Triton kernels to the twins, and the
    transformers parity tests run every case on both paths.
    """
    from tritonmoe.kernels import _backend

    monkeypatch.setattr(_backend, "_twins_forced", _backend._twins_forced + 1)


# ---------------------------------------------------------------------------------------------------------
# Hopper: compile what a launcher issues for sm_90a (no GPU needed) and read the PTX.

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32"}


class LaunchRecorder:
    """Stands in for a kernel: records `kernel[grid](*args, **kwargs)` instead of running it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def sm90_job(kernel, args, kwargs):
    """The Sm90Job Triton's launcher would build: pointers and ints that are multiples of 16 get
    divisibility 16, ints equal to 1 become constants (so unit strides fold and accesses vectorise)."""
    from tritonmoe.kernels._sm90 import Sm90Job

    names = kernel.arg_names
    signature, constexprs, aligned = {}, {}, []
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPE[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(name)
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(name)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    constexprs["INTERPRET"] = False  # what the launcher passes for a CUDA tensor
    return Sm90Job(kernel, signature, constexprs, aligned=tuple(aligned), **options)


def global_accesses(ptx):
    """Counts of global loads/stores, with 16-byte vectors (v4 x 32 bit, v2 x 64 bit) folded into ld16/st16."""
    import re
    from collections import Counter

    counts = Counter()
    for op in re.findall(r"\b((?:ld|st)\.global[\w.:]*)", ptx):
        op = re.sub(r"\.(L1|L2)::[\w:]+|\.nc", "", op)  # cache hints do not change the width
        wide = op.endswith((".v4.b32", ".v4.f32", ".v4.u32", ".v2.b64", ".v2.u64"))
        counts[op[:2] + "16" if wide else op] += 1
    return dict(counts)


def tiny_aux_preset(folder) -> str:
    """A config.json of the tiny preset with the sequence-wise balance loss on (seq_aux_loss_alpha 0.01), for
    the layout-invariance tests: that term's denominator is under test too. Returns its path for --preset."""
    import json
    from pathlib import Path

    from tritonmoe.dsv3.config import DeepseekV3Config

    path = Path(folder) / "tiny_aux.json"
    path.write_text(json.dumps(DeepseekV3Config.from_hf("tiny", seq_aux_loss_alpha=0.01).to_hf()))
    return str(path)
