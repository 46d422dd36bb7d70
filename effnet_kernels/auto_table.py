"""The measured table ``auto`` uses to pick the faster backend per shape class.

``auto_backends.json`` beside this file maps a shape class (op family, dtype, layout, the
dwconv kernel and stride or the pointwise variant, size bucket) to the backend that was
fastest there in the committed op benchmarks (``benchmarks/results/ops.csv``), written by
``python -m benchmarks.auto_table``.
Where the table has no entry (or the file is absent), ``auto`` falls back to the fixed
order in :data:`effnet_kernels.backends.AUTO_ORDER`. The same :func:`shape_class` serves
the runtime and the table generator, so the keys cannot drift apart.

Shape classes (``{family}/{dtype}/{layout}/...``; ``size_bucket``: factor-of-4 buckets):

* ``dwconv/{dtype}/{layout}/k{k}s{stride}/b{bucket of N*C*Ho*Wo}``
* ``se/{dtype}/{layout}/b{bucket of N*C*H*W}`` (``se_excite``) and ``se_gate/{dtype}/any/b{bucket of N*C}``
* ``pw/{dtype}/{layout}/{variant}/b{bucket of M*(K+Cout)}`` (``pointwise_conv``, M = N*H*W pixels,
  K input and Cout output channels: the activation elements the GEMM reads and writes, its
  memory-bound cost), where ``variant`` is what the call fuses around the GEMM, not the conv's
  role in the block: ``expand`` (no gate, no residual: an MBConv expand conv with bias +
  activation, or any plain 1x1 conv), ``project`` (the SE gate on load and/or the residual in
  the epilogue: an MBConv projection), ``pool`` (``pool=True``: a network's head conv with the
  global average pool).

Until a GPU run measures it, ``pointwise_conv`` has no table entry and ``auto`` takes the
fixed order, ``cuda`` first: cuDNN's 1x1 conv + aten epilogue ops
(:mod:`effnet_kernels._aten_pointwise`), the library GEMM the Triton GEMM must beat. Once the
op benchmarks measure the ``pointwise`` family (``python -m benchmarks.ops``, in the default
families), ``python -m benchmarks.auto_table`` records the faster of the two per ``pw/...``
class; a run in which only ``cuda`` served the op (the Triton GEMM not yet registered: its
rows are ``skipped``) records ``cuda``, the same choice as the fixed order.
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


PW_VARIANTS = ("expand", "project", "pool")


def shape_class(family: str, dtype: str, layout: str, elements: int, k: int = 0, stride: int = 0,
                variant: str = "") -> str:
    """The table key: ``family`` is ``"dwconv"`` (elements = N*C*Ho*Wo) or ``"se"`` (N*C*H*W of y)
    or ``"se_gate"`` (N*C) or ``"pw"`` (M*(K+Cout), with ``variant`` one of :data:`PW_VARIANTS`);
    ``dtype`` ``fp16``/``bf16``/``fp32``; ``layout`` ``channels_last``/``nchw``."""
    key = f"{family}/{dtype}/{layout}"
    if family == "dwconv":
        key += f"/k{k}s{stride}"
    if family == "pw":
        if variant not in PW_VARIANTS:
            raise ValueError(f"pointwise variant must be one of {PW_VARIANTS}, got {variant!r}")
        key += f"/{variant}"
    return f"{key}/b{size_bucket(elements)}"


def pointwise_variant(gate: bool, residual: bool, pool: bool) -> str:
    """``pool`` with ``pool``, else ``project`` with a gate and/or a residual, else ``expand``."""
    if pool:
        return "pool"
    return "project" if gate or residual else "expand"


def pointwise_class(dtype: str, layout: str, n: int, k: int, h: int, w: int, cout: int,
                    gate: bool, residual: bool, pool: bool) -> str:
    """The ``pw/...`` class of a ``pointwise_conv`` of x ``[n, k, h, w]`` to ``cout`` channels."""
    return shape_class("pw", dtype, layout, n * h * w * (k + cout), variant=pointwise_variant(gate, residual, pool))


def stored_layout(layout: str, c: int, h: int, w: int) -> str:
    """The layout a call sees for a ``[n, c, h, w]`` tensor stored as ``layout``: ``"nchw"``
    where channels_last memory is also NCHW-contiguous (C = 1 or H = W = 1), as
    :func:`effnet_kernels.ops._checks.memory_format_of` decides; for the table generator,
    whose rows name the layout the benchmark asked for."""
    return "nchw" if c == 1 or (h == 1 and w == 1) else layout


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
    if op == "pointwise_conv":
        x, weight, _, gate, residual, _, pool = args[:7]
        if x.dim() != 4 or not isinstance(weight, torch.Tensor) or weight.dim() < 1:
            return None
        n, k, h, w = x.shape
        return pointwise_class(dtype, _layout(x), n, k, h, w, weight.shape[0], gate is not None,
                               residual is not None, bool(pool))
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
