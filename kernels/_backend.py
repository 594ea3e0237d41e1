"""Which backend a kernel call runs on, decided once.

Three backends: CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported (the test suite does this),
and the plain-PyTorch twins ``<op>_torch`` otherwise. Triton itself reads the variable once, when ``triton.jit``
builds a kernel at import, so this module reads it once too (``INTERPRET``): setting it later cannot turn
compiled kernel objects into interpreted ones, and a per-call read only pretended to switch.

Benchmarks and tests that want the twins on CPU while the interpreter is on use ``force_twins()``, a context
manager; nothing rewrites the environment at run time. Every op family asks ``backend_for(tensor)`` and passes
the answer to its launcher, so the families cannot disagree.
"""

import contextlib
import enum
import os

import torch

try:
    import triton
except ImportError:  # Triton ships wheels for Linux only: the twins run everywhere else
    triton = None

# Read at import, as triton.jit does: whether CPU tensors can run the Triton kernels through the interpreter.
INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


class Backend(enum.Enum):
    COMPILED = "compiled"        # a CUDA tensor: the compiled Triton kernels
    INTERPRETER = "interpreter"  # a CPU tensor with TRITON_INTERPRET=1 at import: the same kernels, in Python
    TWIN = "twin"                # anything else: the plain-PyTorch twin of the op


_twins_forced = 0  # depth of nested force_twins() blocks


@contextlib.contextmanager
def force_twins():
    """Run every op on CPU tensors through its PyTorch twin inside the block, even with the interpreter on.
    CUDA tensors keep the compiled kernels (a twin there would only be slower). Nestable."""
    global _twins_forced
    _twins_forced += 1
    try:
        yield
    finally:
        _twins_forced -= 1


def backend_for(t: torch.Tensor) -> Backend:
    """The backend an op on `t` runs on."""
    if triton is not None and t.device.type == "cuda":
        return Backend.COMPILED
    if INTERPRET and t.device.type == "cpu" and not _twins_forced:
        return Backend.INTERPRETER
    return Backend.TWIN


def launch_backend(t: torch.Tensor) -> Backend:
    """The Triton backend for a tensor that reached a kernel launcher (the public op already chose Triton over
    the twin): compiled on CUDA, interpreted on CPU. RuntimeError when a CPU tensor gets there without the
    interpreter (an op registered with torch.library called directly, or a backward whose forward ran on the
    kernels): the compiled kernel objects cannot run on CPU."""
    if t.device.type == "cuda":
        return Backend.COMPILED
    if not INTERPRET:
        raise RuntimeError("a Triton kernel was launched on a CPU tensor without the interpreter: set "
                           "TRITON_INTERPRET=1 before importing tritonmoe (or call the public op, which runs the "
                           "PyTorch twin on CPU)")
    return Backend.INTERPRETER
