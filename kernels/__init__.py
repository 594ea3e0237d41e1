"""Triton kernels for the expert layer of a Mixture-of-Experts model, with autograd and PyTorch twins.

Backend choice, per call: CUDA tensors run the compiled Triton kernels; CPU tensors run the same Triton
kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` (the test suite sets it), and the
plain-PyTorch twin ``<op>_torch`` otherwise.
"""

from .grouped_gemm import grouped_gemm, grouped_gemm_torch
from .permute import permute, permute_torch, unpermute, unpermute_torch

__all__ = [
    "grouped_gemm",
    "grouped_gemm_torch",
    "permute",
    "permute_torch",
    "unpermute",
    "unpermute_torch",
]
