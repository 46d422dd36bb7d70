"""Adapter for ``efficientnet_pytorch.model.MBConvBlock`` (lukemelas/EfficientNet-PyTorch).

Handles static and dynamic TF "same" padding (``Conv2dStaticSamePadding`` with its
``static_padding`` module, ``Conv2dDynamicSamePadding``), ``forward(x, drop_connect_rate)``
and the block's residual rule (``id_skip and stride == 1 and in == out``).

Stem and head (:func:`method_specs`, :mod:`effnet_kernels.sibling_stems`): ``EfficientNet.extract_features``'s
``_swish(_bn0(_conv_stem(x)))`` and ``_swish(_bn1(_conv_head(x)))``.
"""

from __future__ import annotations

from torch import nn

from ..nn import MBConvPlan
from ..sibling_stems import Chain, MethodSpec, PartsResult, module_chain_parts
from ._common import (
    NotFusable, activation_kind, conv_padding, dw_spec, is_plain_conv, loaded_module, pointwise, require_activation,
    se_spec,
)

NAME = "efficientnet_pytorch"


def block_types() -> tuple[type, ...]:
    mod = loaded_module("efficientnet_pytorch.model")
    return (mod.MBConvBlock,) if mod is not None else ()


def _padding(conv: nn.Conv2d):
    kind = type(conv).__name__
    if kind == "Conv2dDynamicSamePadding":
        return "same"
    if kind == "Conv2dStaticSamePadding":
        pad = conv.static_padding
        extra = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        if not isinstance(pad, (nn.ZeroPad2d, nn.Identity)):
            raise NotFusable(f"static padding module {type(pad).__name__} is not ZeroPad2d")
        return conv_padding(conv, extra)  # type: ignore[arg-type]
    return conv_padding(conv)


def plan(block: nn.Module) -> MBConvPlan:
    """Describe an efficientnet_pytorch ``MBConvBlock`` for fusion."""
    args = block._block_args
    act = block._swish
    pre: tuple = ()
    if args.expand_ratio != 1:
        pre = pointwise(block._expand_conv, block._bn0, activation_kind(act), (block._expand_conv, block._bn0, act),
                        padding=_padding(block._expand_conv))
    dw = dw_spec(block._depthwise_conv, block._bn1, _padding(block._depthwise_conv), require_activation(act, "block"))
    se = None
    if block.has_se:
        se = se_spec(block._se_reduce, act, block._se_expand, nn.Sigmoid(),  # the block applies torch.sigmoid
                     paddings=(_padding(block._se_reduce), _padding(block._se_expand)))
    residual = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
    return MBConvPlan(
        pre=pre, dw=dw, se=se,
        post=pointwise(block._project_conv, block._bn2, "identity", (block._project_conv, block._bn2),
                       padding=_padding(block._project_conv)),
        residual=residual, original=block, source=NAME, drop=_drop_connect,
    )


def _drop_connect(t, drop_connect_rate=None):
    """The block's ``drop_connect`` of the residual branch (training only), given the forward's rate."""
    if not drop_connect_rate:
        return t
    return loaded_module("efficientnet_pytorch.utils").drop_connect(t, p=drop_connect_rate, training=True)


# ---------------------------------------------------------------- stem and head
_CONV_CLASSES = ("Conv2dStaticSamePadding", "Conv2dDynamicSamePadding")


def _known_conv(conv) -> bool:
    """A plain conv, or one of the library's own "same"-padding convs (whose padding ``_padding`` reads)."""
    return is_plain_conv(conv) or (type(conv).__name__ in _CONV_CLASSES and type(conv).__module__.startswith(NAME))


def _chain_parts(chain: Chain, conv, norm, act) -> PartsResult:
    return module_chain_parts(chain, conv, norm, act, conv_ok=_known_conv, padding=_padding)


def _extract_features(model: nn.Module, run_chain, inputs):
    """efficientnet_pytorch 0.7's ``EfficientNet.extract_features``: stem, blocks (each given its
    drop-connect rate), head."""
    x = run_chain("stem", inputs)
    for idx, block in enumerate(model._blocks):
        drop_connect_rate = model._global_params.drop_connect_rate
        if drop_connect_rate:
            drop_connect_rate *= float(idx) / len(model._blocks)
        x = block(x, drop_connect_rate=drop_connect_rate)
    return run_chain("head", x)


METHOD_SPECS = (
    MethodSpec(NAME, "efficientnet_pytorch.model", "EfficientNet", "extract_features",
               ("_swish", "_bn0", "_conv_stem", "enumerate", "_blocks", "_global_params", "drop_connect_rate", "float",
                "len", "_bn1", "_conv_head"),
               (Chain("stem", "_conv_stem", "_bn0", "_swish"), Chain("head", "_conv_head", "_bn1", "_swish")),
               _extract_features, _chain_parts),
)


def method_specs() -> tuple[MethodSpec, ...]:
    """The efficientnet_pytorch model methods whose stem and head chains ``convert`` fuses."""
    return METHOD_SPECS
