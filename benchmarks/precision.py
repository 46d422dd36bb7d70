"""The precisions a benchmark runs in and the context that sets each one up.

``fp32`` (TF32 off for cuDNN and matmuls), ``tf32`` (TF32 on), ``fp16`` and ``bf16``
(``torch.autocast`` over an fp32 model, TF32 off).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["DTYPES", "precision", "element_size"]

DTYPES = ("fp16", "bf16", "fp32", "tf32")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def element_size(dtype: str) -> int:
    """Bytes per activation element in precision ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return 2 if dtype in _AUTOCAST else 4


@contextlib.contextmanager
def precision(dtype: str, device: torch.device) -> Iterator[None]:
    """Run the body in precision ``dtype`` on ``device``; TF32 flags are restored after."""
    element_size(dtype)  # validates
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        if dtype in _AUTOCAST:
            # no weight-cast cache: each weight is used once per forward, and a cache
            # would break CUDA graph capture
            with torch.autocast(device.type, dtype=_AUTOCAST[dtype], cache_enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
