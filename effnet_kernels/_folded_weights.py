"""Tap-major depthwise weights with the BatchNorm scale folded in, prepared once per fold.

Both kernel backends read the depthwise weight as ``w'[tap, c] = weight[c, tap] * scale[c]``
(``[k*k, C]``, float32), so a tap's weights are one contiguous vector along C (as the
activations are on channels_last) and the epilogue adds only ``shift``. The ops' interface is
unchanged (``weight [C, 1, k, k]`` and ``scale [C]``), so each backend keeps a
:class:`FoldedWeightCache` of prepared arrays: one entry per live (weight, scale) pair, used
only while both sources keep the ``data_ptr``, ``_version`` (bumped by every in-place write:
``load_state_dict``, an optimizer step, a BN re-fold in place), shape, stride, dtype and device
it was folded from. Weak references drop an entry when either source is freed, so a new tensor
reusing the memory (same address, version 0) never sees a stale fold. A write that bypasses
the version counter (through ``.data``) is not seen. Nothing is cached while a CUDA graph is
being captured (the captured fold has not run yet, so a cached buffer would be empty until a
replay).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch

Tensor = torch.Tensor

__all__ = ["fold_tap_major", "tensor_state", "FoldedWeightCache"]


def fold_tap_major(weight: Tensor, scale: Tensor, *, row_align: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[k*k, CP]``: ``weight[c, 0, i, j] * scale[c]`` at row ``i*k + j``, in ``dtype`` (not cached).

    ``CP`` is C rounded up to a multiple of ``row_align`` (the pad is zero), so with
    ``row_align=16`` every row of float32 starts 64-byte aligned.
    """
    if row_align < 1:
        raise ValueError(f"row_align must be a positive int, got {row_align}")
    c = weight.shape[0]
    folded = (weight.detach().reshape(c, -1).to(dtype) * scale.detach().to(dtype)[:, None]).t()
    cp = -(-c // row_align) * row_align
    if cp == c:
        return folded.contiguous()
    out = torch.zeros((folded.shape[0], cp), dtype=dtype, device=weight.device)
    out[:, :c] = folded
    return out


def tensor_state(t: Tensor) -> tuple:
    """What an entry must still match: ``(data_ptr, _version, shape, stride, dtype, device)``."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class FoldedWeightCache:
    """Cache of ``fold(weight, scale)`` results (see the module docstring).

    Args:
        fold: makes the prepared array from ``(weight, scale)`` (a backend's layout).
        limit: at most this many entries (oldest dropped first).
        state: what an entry must still match (default :func:`tensor_state`).
    """

    def __init__(self, fold: Callable[[Tensor, Tensor], Tensor], limit: int = 1024,
                 state: Callable[[Tensor], tuple] = tensor_state) -> None:
        self.fold = fold
        self.limit = limit
        self.state = state
        self._entries: dict[tuple[int, int], tuple] = {}
        self._lock = threading.RLock()  # a weakref callback may run (garbage collection) while it is held

    def get(self, weight: Tensor, scale: Tensor) -> Tensor:
        """The prepared array for these sources (folded on a miss; uncached during graph capture)."""
        if _capturing(weight):
            return self.fold(weight, scale)
        key = (id(weight), id(scale))
        state = (self.state(weight), self.state(scale))
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1]() is scale and entry[2] == state:
            return entry[3]
        prepared = self.fold(weight, scale)

        def drop(ref: weakref.ref, key: tuple[int, int] = key) -> None:
            with self._lock:
                current = self._entries.get(key)
                if current is not None and ref in (current[0], current[1]):
                    del self._entries[key]

        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.limit:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (weakref.ref(weight, drop), weakref.ref(scale, drop), state, prepared)
        return prepared

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every prepared array."""
        with self._lock:
            self._entries.clear()
