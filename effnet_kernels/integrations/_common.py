"""Checks shared by the conversion adapters: what a fusable block part looks like."""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from ..nn import DWConvSpec, Padding, PointwiseSpec, SESpec

_SILU_NAMES = {"SiLU", "Swish", "SwishMe", "MemoryEfficientSwish", "SwishAuto"}
_SIGMOID_NAMES = {"Sigmoid", "GateSigmoid"}


class NotFusable(Exception):
    """A block cannot be fused; the message says why (reported by ``convert``)."""


def loaded_module(name: str):
    """The already-imported module ``name``, or None (adapters never import libraries)."""
    return sys.modules.get(name)


def activation_kind(act: Optional[nn.Module]) -> Optional[str]:
    """``"silu"``, ``"identity"`` or None (not fusable) for an activation module."""
    if act is None or isinstance(act, nn.Identity):
        return "identity"
    if isinstance(act, nn.SiLU) or type(act).__name__ in _SILU_NAMES:
        return "silu"
    return None


def is_sigmoid(gate: object) -> bool:
    """True for a sigmoid gate module."""
    return isinstance(gate, nn.Sigmoid) or type(gate).__name__ in _SIGMOID_NAMES


def require_activation(act: Optional[nn.Module], where: str) -> str:
    kind = activation_kind(act)
    if kind is None:
        raise NotFusable(f"{where} activation {type(act).__name__} is not SiLU or identity")
    return kind


def dw_spec(conv: nn.Module, bn: nn.Module, padding: Padding, activation: str) -> DWConvSpec:
    """A :class:`DWConvSpec` for ``conv`` + ``bn``, or NotFusable saying what does not fit."""
    if not isinstance(conv, nn.Conv2d):
        raise NotFusable(f"depthwise conv is {type(conv).__name__}, not an nn.Conv2d")
    c = conv.in_channels
    if conv.groups != c or conv.out_channels != c:
        raise NotFusable(f"conv is not depthwise with multiplier 1 (groups={conv.groups}, in={c}, out={conv.out_channels})")
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        raise NotFusable(f"kernel {kh}x{kw} is not square and odd")
    if tuple(conv.dilation) != (1, 1):
        raise NotFusable(f"dilation {tuple(conv.dilation)} is not 1")
    if tuple(conv.stride) not in ((1, 1), (2, 2), (1, 2), (2, 1)):
        raise NotFusable(f"stride {tuple(conv.stride)} is not 1 or 2")
    if conv.padding_mode != "zeros":
        raise NotFusable(f"padding_mode {conv.padding_mode!r} is not 'zeros'")
    if not isinstance(bn, nn.BatchNorm2d):
        raise NotFusable(f"depthwise norm is {type(bn).__name__}, not a BatchNorm2d")
    if bn.num_features != c:
        raise NotFusable("depthwise BatchNorm has the wrong number of features")
    return DWConvSpec(conv, bn, padding, activation)


def conv_padding(conv: nn.Conv2d, extra: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): the conv's own symmetric padding plus an external pad."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            ph = pw = 0
        else:  # "same" with stride 1 (PyTorch only allows it there): k // 2 for odd k
            ph, pw = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    else:
        ph, pw = conv.padding
    left, right, top, bottom = extra
    return (left + pw, right + pw, top + ph, bottom + ph)


def se_spec(conv_reduce: nn.Module, act: nn.Module, conv_expand: nn.Module, gate: object) -> SESpec:
    """An :class:`SESpec`, or NotFusable saying what does not fit."""
    for name, conv in (("reduce", conv_reduce), ("expand", conv_expand)):
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise NotFusable(f"SE {name} is not a 1x1 nn.Conv2d")
        if conv.bias is None:
            raise NotFusable(f"SE {name} conv has no bias")
    if activation_kind(act) != "silu":
        raise NotFusable(f"SE activation {type(act).__name__} is not SiLU")
    if not is_sigmoid(gate):
        raise NotFusable(f"SE gate {type(gate).__name__} is not a sigmoid")
    return SESpec(conv_reduce, conv_expand)


def pointwise(conv: nn.Module, bn: nn.Module, activation: Optional[str], fallback: tuple[nn.Module, ...],
              padding: Padding | None = None) -> tuple:
    """``(PointwiseSpec,)`` for a plain 1x1 conv + BatchNorm (+ SiLU/identity), else ``fallback``.

    "Plain" is stride 1, one group, no padding (``padding`` overrides the conv's own, e.g.
    an external pad module; TF "same" is zero for a 1x1 stride-1 conv).
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or activation is None:
        return tuple(fallback)
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
        return tuple(fallback)
    if padding is None:
        padding = conv_padding(conv)
    if padding != "same" and tuple(padding) != (0, 0, 0, 0):
        return tuple(fallback)
    if conv.padding_mode != "zeros" or bn.num_features != conv.out_channels:
        return tuple(fallback)
    return (PointwiseSpec(conv, bn, activation, tuple(fallback)),)
