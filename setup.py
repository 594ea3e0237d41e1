"""tritonmoe: Triton-kernel Mixture-of-Experts compute for training DeepSeek-V3-class models.

The three source folders are mapped into the ``tritonmoe`` namespace with ``package_dir`` because the bare
names ``kernels`` and ``parallel`` belong to published packages (Hugging Face's ``kernels`` is common in the
same environments); installing ours must never put a top-level ``kernels`` or ``parallel`` into
site-packages. ``tritonmoe`` itself is an implicit namespace package, so there is no extra folder.
"""

from setuptools import setup

SUBPACKAGES = {"tritonmoe.kernels": "kernels", "tritonmoe.dsv3": "dsv3", "tritonmoe.parallel": "parallel"}

setup(
    name="tritonmoe",
    version="0.1.0",
    description="Triton grouped-GEMM and permute kernels, a DeepSeek-V3 model and FSDP2 + expert parallelism",
    python_requires=">=3.10",
    package_dir=SUBPACKAGES,
    packages=list(SUBPACKAGES),
    install_requires=[
        "torch>=2.6",
        "numpy",  # the trainer's data (token files are memory-mapped arrays)
        "safetensors",
        # Triton ships wheels for Linux only; elsewhere the PyTorch twins of every kernel run.
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "data": ["tokenizers>=0.15"],          # python -m tritonmoe.dsv3.data prepare, generate --tokenizer
        "tensorboard": ["tensorboard"],        # train --tensorboard
        "plot": ["matplotlib"],                # python -m tritonmoe.dsv3.plot
        "test": ["pytest", "pytest-benchmark", "transformers>=5", "tokenizers>=0.15", "tensorboard", "matplotlib"],
    },
)
