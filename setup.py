"""Build script for effnet_kernels.

A pure-Python install always works. The CUDA extension (``effnet_kernels._C``) is
built when ``nvcc`` is found, unless ``EFFNET_KERNELS_SKIP_CUDA_BUILD=1``:

    python setup.py build_ext --inplace          # into the source tree
    pip install .                                # into site-packages
    EFFNET_KERNELS_CUDA_ARCHS="80;90" ...        # targets (default 80;86;89;90)
    MAX_JOBS=4 ...  or  build_ext -j 4           # parallel nvcc jobs (default: all CPUs)

The extension is built by nvcc + ninja (effnet_kernels/_build.py), links only the CUDA
runtime and never imports torch here. Without nvcc it is JIT-built on first use.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _load_build_helpers():
    """effnet_kernels/_build.py by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_effnet_kernels_build", HERE / "effnet_kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_build = _load_build_helpers()
SKIP_CUDA = os.environ.get(_build.SKIP_ENV, "0") not in ("", "0")


class NvccNinjaBuildExt(build_ext):
    """Builds ``effnet_kernels._C`` with nvcc + ninja instead of setuptools' compiler."""

    def build_extension(self, ext):
        if ext.name != _build.MODULE:
            return super().build_extension(ext)
        cfg = _build.make_config(
            Path(self.build_temp).resolve() / "effnet_cuda",
            Path(self.get_ext_fullpath(ext.name)).resolve(),
            jobs=self.parallel or None,
            src=HERE / "csrc",
        )
        print(
            f"effnet_kernels: building {cfg.output.name} for sm_{',sm_'.join(cfg.archs)} with nvcc "
            f"{cfg.nvcc_version}, {cfg.jobs} jobs; log: {cfg.log} "
            f"(set {_build.SKIP_ENV}=1 for a pure-Python install)",
            flush=True,
        )
        _build.build(cfg)


class BuildPyWithSources(build_py):
    """Also ships csrc/ as effnet_kernels/_csrc, so an installed package can check or JIT-build ``_C``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install uses csrc/ of the checkout
        dest = Path(self.build_lib) / "effnet_kernels" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for path in _build.source_files(HERE / "csrc"):
            shutil.copy2(path, dest / path.name)


ext_modules = []
if SKIP_CUDA:
    print(f"effnet_kernels: {_build.SKIP_ENV} is set, not building the CUDA extension")
elif _build.find_nvcc() is None:
    print("effnet_kernels: nvcc not found, not building the CUDA extension (it is JIT-built on first use where nvcc is)")
elif _build.missing_tools():
    print("effnet_kernels: not building the CUDA extension: " + "; ".join(_build.missing_tools())
          + " (with pip, add --no-build-isolation to use this environment's packages)")
else:
    ext_modules.append(Extension(_build.MODULE, sources=[]))

setup(
    name="effnet_kernels",
    version="0.1.0",
    description="Fused depthwise-conv/BN/SiLU and squeeze-excitation kernels for EfficientNet (CUDA C++ and Triton)",
    packages=find_packages(include=["effnet_kernels", "effnet_kernels.*"]),
    package_data={"effnet_kernels": ["auto_backends.json", "triton/tuned_configs.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"], "cuda": ["pybind11>=2.10", "ninja"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": NvccNinjaBuildExt, "build_py": BuildPyWithSources},
    zip_safe=False,
)
