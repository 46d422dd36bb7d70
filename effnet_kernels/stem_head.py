"""A network's stem and head: a ``conv -> BatchNorm -> activation`` container as one op.

:func:`effnet_kernels.convert` swaps each such container outside the MBConv blocks (the stem
and the head of :mod:`effnet_kernels.models` and of torchvision's EfficientNet / MobileNet /
..., whose ``Conv2dNormActivation`` is this pattern) for a :class:`FusedConvBNAct`. In eval
with running statistics the BatchNorm is folded into the conv and the three run as one op:
:func:`effnet_kernels.ops.pointwise_conv` for a 1x1 conv (the head),
:func:`effnet_kernels.ops.conv_bn_act` for a k x k conv (the stem); in training with that
BatchNorm frozen too (fine-tuning), with autograd through the fold. In training with batch
statistics, or once its children are no longer a plain conv, BN and activation, it runs them
in sequence as the container did.

The fused module is an ``nn.Sequential`` holding the container's own children under their
names (``state_dict`` keys, indexing and iteration unchanged); it reads them at call time, so
replacing a child after conversion is always honoured.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._norms import is_batchnorm, normalises_only, num_features
from .nn import (
    KERNEL_DTYPES, _refuse_kernel_backend, autocast_input, bn_uses_running_stats, cached_fold, fold_into_conv,
    pinned_backend,
)

Tensor = torch.Tensor

__all__ = ["FusedConvBNAct", "container_types", "fusable_reason"]


def container_types() -> tuple[type, ...]:
    """The container classes :func:`effnet_kernels.convert` fuses: this package's
    :class:`~effnet_kernels.blocks.ConvBNAct` and torchvision's ``Conv2dNormActivation`` (if loaded)."""
    from .blocks import ConvBNAct
    from .integrations._common import loaded_types

    return (ConvBNAct,) + loaded_types("torchvision.ops.misc", "Conv2dNormActivation")


def _parts(container: nn.Module) -> tuple[Any, Any, Any]:
    children = list(container._modules.values())
    if len(children) not in (2, 3):
        return None, None, None
    return children[0], children[1], (children[2] if len(children) == 3 else None)


def _is_pointwise(conv: Any) -> bool:
    """A 1x1, stride-1, unpadded conv: one ``pointwise_conv`` (else ``conv_bn_act``)."""
    return (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0))


def fusable_reason(container: nn.Module) -> Optional[str]:
    """Why ``container`` (conv, BN[, activation] in sequence) cannot run as one op, or None."""
    from .integrations._common import activation_kind, dw_activations, is_plain_conv

    conv, bn, act = _parts(container)
    if conv is None:
        return f"{len(container._modules)} children, not conv, BatchNorm[, activation]"
    if not is_plain_conv(conv):
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        return "the conv is grouped, dilated or not zero-padded"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0 or isinstance(conv.padding, str) or tuple(conv.stride) not in ((1, 1), (2, 2)):
        return f"the conv ({kh}x{kw}, stride {tuple(conv.stride)}, padding {conv.padding!r}) is not an odd square kernel " \
               "with stride 1 or 2 and int padding"
    if not is_batchnorm(bn) or not normalises_only(bn):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if num_features(bn) != conv.out_channels:
        return "the BatchNorm has the wrong number of features"
    kind = activation_kind(act)
    if kind not in dw_activations():
        return f"activation {type(act).__name__} is not one the kernels compute ({', '.join(dw_activations())})"
    return None


class FusedConvBNAct(nn.Sequential):
    """``conv -> BatchNorm -> activation`` as one op in eval (see the module docstring).

    Build one with :meth:`from_container` (what :func:`effnet_kernels.convert` does); the
    container itself is kept for :func:`effnet_kernels.revert`.
    """

    @classmethod
    def from_container(cls, container: nn.Module, backend: Optional[str] = None) -> "FusedConvBNAct":
        reason = fusable_reason(container)
        if reason is not None:
            raise ValueError(f"cannot fuse {type(container).__name__}: {reason}")
        self = cls()
        for name, child in container.named_children():
            self.add_module(name, child)
        self.training = container.training
        self.__dict__["original"] = container  # not a child: revert() gives it back
        self.backend = pinned_backend(backend)
        return self

    def __getattr__(self, name: str) -> Any:
        # the container's own attributes (torchvision's ``out_channels``) stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)

    def unfused_reason(self, x: Optional[Tensor] = None) -> Optional[str]:
        """Why the next forward (of ``x``, if given) runs the children in sequence, or None. In training
        the container fuses when its BatchNorm is frozen (eval mode, or a frozen BatchNorm module): it then
        computes what it computes in eval, and the op's autograd (gradients through the differentiable
        fold to the conv weight, gamma and beta) saves only the op's input."""
        reason = fusable_reason(self)
        if reason is not None:
            return reason
        if not bn_uses_running_stats(_parts(self)[1]):
            return "training" if self.training else "the BatchNorm does not use running statistics"
        if x is not None and x.dtype not in KERNEL_DTYPES:
            return f"inputs of dtype {x.dtype} run eagerly"
        return None

    def _folded(self, conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
        return cached_fold(self, conv, bn, lambda: fold_into_conv(conv, bn))

    def forward(self, x: Tensor) -> Tensor:
        reason = self.unfused_reason(x)
        if reason is not None:
            if x.dtype not in KERNEL_DTYPES and not self.training:
                _refuse_kernel_backend(self.backend, x)
            return super().forward(x)
        from .integrations._common import activation_kind, conv_padding

        conv, bn, act = _parts(self)
        weight, bias = self._folded(conv, bn)
        activation = activation_kind(act)
        x = autocast_input(x)  # what the conv computes in under autocast
        if _is_pointwise(conv):
            return ops.pointwise_conv(x, weight.reshape(weight.shape[0], weight.shape[1]), bias,
                                      activation=activation, backend=self.backend)
        return ops.conv_bn_act(x, weight, bias, stride=tuple(conv.stride), padding=conv_padding(conv),
                               activation=activation, backend=self.backend)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``adaptive_avg_pool2d(self(x), 1).flatten(1)`` (a head and the global average pool after it),
        as one :func:`~effnet_kernels.ops.pointwise_conv` with ``pool=True`` when the conv is 1x1 and
        the forward would fuse: the head's output is never stored. In the dtype the head computes in
        (x's, or autocast's), as the pool's is."""
        if not _is_pointwise(_parts(self)[0]) or self.unfused_reason(x) is not None:
            return torch.flatten(F.adaptive_avg_pool2d(self(x), 1), 1)
        from .integrations._common import activation_kind

        conv, bn, act = _parts(self)
        weight, bias = self._folded(conv, bn)
        x = autocast_input(x)
        pooled = ops.pointwise_conv(x, weight.reshape(weight.shape[0], weight.shape[1]), bias,
                                    activation=activation_kind(act), pool=True, backend=self.backend)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"fused from {type(self.original).__name__}, backend={self.backend or 'auto'}"
