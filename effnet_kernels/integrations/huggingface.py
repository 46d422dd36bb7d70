"""Adapter for Hugging Face transformers' ``EfficientNetBlock``
(``transformers.models.efficientnet.modeling_efficientnet``, ``EfficientNetForImageClassification``).

The block is ``expansion`` (``EfficientNetExpansionLayer``: 1x1 conv, BN, act; absent for
expand ratio 1), ``depthwise_conv`` (``EfficientNetDepthwiseLayer``), ``squeeze_excite``
(``EfficientNetSqueezeExciteLayer``: mean, reduce, act, expand, sigmoid) and ``projection``
(``EfficientNetFinalBlockLayer``: 1x1 conv, BN, then, when ``apply_dropout``, dropout and the
residual). Quirks:

* the depthwise layer pads with its own ``nn.ZeroPad2d`` only when its ``stride == 2``
  (``correct_pad``: ``(k//2 - 1, k//2)`` on each axis, or symmetric ``k//2`` for the blocks in
  ``config.depthwise_padding``) and its conv then has ``padding="valid"``; with stride 1 the
  conv pads itself (``padding="same"``: ``k//2`` on every side) and the pad module is unused;
* the residual is taken when ``projection.apply_dropout`` (``stride == 1 and not id_skip``),
  after an ``nn.Dropout`` that is the identity in eval (training runs the block's own forward).

The stem (``EfficientNetEmbeddings``: zero pad, conv, BN, activation) is a container that
:mod:`effnet_kernels.stem_head` fuses; the head (``top_conv``, ``top_bn``, ``top_activation``,
siblings in ``EfficientNetEncoder.forward``) is fused through :func:`method_specs`.
"""

from __future__ import annotations

import functools

from torch import nn

from ..nn import MBConvPlan
from ..sibling_stems import Chain, MethodSpec, module_chain_parts
from ._common import (
    NotFusable, activation_kind, conv_padding, dw_spec, is_plain_conv, loaded_types, pointwise,
    require_activation, se_spec, zero_pad,
)

NAME = "huggingface"
_MODULE = "transformers.models.efficientnet.modeling_efficientnet"


def block_types() -> tuple[type, ...]:
    return loaded_types(_MODULE, "EfficientNetBlock")


def _child(module: nn.Module, name: str, what: str) -> nn.Module:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        raise NotFusable(f"{what} has no {name} module")
    return child


def _conv_padding(conv: nn.Module, extra=(0, 0, 0, 0)):
    if not is_plain_conv(conv):
        raise NotFusable(f"conv is {type(conv).__name__}, not a plain nn.Conv2d")
    return conv_padding(conv, extra)


def plan(block: nn.Module) -> MBConvPlan:
    """Describe a transformers ``EfficientNetBlock`` for fusion."""
    pre: tuple = ()
    if block.expand_ratio != 1:
        ex = _child(block, "expansion", "block")
        conv, bn, act = ex.expand_conv, ex.expand_bn, ex.expand_act
        pre = (pointwise(conv, bn, activation_kind(act), (conv, bn, act), padding=_conv_padding(conv))
               if is_plain_conv(conv) else (conv, bn, act))

    dw_layer = _child(block, "depthwise_conv", "block")
    conv = dw_layer.depthwise_conv
    if not isinstance(conv, nn.Conv2d):
        raise NotFusable(f"depthwise conv is {type(conv).__name__}, not an nn.Conv2d")
    extra = zero_pad(dw_layer.depthwise_conv_pad) if dw_layer.stride == 2 else (0, 0, 0, 0)
    dw = dw_spec(conv, dw_layer.depthwise_norm, _conv_padding(conv, extra),
                 require_activation(dw_layer.depthwise_act, "depthwise"))

    se_layer = _child(block, "squeeze_excite", "block")
    pool = getattr(se_layer, "squeeze", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        raise NotFusable("squeeze-excite pooling is not AdaptiveAvgPool2d(1)")
    se = se_spec(se_layer.reduce, se_layer.act_reduce, se_layer.expand, se_layer.act_expand)

    proj = _child(block, "projection", "block")
    conv, bn = proj.project_conv, proj.project_bn
    post = (pointwise(conv, bn, "identity", (conv, bn), padding=_conv_padding(conv))
            if is_plain_conv(conv) else (conv, bn))
    residual = bool(proj.apply_dropout)
    if residual and not isinstance(getattr(proj, "dropout", None), nn.Dropout):
        raise NotFusable(f"projection dropout is {type(getattr(proj, 'dropout', None)).__name__}, not nn.Dropout")
    return MBConvPlan(pre=pre, dw=dw, se=se, post=post, residual=residual, original=block, source=NAME,
                      drop=functools.partial(_dropout, proj), drop_per_sample=False)


def _dropout(proj: nn.Module, t):
    """The projection's elementwise ``nn.Dropout`` of the residual branch (``t`` itself when it drops nothing)."""
    dropout = proj.dropout
    if not dropout.training or dropout.p == 0.0:
        return t
    return dropout(t)


# ---------------------------------------------------------------- the head
def _encoder_forward(encoder: nn.Module, run_chain, hidden_states, output_hidden_states=False, return_dict=True):
    """transformers 5's ``EfficientNetEncoder.forward``: the blocks, then the head (``top_conv``,
    ``top_bn``, ``top_activation``); the output class is the library's own."""
    all_hidden_states = (hidden_states,) if output_hidden_states else None
    for block in encoder.blocks:
        hidden_states = block(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
    hidden_states = run_chain("head", hidden_states)
    if not return_dict:
        return tuple(v for v in [hidden_states, all_hidden_states] if v is not None)
    output = type(encoder).forward.__globals__["BaseModelOutputWithNoAttention"]
    return output(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


METHOD_SPECS = (
    MethodSpec(NAME, _MODULE, "EfficientNetEncoder", "forward",
               ("blocks", "top_conv", "top_bn", "top_activation", "tuple", "BaseModelOutputWithNoAttention"),
               (Chain("head", "top_conv", "top_bn", "top_activation"),), _encoder_forward, module_chain_parts),
)


def method_specs() -> tuple[MethodSpec, ...]:
    """The transformers method whose head chain ``convert`` fuses (the stem is a container: ``stem_head``)."""
    return METHOD_SPECS
