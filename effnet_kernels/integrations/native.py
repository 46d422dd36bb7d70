"""Adapter for this package's own eager blocks (:mod:`effnet_kernels.blocks`)."""

from __future__ import annotations

import functools

from torch import nn

from ..nn import MBConvPlan, SESpec
from ._common import activation_kind, conv_padding, dw_spec, pointwise, require_activation

NAME = "effnet_kernels"


def block_types() -> tuple[type, ...]:
    from ..blocks import MBConvBlock

    return (MBConvBlock,)


def drop_path(t, p: float, training: bool):
    """:func:`effnet_kernels.blocks.drop_path`, looked up when called."""
    from ..blocks import drop_path as block_drop_path

    return block_drop_path(t, p, training)


def _drop_path(block: nn.Module, t):
    """The block's drop path of ``t`` at its ``drop_path_rate`` (read at each call), in training."""
    return drop_path(t, block.drop_path_rate, True)


def plan_native(block: nn.Module) -> MBConvPlan:
    """Describe an :class:`effnet_kernels.blocks.MBConvBlock` for fusion."""
    pre: tuple = ()
    if hasattr(block, "expand_conv"):
        pre = pointwise(block.expand_conv, block.expand_bn, activation_kind(block.expand_act),
                        (block.expand_conv, block.expand_bn, block.expand_act))
    dw = dw_spec(block.dw_conv, block.dw_bn, conv_padding(block.dw_conv), require_activation(block.dw_act, "depthwise"))
    se = SESpec(block.se.conv_reduce, block.se.conv_expand) if getattr(block, "se", None) is not None else None
    if se is not None:
        require_activation(block.se.act, "SE")
    return MBConvPlan(
        pre=pre, dw=dw, se=se,
        post=pointwise(block.project_conv, block.project_bn, "identity", (block.project_conv, block.project_bn)),
        residual=bool(block.has_residual), original=block, source=NAME,
        drop=functools.partial(_drop_path, block),  # called in training only
    )


plan = plan_native
