"""Triton kernels for the expert layer of a Mixture-of-Experts model, with autograd and PyTorch twins.

Backend (``backend_for(tensor)``, decided once at import): CUDA tensors run the compiled Triton kernels; CPU
tensors run the same kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import
(the test suite sets it), and the plain-PyTorch twin ``<op>_torch`` otherwise; ``force_twins()`` is a context
manager that sends CPU calls to the twins (benchmarks and tests).
"""

import importlib
import sys


def _installed_self():
    """tritonmoe.kernels, when this folder is being imported under another name (else None)."""
    if __name__ == "tritonmoe.kernels":
        return None
    try:
        return importlib.import_module("tritonmoe.kernels")
    except ImportError:
        return None


if (_installed := _installed_self()) is not None:
    # Imported as top-level `kernels`: the repo root is on sys.path (pytest's pythonpath, `python -m bench`
    # run from the root) and something probed for Hugging Face's `kernels` -- transformers imports it to read
    # a version. Running these modules a second time would re-register the tritonmoe:: torch.library ops
    # with the copy's functions (so patching tritonmoe.kernels.grouped_gemm no longer reached the op), so
    # the name becomes an alias of the installed package instead.
    sys.modules[__name__] = _installed
else:
    from ._backend import Backend, backend_for, force_twins
    from .fp8 import (Fp8Weight, Fp8WeightCache, grouped_gemm_fp8, grouped_gemm_fp8_torch, grouped_gemm_fp8_wgrad,
                      grouped_gemm_fp8_wgrad_torch, grouped_linear_fp8, grouped_linear_fp8_torch, quantize_fp8_blocks,
                      quantize_fp8_blocks_torch, quantize_fp8_cols, quantize_fp8_cols_torch, quantize_fp8_rows,
                      quantize_fp8_rows_torch, quantize_fp8_weight)
    from .grouped_gemm import (gather_grouped_gemm, gather_grouped_gemm_torch, grouped_gemm, grouped_gemm_torch,
                               permute_grouped_gemm)
    from .permute import SourceRows, permute, permute_torch, route, unpermute, unpermute_torch
    from .swiglu import swiglu, swiglu_torch

__all__ = [
    "Backend",
    "Fp8Weight",
    "Fp8WeightCache",
    "SourceRows",
    "backend_for",
    "force_twins",
    "gather_grouped_gemm",
    "gather_grouped_gemm_torch",
    "grouped_gemm_fp8",
    "grouped_gemm_fp8_torch",
    "grouped_gemm_fp8_wgrad",
    "grouped_gemm_fp8_wgrad_torch",
    "grouped_linear_fp8",
    "grouped_linear_fp8_torch",
    "grouped_gemm",
    "grouped_gemm_torch",
    "permute",
    "permute_grouped_gemm",
    "permute_torch",
    "quantize_fp8_blocks",
    "quantize_fp8_blocks_torch",
    "quantize_fp8_cols",
    "quantize_fp8_cols_torch",
    "quantize_fp8_rows",
    "quantize_fp8_rows_torch",
    "quantize_fp8_weight",
    "route",
    "swiglu",
    "swiglu_torch",
    "unpermute",
    "unpermute_torch",
]
