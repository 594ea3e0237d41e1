"""The backend a kernel call takes, decided per call from the tensors (DESIGN.md: CUDA tensors run the
compiled Triton kernels; CPU tensors run them through Triton's interpreter when TRITON_INTERPRET=1, the
PyTorch twins otherwise). One place for every op family, so they cannot disagree."""

import os

import torch

try:
    import triton
except ImportError:  # Triton ships wheels for Linux only: the twins run everywhere else
    triton = None


def interpreting(t: torch.Tensor) -> bool:
    """A CPU tensor with Triton's interpreter switched on (the test suite sets TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernels (compiled on CUDA, interpreted on CPU)."""
    return triton is not None and (t.device.type == "cuda" or interpreting(t))
