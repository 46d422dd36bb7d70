"""Adapter for timm's ``InvertedResidual`` and ``DepthwiseSeparableConv`` (EfficientNet, MobileNet, MixNet, ...).

Handles ``BatchNormAct2d`` (BN with its activation inside; any activation the kernels
compute: SiLU, ReLU, ReLU6, hard-swish as they land), ``pad_type='same'`` (``Conv2dSame``:
dynamic TF padding; static "same" is a plain padded conv), ``drop_path``, ``noskip`` and
SE with ReLU / hard-sigmoid (MobileNetV3). Left alone, with the reason: space-to-depth,
anti-aliasing, ``MixedConv2d`` depthwise convs (MixNet: one conv per kernel size on channel
splits), activations or SE kinds the kernels do not compute, ``EdgeResidual`` and
``CondConvResidual``.

Stems and heads (:func:`method_specs`, :mod:`effnet_kernels.sibling_stems`): ``EfficientNet``'s
(also MobileNetV2, MixNet, MNASNet, EfficientNet-Lite, TinyNet) ``conv_stem`` + ``bn1`` and
``conv_head`` + ``bn2`` in ``forward_features``, ``MobileNetV3``'s ``conv_stem`` + ``bn1`` (its head
conv runs after the pool, on one pixel), the ``features_only`` models' stems (``EfficientNetFeatures``:
``conv_stem`` + ``bn1``; ``MobileNetV3Features``: + ``act1``) in their ``forward``, and the ``ConvBnAct``
block's ``conv`` + ``bn1`` (MobileNetV3's last stage: a 1x1 conv to 960 channels) in its ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._norms import normalises_only
from ..nn import MBConvPlan
from ..sibling_stems import Chain, MethodSpec, PartsResult, make_parts, module_chain_parts
from ._common import (
    NotFusable, child_call, conv_padding, dw_spec, is_plain_conv, loaded_module, pointwise, require_activation, se_spec,
)

NAME = "timm"
_BLOCK_MODULES = ("timm.models._efficientnet_blocks", "timm.models.efficientnet_blocks")
_FUSABLE = ("InvertedResidual", "DepthwiseSeparableConv")
_LEFT_ALONE = {
    "EdgeResidual": "EdgeResidual has a full kxk conv in place of expand + depthwise: nothing for the depthwise kernel to fuse",
    "CondConvResidual": "CondConvResidual's convs are per-sample mixtures of experts (CondConv2d), not fused",
}


def _types() -> dict[type, str]:
    for name in _BLOCK_MODULES:
        mod = loaded_module(name)
        if mod is not None:
            found = {}
            for n in _FUSABLE + tuple(_LEFT_ALONE):
                cls = getattr(mod, n, None)
                if isinstance(cls, type):
                    found[cls] = n
            return found
    return {}


def block_types() -> tuple[type, ...]:
    return tuple(_types())


def _padding(conv: nn.Module):
    kind = type(conv).__name__
    if not isinstance(conv, nn.Conv2d):
        raise NotFusable(f"conv is {kind}, not an nn.Conv2d")
    if kind == "Conv2dSame":
        return "same"
    if kind == "Conv2dSameExport":
        pad = getattr(conv, "pad", None)
        if pad is None or getattr(pad, "pad", None) is None:
            raise NotFusable("Conv2dSameExport without a resolved padding")
        return conv_padding(conv, tuple(pad.pad))  # type: ignore[arg-type]
    if not is_plain_conv(conv):
        raise NotFusable(f"conv {kind} has a forward of its own (unknown padding)")
    return conv_padding(conv)


def _norm_act(bn: nn.Module, where: str) -> str:
    """The kind of activation a timm norm layer applies after normalising (NotFusable if the kernels
    do not compute it: :func:`~._common.require_activation`).

    A norm whose forward only normalises applies none, whatever children it carries
    (:func:`~effnet_kernels._norms.normalises_only`: ``nn.SyncBatchNorm.convert_sync_batchnorm``
    turns a ``BatchNormAct2d`` into a ``SyncBatchNorm`` that keeps ``act`` and ``drop`` as children
    but never calls them; ``freeze_batch_norm_2d``'s ``FrozenBatchNorm2d``). ``BatchNormAct2d`` and
    ``FrozenBatchNormAct2d`` apply their ``drop`` (which must be an identity) and ``act``.
    """
    if normalises_only(bn):
        return "identity"
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise NotFusable(f"{where} norm has a dropout inside")
    return require_activation(getattr(bn, "act", None), where)


def _folded(conv: nn.Module, bn: nn.Module, where: str) -> tuple:
    """``conv`` + timm norm(-act) layer as a folded :class:`PointwiseSpec`, else the two modules."""
    if not isinstance(conv, nn.Conv2d):  # e.g. MixedConv2d, CondConv2d: runs as it is
        return (conv, bn)
    try:
        kind = _norm_act(bn, where)
        padding = _padding(conv)
    except NotFusable:
        return (conv, bn)
    return pointwise(conv, bn, kind, (conv, bn), padding=padding)


def plan(block: nn.Module) -> MBConvPlan:
    """Describe a timm ``InvertedResidual`` / ``DepthwiseSeparableConv`` for fusion."""
    kind = _types().get(type(block))
    if kind in _LEFT_ALONE:
        raise NotFusable(_LEFT_ALONE[kind])
    if getattr(block, "conv_s2d", None) is not None:
        raise NotFusable("space-to-depth stem (s2d) is not fused")
    aa = getattr(block, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        raise NotFusable("anti-aliased downsampling is not fused")
    inverted = hasattr(block, "conv_pwl")
    conv_dw = block.conv_dw
    if type(conv_dw).__name__ == "MixedConv2d":
        sizes = sorted({int(getattr(c, "kernel_size", (0,))[0]) for c in conv_dw.children()})
        raise NotFusable(f"depthwise conv is a MixedConv2d (kernels {'/'.join(map(str, sizes))} on channel splits), "
                         "not one nn.Conv2d")
    if not isinstance(conv_dw, nn.Conv2d):
        raise NotFusable(f"depthwise conv is {type(conv_dw).__name__}, not an nn.Conv2d")
    dw_bn = block.bn2 if inverted else block.bn1
    act_kind = _norm_act(dw_bn, "depthwise")
    dw = dw_spec(conv_dw, dw_bn, _padding(conv_dw), act_kind)
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
    return MBConvPlan(pre=pre, dw=dw, se=se, post=post, residual=bool(block.has_skip), original=block, source=NAME,
                      drop=child_call(block, "drop_path"))  # DropPath (per sample) or nn.Identity


# ---------------------------------------------------------------- stems and heads
def _chain_parts(chain: Chain, conv, norm, act) -> PartsResult:
    """A timm conv (plain, ``Conv2dSame``, ``Conv2dSameExport``) + norm-act layer (``act`` is None: the norm
    applies it), or + a norm and an activation module of its own (``MobileNetV3Features``' ``act1``)."""
    if chain.act is not None:
        return module_chain_parts(chain, conv, norm, act, conv_ok=lambda c: True, padding=_padding)  # _padding checks it
    return make_parts(conv, norm, lambda: (_norm_act(norm, chain.name), _padding(conv)))


def _stem_and_blocks(model: nn.Module, run_chain, x: torch.Tensor) -> torch.Tensor:
    x = run_chain("stem", x)
    if model.grad_checkpointing and not torch.jit.is_scripting():
        checkpoint_seq = type(model).forward_features.__globals__["checkpoint_seq"]  # the library's own
        return checkpoint_seq(model.blocks, x, flatten=True)
    return model.blocks(x)


def _efficientnet_forward_features(model: nn.Module, run_chain, x: torch.Tensor) -> torch.Tensor:
    """timm 1.0's ``EfficientNet.forward_features``: stem, blocks (checkpointed if asked), head."""
    return run_chain("head", _stem_and_blocks(model, run_chain, x))


def _mobilenetv3_forward_features(model: nn.Module, run_chain, x: torch.Tensor) -> torch.Tensor:
    """timm 1.0's ``MobileNetV3.forward_features``: stem, blocks (checkpointed if asked)."""
    return _stem_and_blocks(model, run_chain, x)


def _features_forward(model: nn.Module, run_chain, x: torch.Tensor) -> list:
    """timm 1.0's ``EfficientNetFeatures.forward`` / ``MobileNetV3Features.forward`` (``features_only``):
    the stem, then the blocks, collecting each stage's output (or the feature hooks' outputs)."""
    x = run_chain("stem", x)
    if model.feature_hooks is None:
        checkpoint = type(model).forward.__globals__["checkpoint"]  # the library's own
        features = [x] if 0 in model._stage_out_idx else []
        for i, b in enumerate(model.blocks):
            x = checkpoint(b, x) if model.grad_checkpointing and not torch.jit.is_scripting() else b(x)
            if i + 1 in model._stage_out_idx:
                features.append(x)
        return features
    model.blocks(x)
    return list(model.feature_hooks.get_output(x.device).values())


def _conv_bn_act_forward(block: nn.Module, run_chain, x: torch.Tensor) -> torch.Tensor:
    """timm 1.0's ``ConvBnAct.forward``: conv + norm-act, anti-aliasing, the residual (with drop path) if any."""
    shortcut = x
    x = block.aa(run_chain("conv", x))
    if block.has_skip:
        x = block.drop_path(x) + shortcut
    return x


_STEM = Chain("stem", "conv_stem", "bn1")
_NAMES = ("conv_stem", "bn1", "grad_checkpointing", "torch", "jit", "is_scripting", "checkpoint_seq", "blocks")
_FEATURES = ("feature_hooks", "_stage_out_idx", "append", "enumerate", "blocks", "grad_checkpointing", "torch", "jit",
             "is_scripting", "checkpoint", "get_output", "device", "list", "values")
METHOD_SPECS = (
    MethodSpec(NAME, "timm.models.efficientnet", "EfficientNet", "forward_features", _NAMES + ("conv_head", "bn2"),
               (_STEM, Chain("head", "conv_head", "bn2")), _efficientnet_forward_features, _chain_parts),
    MethodSpec(NAME, "timm.models.mobilenetv3", "MobileNetV3", "forward_features", _NAMES, (_STEM,),
               _mobilenetv3_forward_features, _chain_parts),
    MethodSpec(NAME, "timm.models.efficientnet", "EfficientNetFeatures", "forward", ("conv_stem", "bn1") + _FEATURES,
               (_STEM,), _features_forward, _chain_parts),
    MethodSpec(NAME, "timm.models.mobilenetv3", "MobileNetV3Features", "forward", ("conv_stem", "bn1", "act1") + _FEATURES,
               (Chain("stem", "conv_stem", "bn1", "act1"),), _features_forward, _chain_parts),
    MethodSpec(NAME, "timm.models._efficientnet_blocks", "ConvBnAct", "forward",
               ("conv", "bn1", "aa", "has_skip", "drop_path"), (Chain("conv", "conv", "bn1"),), _conv_bn_act_forward,
               _chain_parts),
)


def method_specs() -> tuple[MethodSpec, ...]:
    """The timm model and block methods whose conv + norm-act chains ``convert`` fuses."""
    return METHOD_SPECS
