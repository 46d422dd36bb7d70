"""Tap-major depthwise weights with the BatchNorm scale folded in, prepared once per fold.

The Triton depthwise kernel reads its weights as ``w'[tap, c] = weight[c, tap] * scale[c]``
(float32, ``[k*k, CP]`` with the row length ``CP`` = C rounded up to a multiple of 16 and
the pad zero), so that for every tap a program's ``BLOCK_C`` weights are one contiguous,
16-byte aligned vector along C (as its activations are on channels_last) and the epilogue
adds only ``shift``.

The op's interface is unchanged (``weight [C, 1, k, k]`` and ``scale [C]``), so the
prepared array is cached here, keyed on both tensors' ``(data_ptr, _version, dtype,
device, shape)``. An entry is used only while the very tensors it was made from are alive
(weak references), so storage reused by a later tensor cannot hit a stale entry, and any
in-place update (``optimizer.step()``, ``copy_``, ``load_state_dict``) bumps ``_version``
and misses. Nothing is cached while a CUDA graph is being captured (the captured kernels
have not run yet, so the buffer would hold nothing until a replay).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

Tensor = torch.Tensor

ROW_ALIGN = 16  # elements: a row of CP float32 values starts 64-byte aligned
MAX_ENTRIES = 256  # B7 has 55 depthwise layers; a few models' worth at once

_cache: "OrderedDict[tuple, tuple[weakref.ref, weakref.ref, Tensor]]" = OrderedDict()
_lock = threading.Lock()


def padded_channels(c: int) -> int:
    """The row length of the tap-major array: ``c`` rounded up to a multiple of :data:`ROW_ALIGN`."""
    return -(-c // ROW_ALIGN) * ROW_ALIGN


def fold_tap_major(weight: Tensor, scale: Tensor) -> Tensor:
    """``[k*k, CP]`` float32: ``weight[c, 0, i, j] * scale[c]`` at row ``i*k + j``, zero beyond C (not cached)."""
    c, k = weight.shape[0], weight.shape[-1]
    out = torch.zeros((k * k, padded_channels(c)), dtype=torch.float32, device=weight.device)
    out[:, :c] = (weight.reshape(c, k * k).to(torch.float32) * scale.to(torch.float32)[:, None]).t()
    return out


def _key(t: Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tap_major_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """:func:`fold_tap_major` of ``(weight, scale)``, computed once while neither tensor changes."""
    if _capturing(weight):
        return fold_tap_major(weight, scale)
    key = _key(weight) + _key(scale)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is weight and hit[1]() is scale:
            _cache.move_to_end(key)
            return hit[2]
    folded = fold_tap_major(weight.detach(), scale.detach())
    with _lock:
        _cache[key] = (weakref.ref(weight), weakref.ref(scale), folded)
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return folded


def clear_cache() -> None:
    """Forget every prepared weight (tests)."""
    with _lock:
        _cache.clear()
