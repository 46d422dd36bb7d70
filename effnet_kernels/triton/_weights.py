"""The Triton depthwise kernel's weights: tap-major, BN scale folded in, rows padded for alignment.

``w'[tap, c] = weight[c, tap] * scale[c]`` (float32, ``[k*k, CP]`` with the row length ``CP`` =
C rounded up to a multiple of 16 and the pad zero), so that for every tap a program's
``BLOCK_C`` weights are one contiguous, 16-byte aligned vector along C and the epilogue adds
only ``shift``. Prepared once per fold and cached as the CUDA backend's are
(:mod:`effnet_kernels._folded_weights`: never stale after in-place edits, uncached during
CUDA graph capture).
"""

from __future__ import annotations

import torch

from .. import _folded_weights

Tensor = torch.Tensor

ROW_ALIGN = 16  # elements: a row of CP float32 values starts 64-byte aligned
MAX_ENTRIES = 256  # B7 has 55 depthwise layers; a few models' worth at once


def padded_channels(c: int) -> int:
    """The row length of the tap-major array: ``c`` rounded up to a multiple of :data:`ROW_ALIGN`."""
    return -(-c // ROW_ALIGN) * ROW_ALIGN


def fold_tap_major(weight: Tensor, scale: Tensor) -> Tensor:
    """``[k*k, CP]`` float32: ``weight[c, 0, i, j] * scale[c]`` at row ``i*k + j``, zero beyond C (not cached)."""
    return _folded_weights.fold_tap_major(weight, scale, row_align=ROW_ALIGN)


def _key(t: Tensor) -> tuple:
    return _folded_weights.tensor_state(t)


# the lambdas look the module's functions up at call time (tests replace them)
_cache = _folded_weights.FoldedWeightCache(lambda w, s: fold_tap_major(w, s), limit=MAX_ENTRIES,
                                           state=lambda t: _key(t))


def tap_major_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """:func:`fold_tap_major` of ``(weight, scale)``, computed once while neither tensor changes."""
    return _cache.get(weight, scale)


def clear_cache() -> None:
    """Forget every prepared weight (tests)."""
    _cache.clear()
