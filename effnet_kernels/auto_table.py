"""The measured table ``auto`` uses to pick the faster backend per shape class.

``auto_backends.json`` beside this file maps a shape class (op family, dtype, layout,
kernel, stride, size bucket) to the backend that was fastest there in the committed op
benchmarks (``benchmarks/results/ops.csv``), written by ``python -m benchmarks.auto_table``.
Where the table has no entry (or the file is absent), ``auto`` falls back to the fixed
order in :data:`effnet_kernels.backends.AUTO_ORDER`. The same :func:`shape_class` serves
the runtime and the table generator, so the keys cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

TABLE_PATH = Path(__file__).with_name("auto_backends.json")

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

_table: Optional[dict[str, str]] = None


def size_bucket(elements: int) -> int:
    """Factor-of-4 size buckets: 0 for < 4 elements, then one per quadrupling."""
    return max(0, int(elements).bit_length() - 1) // 2


def shape_class(family: str, dtype: str, layout: str, elements: int, k: int = 0, stride: int = 0) -> str:
    """The table key: ``family`` is ``"dwconv"`` (elements = N*C*Ho*Wo) or ``"se"`` (N*C*H*W of y)
    or ``"se_gate"`` (N*C); ``dtype`` ``fp16``/``bf16``/``fp32``; ``layout`` ``channels_last``/``nchw``."""
    key = f"{family}/{dtype}/{layout}"
    if family == "dwconv":
        key += f"/k{k}s{stride}"
    return f"{key}/b{size_bucket(elements)}"


def _layout(t: torch.Tensor) -> str:
    from .ops._checks import memory_format_of

    return "channels_last" if memory_format_of(t) == torch.channels_last else "nchw"


def class_of_call(op: str, args: tuple) -> Optional[str]:
    """The shape class of a forward op call (its arguments without the backend), or None."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    first = args[0]
    dtype = _DTYPE_NAMES.get(first.dtype)
    if dtype is None:
        return None
    if op == "dwconv_bn_act":
        x, weight, _, _, stride, padding = args[:6]
        k = weight.shape[-1]
        ho = (x.shape[2] + padding[2] + padding[3] - k) // stride[0] + 1
        wo = (x.shape[3] + padding[0] + padding[1] - k) // stride[1] + 1
        return shape_class("dwconv", dtype, _layout(x), x.shape[0] * x.shape[1] * ho * wo, k, stride[0])
    if op == "se_excite":
        return shape_class("se", dtype, _layout(first), first.numel())
    if op == "se_gate":
        return shape_class("se_gate", dtype, "any", first.numel())
    return None


def load_table(path: Path = TABLE_PATH) -> dict[str, str]:
    """``{shape class: backend}`` from ``path`` ({} when the file is absent)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return dict(data.get("classes", {}))


def preferred_backend(op: str, args: tuple) -> Optional[str]:
    """The measured fastest backend for this call's shape class, or None if not measured."""
    global _table
    if _table is None:
        _table = load_table()
    if not _table:
        return None
    key = class_of_call(op, args)
    return _table.get(key) if key is not None else None


def set_table(table: Optional[dict[str, str]]) -> None:
    """Replace the loaded table (None: reload from :data:`TABLE_PATH` on next use). For tests and tools."""
    global _table
    _table = table
