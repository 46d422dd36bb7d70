"""Adapter for torchvision's inverted-residual blocks.

* ``efficientnet.MBConv`` (EfficientNet B0-B7, EfficientNetV2's MBConv stages): expand,
  depthwise + SiLU, ``SqueezeExcitation`` (SiLU, sigmoid), project; stochastic depth
  (training only) on the residual.
* ``efficientnet.FusedMBConv`` (EfficientNetV2's early stages): left alone, it has a full
  k x k conv where MBConv has expand + depthwise, so there is nothing for the depthwise
  kernel to fuse.
* ``mobilenetv2.InvertedResidual`` (ReLU6, no SE), ``mobilenetv3.InvertedResidual``
  (ReLU / hard-swish, SE with ReLU and hard-sigmoid), ``mnasnet._InvertedResidual`` (ReLU,
  a flat ``nn.Sequential``).

Each block's ``nn.Sequential`` is read as a chain: ``Conv2dNormActivation`` layers are
taken apart into conv, norm and activation, the depthwise conv is found, what comes before
it is the expansion and what comes after the depthwise activation (and SE) the projection.
A depthwise activation or SE kind the kernels do not compute leaves the block alone.
"""

from __future__ import annotations

from torch import nn

from ..nn import MBConvPlan
from ._common import (
    NotFusable, child_call, conv_bn_act, dw_spec, is_activation, is_batchnorm, loaded_types,
    plain_conv_padding, require_activation, se_spec,
)

NAME = "torchvision"

_MODULES = {
    "efficientnet": "torchvision.models.efficientnet",
    "mobilenetv2": "torchvision.models.mobilenetv2",
    "mobilenetv3": "torchvision.models.mobilenetv3",
    "mnasnet": "torchvision.models.mnasnet",
}


def _types() -> dict[type, str]:
    found: dict[type, str] = {}
    for cls in loaded_types(_MODULES["efficientnet"], "MBConv"):
        found[cls] = "MBConv"
    for cls in loaded_types(_MODULES["efficientnet"], "FusedMBConv"):
        found[cls] = "FusedMBConv"
    for cls in loaded_types(_MODULES["mobilenetv2"], "InvertedResidual"):
        found[cls] = "MobileNetV2"
    for cls in loaded_types(_MODULES["mobilenetv3"], "InvertedResidual"):
        found[cls] = "MobileNetV3"
    for cls in loaded_types(_MODULES["mnasnet"], "_InvertedResidual"):
        found[cls] = "MNASNet"
    return found


def block_types() -> tuple[type, ...]:
    return tuple(_types())


def _is_cna(layer: nn.Module) -> bool:
    """A torchvision ``Conv2dNormActivation`` (an ``nn.Sequential`` of conv, norm, activation)."""
    return isinstance(layer, nn.Sequential) and type(layer).__name__ in ("Conv2dNormActivation", "ConvNormActivation")


def _is_se(layer: nn.Module) -> bool:
    return type(layer).__name__ == "SqueezeExcitation" and all(
        hasattr(layer, a) for a in ("avgpool", "fc1", "activation", "fc2", "scale_activation"))


def _flat(layers: list[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for layer in layers:
        if _is_cna(layer):
            out.extend(layer.children())
        else:
            out.append(layer)
    return out


def _chain(modules: list[nn.Module]) -> tuple:
    """``modules`` (run in order) as a folded :class:`PointwiseSpec` when they are conv, BN (, activation)."""
    if len(modules) in (2, 3) and isinstance(modules[0], nn.Conv2d) and is_batchnorm(modules[1]):
        act = modules[2] if len(modules) == 3 else None
        if act is None or is_activation(act):
            return conv_bn_act(modules[0], modules[1], act, tuple(modules))
    return tuple(modules)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _plan_sequence(layers: list[nn.Module], residual: bool, block: nn.Module, drop=None) -> MBConvPlan:
    """Plan a block computed as ``nn.Sequential(layers)`` (+ ``drop`` of it + the input when ``residual``)."""
    items = _flat(layers)
    d = next((i for i, m in enumerate(items) if _is_depthwise(m)), None)
    if d is None:
        raise NotFusable("no depthwise conv in the block")
    if any(_is_se(m) or _is_depthwise(m) for m in items[:d]):
        raise NotFusable("block layout is not [expand], depthwise, [SE], project")
    if d + 1 >= len(items):
        raise NotFusable("depthwise conv is not followed by a norm")
    dw_conv, dw_bn = items[d], items[d + 1]
    j = d + 2
    act = None
    if j < len(items) and not _is_se(items[j]) and not isinstance(items[j], nn.Conv2d):
        act, j = items[j], j + 1
    kind = require_activation(act, "depthwise")
    dw = dw_spec(dw_conv, dw_bn, plain_conv_padding(dw_conv), kind)
    se = None
    if j < len(items) and _is_se(items[j]):
        se_layer = items[j]
        pool = getattr(se_layer, "avgpool", None)
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            raise NotFusable("SqueezeExcitation pooling is not AdaptiveAvgPool2d(1)")
        se = se_spec(se_layer.fc1, se_layer.activation, se_layer.fc2, se_layer.scale_activation)
        j += 1
    post = items[j:]
    if not post or any(_is_se(m) or _is_depthwise(m) for m in post):
        raise NotFusable("block layout is not [expand], depthwise, [SE], project")
    return MBConvPlan(pre=_chain(items[:d]), dw=dw, se=se, post=_chain(post), residual=bool(residual),
                      original=block, source=NAME, drop=drop)


def plan(block: nn.Module) -> MBConvPlan:
    """Describe a torchvision ``MBConv`` / ``InvertedResidual`` / ``_InvertedResidual`` for fusion."""
    kind = _types().get(type(block))
    if kind == "FusedMBConv":
        raise NotFusable("FusedMBConv has a full kxk conv in place of expand + depthwise: "
                         "nothing for the depthwise kernel to fuse")
    if kind == "MBConv":  # EfficientNet: StochasticDepth on the residual branch
        return _plan_sequence(list(block.block.children()), block.use_res_connect, block,
                              drop=child_call(block, "stochastic_depth"))
    if kind == "MobileNetV3":
        return _plan_sequence(list(block.block.children()), block.use_res_connect, block)
    if kind == "MobileNetV2":
        return _plan_sequence(list(block.conv.children()), block.use_res_connect, block)
    if kind == "MNASNet":
        return _plan_sequence(list(block.layers.children()), block.apply_residual, block)
    raise NotFusable(f"{type(block).__name__} is not a torchvision block this adapter knows")
