"""Test-suite setup. TRITON_INTERPRET must be set before triton is first imported, so that CPU tensors run
the real Triton kernels through the interpreter (CI has no GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import use_twins  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def twins(monkeypatch):
    use_twins(monkeypatch)
