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
    """Route CPU kernel calls to the PyTorch twins: the backend a CPU user gets without TRITON_INTERPRET=1.

    For tests of model, balancing and training logic rather than of the kernels: an interpreted grouped-GEMM
    launch costs 0.1-1 s on CI's 2 cores. The kernels' own tests hold the Triton kernels to the twins, and the
    transformers parity tests run every case on both paths.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
