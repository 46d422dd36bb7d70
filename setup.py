"""Build script for effnet_kernels.

A pure-Python install always works. The CUDA extension (``effnet_kernels._C``) is
built when ``nvcc`` is found, unless ``EFFNET_KERNELS_SKIP_CUDA_BUILD=1``.
"""

import os

from setuptools import find_packages, setup

SKIP_CUDA = os.environ.get("EFFNET_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0")

setup(
    name="effnet_kernels",
    version="0.1.0",
    description="Fused depthwise-conv/BN/SiLU and squeeze-excitation kernels for EfficientNet (CUDA C++ and Triton)",
    packages=find_packages(include=["effnet_kernels", "effnet_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
)
