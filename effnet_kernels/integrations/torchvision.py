"""Adapter for ``torchvision.models.efficientnet.MBConv`` (EfficientNet B0-B7, V2's MBConv stages)."""

from __future__ import annotations

from torch import nn

from ..nn import MBConvPlan
from ._common import NotFusable, activation_kind, conv_padding, dw_spec, loaded_module, pointwise, require_activation, se_spec

NAME = "torchvision"


def block_types() -> tuple[type, ...]:
    mod = loaded_module("torchvision.models.efficientnet")
    return (mod.MBConv,) if mod is not None else ()


def _conv_norm_act(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(conv, norm, activation or Identity) of a ``Conv2dNormActivation``."""
    parts = list(layer.children())
    if len(parts) not in (2, 3):
        raise NotFusable(f"expected conv + norm (+ act), got {len(parts)} layers")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else nn.Identity()


def _folded(layers: list[nn.Module]) -> tuple:
    """A ``Conv2dNormActivation`` 1x1 layer as a folded :class:`PointwiseSpec`, else the layers as they are."""
    if len(layers) != 1:
        return tuple(layers)
    try:
        conv, norm, act = _conv_norm_act(layers[0])
    except NotFusable:
        return tuple(layers)
    return pointwise(conv, norm, activation_kind(act), tuple(layers))


def plan(block: nn.Module) -> MBConvPlan:
    """Describe a torchvision ``MBConv`` for fusion."""
    layers = list(block.block.children())
    se_layer = next((m for m in layers if type(m).__name__ == "SqueezeExcitation"), None)
    if se_layer is None or len(layers) not in (3, 4):
        raise NotFusable("block layout is not [expand], depthwise, SqueezeExcitation, project")
    idx = layers.index(se_layer)
    if idx not in (1, 2):
        raise NotFusable("SqueezeExcitation is not after the depthwise layer")
    pre = _folded(layers[:idx - 1])
    dw_conv, dw_bn, dw_act = _conv_norm_act(layers[idx - 1])
    dw = dw_spec(dw_conv, dw_bn, conv_padding(dw_conv), require_activation(dw_act, "depthwise"))
    se = se_spec(se_layer.fc1, se_layer.activation, se_layer.fc2, se_layer.scale_activation)
    if not isinstance(se_layer.avgpool, nn.AdaptiveAvgPool2d):
        raise NotFusable("SqueezeExcitation pooling is not AdaptiveAvgPool2d")
    return MBConvPlan(
        pre=pre, dw=dw, se=se, post=_folded(layers[idx + 1:]),
        residual=bool(block.use_res_connect), original=block, source=NAME,
    )
