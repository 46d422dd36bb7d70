"""The ``cuda`` backend: loads the compiled extension ``effnet_kernels._C``.

The extension is torch-ABI-free (raw pointers, sizes, strides, a stream). Import of
``effnet_kernels`` never fails because of it: the first call that needs it raises one
error saying what is missing and how to fix it.
"""

from __future__ import annotations

import torch

from . import backends


def _unavailable() -> list[str]:
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible to torch")
    reasons.append("the CUDA extension effnet_kernels._C is not implemented yet")
    return reasons


def _unsupported(op: str, t: torch.Tensor) -> list[str]:
    if t.device.type != "cuda":
        return [f"tensors must be on a CUDA device, got {t.device}"]
    return []


def _load() -> dict:
    return {}


backends.register_backend("cuda", unavailable=_unavailable, unsupported=_unsupported, load=_load)
