"""Adapter for timm's ``InvertedResidual`` and ``DepthwiseSeparableConv`` (EfficientNet family).

Handles ``BatchNormAct2d`` (BN with its activation inside), ``pad_type='same'``
(``Conv2dSame``: dynamic TF padding; static "same" is a plain padded conv) and
``drop_path``. Blocks with space-to-depth, anti-aliasing, a non-SiLU activation or a
non-sigmoid SE gate are left alone.
"""

from __future__ import annotations

from torch import nn

from ..nn import MBConvPlan
from ._common import NotFusable, activation_kind, conv_padding, dw_spec, loaded_module, pointwise, se_spec

NAME = "timm"
_BLOCK_MODULES = ("timm.models._efficientnet_blocks", "timm.models.efficientnet_blocks")


def block_types() -> tuple[type, ...]:
    for name in _BLOCK_MODULES:
        mod = loaded_module(name)
        if mod is not None:
            return (mod.InvertedResidual, mod.DepthwiseSeparableConv)
    return ()


def _padding(conv: nn.Conv2d):
    kind = type(conv).__name__
    if kind == "Conv2dSame":
        return "same"
    if kind == "Conv2dSameExport":
        pad = getattr(conv, "pad", None)
        if pad is None or getattr(pad, "pad", None) is None:
            raise NotFusable("Conv2dSameExport without a resolved padding")
        return conv_padding(conv, tuple(pad.pad))  # type: ignore[arg-type]
    return conv_padding(conv)


def _norm_act(bn: nn.Module, where: str) -> str:
    """The activation a timm norm layer applies after normalising ("silu"/"identity")."""
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise NotFusable(f"{where} norm has a dropout inside")
    kind = activation_kind(getattr(bn, "act", None))
    if kind is None:
        raise NotFusable(f"{where} activation {type(bn.act).__name__} is not SiLU or identity")
    return kind


def _folded(conv: nn.Module, bn: nn.Module, where: str) -> tuple:
    """``conv`` + timm norm(-act) layer as a folded :class:`PointwiseSpec`, else the two modules."""
    try:
        kind = _norm_act(bn, where)
    except NotFusable:
        kind = None
    return pointwise(conv, bn, kind, (conv, bn), padding=_padding(conv))


def plan(block: nn.Module) -> MBConvPlan:
    """Describe a timm ``InvertedResidual`` / ``DepthwiseSeparableConv`` for fusion."""
    if getattr(block, "conv_s2d", None) is not None:
        raise NotFusable("space-to-depth stem (s2d) is not fused")
    aa = getattr(block, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        raise NotFusable("anti-aliased downsampling is not fused")
    inverted = hasattr(block, "conv_pwl")
    dw_bn = block.bn2 if inverted else block.bn1
    dw = dw_spec(block.conv_dw, dw_bn, _padding(block.conv_dw), _norm_act(dw_bn, "depthwise"))
    se_mod = block.se
    se = None
    if not isinstance(se_mod, nn.Identity):
        if not all(hasattr(se_mod, a) for a in ("conv_reduce", "act1", "conv_expand", "gate")):
            raise NotFusable(f"SE module {type(se_mod).__name__} is not timm's SqueezeExcite")
        se = se_spec(se_mod.conv_reduce, se_mod.act1, se_mod.conv_expand, se_mod.gate)
    if inverted:
        pre: tuple = _folded(block.conv_pw, block.bn1, "expand")
        post: tuple = _folded(block.conv_pwl, block.bn3, "project")
    else:
        pre, post = (), _folded(block.conv_pw, block.bn2, "project")
    return MBConvPlan(pre=pre, dw=dw, se=se, post=post, residual=bool(block.has_skip), original=block, source=NAME)
