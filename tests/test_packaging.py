"""Installing tritonmoe must not shadow the published `kernels` / `parallel` packages.

setup.py maps our folders into the `tritonmoe` namespace with package_dir; this test builds a real
non-editable install into a scratch target and checks what lands at its top level.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_adds_only_the_tritonmoe_namespace(tmp_path):
    pytest.importorskip("setuptools")
    target = tmp_path / "site"
    # --no-build-isolation: CI has no index beyond PyPI mirrors and the installed setuptools is enough.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path, capture_output=True)
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"tritonmoe"}, f"install put {sorted(top)} at top level"
    assert not (target / "tritonmoe" / "__init__.py").exists(), "tritonmoe must stay an implicit namespace"
    assert {p.name for p in (target / "tritonmoe").iterdir()} >= {"kernels", "dsv3", "parallel"}
    # The installed copy imports under its namespace names from a clean interpreter.
    code = "import tritonmoe.kernels, tritonmoe.dsv3, tritonmoe.parallel; print(tritonmoe.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert str(target) in out.stdout


def test_bare_kernels_name_from_a_checkout_is_the_installed_module():
    # From a checkout the repo root is on sys.path (`python -m bench`, torchrun run there), and transformers
    # probes for Hugging Face's `kernels` by importing it. Our folder must not run a second time under that
    # name: a second copy re-registers the tritonmoe:: torch ops with functions tritonmoe.kernels never sees.
    code = ("import sys, kernels, tritonmoe.kernels as ours\n"
            "assert kernels is ours, kernels\n"
            "assert 'kernels.grouped_gemm' not in sys.modules\n"
            "from transformers.utils import import_utils\n"
            "assert not import_utils.is_kernels_available()\n")
    pytest.importorskip("transformers")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
