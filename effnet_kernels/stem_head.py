"""A network's stem and head: ``conv -> BatchNorm -> activation`` as one op.

:func:`effnet_kernels.convert` swaps each such container outside the MBConv blocks (the stem
and the head of :mod:`effnet_kernels.models`, torchvision's ``Conv2dNormActivation``, Hugging
Face's ``EfficientNetEmbeddings``: a zero pad first) for a :class:`FusedConvBNAct`. In eval
with running statistics the BatchNorm is folded into the conv and the three run as one op:
:func:`effnet_kernels.ops.pointwise_conv` for a 1x1 conv (the head),
:func:`effnet_kernels.ops.conv_bn_act` for a k x k conv (the stem); in training with that
BatchNorm frozen too (fine-tuning), with autograd through the fold. In training with batch
statistics, or once its children are no longer a plain conv, BN and activation, it runs them
in sequence as the container did.

The fused module is an ``nn.Sequential`` holding the container's own children under their
names (``state_dict`` keys, indexing and iteration unchanged); it reads them at call time, so
replacing a child after conversion is always honoured.

:class:`ConvBNActParts` and :func:`parts_reason` / :func:`run_reason` / :func:`run_fused` are the
op itself, shared with :mod:`effnet_kernels.sibling_stems` (stems and heads whose conv, norm
and activation are attributes of the model, as in timm and efficientnet_pytorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as ek_nn
from . import ops
from ._hooks import hooks_reason, submodules
from ._norms import is_batchnorm, normalises_only, num_features
from .nn import (
    KERNEL_DTYPES, Padding, _refuse_kernel_backend, autocast_input, bn_uses_running_stats, cached_fold,
    fold_into_conv, pinned_backend, transform_reason,
)

Tensor = torch.Tensor

__all__ = ["ConvBNActParts", "FusedConvBNAct", "container_types", "fusable_reason", "parts_reason", "run_fused",
           "run_reason"]


@dataclass(frozen=True)
class ConvBNActParts:
    """A conv, the BatchNorm after it and the activation after that, as one op computes them."""

    conv: nn.Conv2d
    bn: nn.Module
    activation: str  # one of effnet_kernels.ops._checks.ACTIVATIONS
    #: (left, right, top, bottom), an external pad included, or "same" (TF SAME, from each input's size)
    padding: Padding

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded conv: one ``pointwise_conv`` (else ``conv_bn_act``)."""
        return (tuple(self.conv.kernel_size) == (1, 1) and tuple(self.conv.stride) == (1, 1)
                and (self.padding == "same" or tuple(self.padding) == (0, 0, 0, 0)))

    def resolve_padding(self, x: Tensor) -> tuple[int, int, int, int]:
        if self.padding == "same":
            return ek_nn.tf_same_padding(x.shape[-2], x.shape[-1], self.conv.kernel_size[0], tuple(self.conv.stride))
        return tuple(int(p) for p in self.padding)  # type: ignore[return-value]


def parts_reason(conv: Any, bn: Any, activation: Optional[str], padding: Any) -> Optional[str]:
    """Why ``conv`` (its padding resolved by the caller: ``padding``), ``bn`` and an activation of kind
    ``activation`` cannot run as one op, or None."""
    from .integrations._common import dw_activations

    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        return "the conv is grouped, dilated or not zero-padded"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0 or tuple(conv.stride) not in ((1, 1), (2, 2)):
        return f"the conv ({kh}x{kw}, stride {tuple(conv.stride)}) is not an odd square kernel with stride 1 or 2"
    if padding != "same" and (not isinstance(padding, tuple) or len(padding) != 4
                              or not all(isinstance(p, int) and p >= 0 for p in padding)):
        return f"padding {padding!r} is not 'same' or 4 non-negative ints"
    if not is_batchnorm(bn):
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if num_features(bn) != conv.out_channels:
        return "the BatchNorm has the wrong number of features"
    if activation is None:
        return "the activation is not one the kernels recognise"
    if activation not in dw_activations():
        return f"activation {activation} is not one the kernels compute ({', '.join(dw_activations())})"
    return None


def run_reason(parts: ConvBNActParts, training: bool, x: Optional[Tensor] = None) -> Optional[str]:
    """Why the next forward (of ``x``, if given) of fusable ``parts`` runs them in sequence, or None: the
    BatchNorm normalises with the batch's statistics, ``x`` is of a dtype the kernels do not take, or a
    ``torch.func`` transform is active (:func:`~effnet_kernels.nn.transform_reason`)."""
    if not bn_uses_running_stats(parts.bn):
        return "training" if training else "the BatchNorm does not use running statistics"
    if x is not None and x.dtype not in KERNEL_DTYPES:
        return f"inputs of dtype {x.dtype} run eagerly"
    return transform_reason()


def run_fused(parts: ConvBNActParts, x: Tensor, backend: Optional[str], cache_owner: object, *,
              pool: bool = False) -> Tensor:
    """``act(bn(conv(pad(x))))`` as one op (``pool``: its global average, ``[N, Cout]``, a pointwise conv only).

    The fold of the BatchNorm into the conv is cached on ``cache_owner`` (:func:`~effnet_kernels.nn.cached_fold`).
    In the dtype the conv computes in (``x``'s, or autocast's)."""
    conv, bn = parts.conv, parts.bn
    weight, bias = cached_fold(cache_owner, conv, bn, lambda: fold_into_conv(conv, bn))
    x = autocast_input(x)  # what the conv computes in under autocast
    if parts.pointwise:
        return ops.pointwise_conv(x, weight.reshape(weight.shape[0], weight.shape[1]), bias,
                                  activation=parts.activation, pool=pool, backend=backend)
    if pool:
        raise ValueError(f"pool=True needs a 1x1 stride-1 conv, got {tuple(conv.kernel_size)} stride {tuple(conv.stride)}")
    return ops.conv_bn_act(x, weight, bias, stride=tuple(conv.stride), padding=parts.resolve_padding(x),
                           activation=parts.activation, backend=backend)


def container_types() -> tuple[type, ...]:
    """The container classes :func:`effnet_kernels.convert` fuses: this package's
    :class:`~effnet_kernels.blocks.ConvBNAct`, torchvision's ``Conv2dNormActivation`` and transformers'
    ``EfficientNetEmbeddings`` (those loaded)."""
    from .blocks import ConvBNAct
    from .integrations._common import loaded_types

    return ((ConvBNAct,) + loaded_types("torchvision.ops.misc", "Conv2dNormActivation")
            + loaded_types("transformers.models.efficientnet.modeling_efficientnet", "EfficientNetEmbeddings"))


def _children(container: nn.Module) -> tuple[Any, Any, Any, Any]:
    """``(pad, conv, bn, act)`` of a container's children ``[zero pad,] conv, bn[, act]`` (None where absent)."""
    children = list(container._modules.values())
    pad = None
    if children and isinstance(children[0], (nn.ZeroPad2d, nn.ConstantPad2d)):
        pad, children = children[0], children[1:]
    if len(children) not in (2, 3):
        return None, None, None, None
    return pad, children[0], children[1], (children[2] if len(children) == 3 else None)


def _container_parts(container: nn.Module) -> tuple[Optional[ConvBNActParts], Optional[str]]:
    """The container's :class:`ConvBNActParts` and None, or None and why they cannot run as one op."""
    from .integrations._common import NotFusable, activation_kind, conv_padding, is_plain_conv, zero_pad

    pad, conv, bn, act = _children(container)
    if conv is None:
        return None, f"{len(container._modules)} children, not [zero pad,] conv, BatchNorm[, activation]"
    if not is_plain_conv(conv):
        return None, f"{type(conv).__name__} is not a plain nn.Conv2d"
    if isinstance(conv.padding, str) and conv.padding != "valid" and tuple(conv.stride) != (1, 1):
        return None, f"the conv's padding {conv.padding!r} with stride {tuple(conv.stride)}"
    try:
        extra = zero_pad(pad) if pad is not None else (0, 0, 0, 0)
    except NotFusable as exc:
        return None, str(exc)
    if is_batchnorm(bn) and not normalises_only(bn):
        return None, f"{type(bn).__name__} does more than normalise"
    kind = activation_kind(act)
    if kind is None:
        return None, f"activation {type(act).__name__} is not one the kernels recognise"
    parts = ConvBNActParts(conv, bn, kind, conv_padding(conv, extra))
    reason = parts_reason(conv, bn, kind, parts.padding)
    return (None, reason) if reason is not None else (parts, None)


def fusable_reason(container: nn.Module) -> Optional[str]:
    """Why ``container`` ([zero pad,] conv, BN[, activation] in sequence) cannot run as one op, or None."""
    return _container_parts(container)[1]


class FusedConvBNAct(nn.Sequential):
    """``[zero pad ->] conv -> BatchNorm -> activation`` as one op in eval (see the module docstring).

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

    def _parts(self, x: Optional[Tensor]) -> tuple[Optional[ConvBNActParts], Optional[str]]:
        parts, reason = _container_parts(self)
        if parts is not None:
            reason = hooks_reason(submodules(self.children())) or run_reason(parts, self.training, x)
        return (parts, None) if reason is None else (None, reason)

    def unfused_reason(self, x: Optional[Tensor] = None) -> Optional[str]:
        """Why the next forward (of ``x``, if given) runs the children in sequence, or None. In training
        the container fuses when its BatchNorm is frozen (eval mode, or a frozen BatchNorm module): it then
        computes what it computes in eval, and the op's autograd (gradients through the differentiable
        fold to the conv weight, gamma and beta) saves only the op's input."""
        return self._parts(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        parts, _ = self._parts(x)
        if parts is None:
            if x.dtype not in KERNEL_DTYPES and not self.training:
                _refuse_kernel_backend(self.backend, x)
            return super().forward(x)
        return run_fused(parts, x, self.backend, self)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``adaptive_avg_pool2d(self(x), 1).flatten(1)`` (a head and the global average pool after it),
        as one :func:`~effnet_kernels.ops.pointwise_conv` with ``pool=True`` when the conv is 1x1 and
        the forward would fuse: the head's output is never stored. In the dtype the head computes in
        (x's, or autocast's), as the pool's is."""
        parts, _ = self._parts(x)
        if parts is None or not parts.pointwise:
            return torch.flatten(F.adaptive_avg_pool2d(self(x), 1), 1)
        return run_fused(parts, x, self.backend, self, pool=True).to(autocast_input(x).dtype)

    def extra_repr(self) -> str:
        return f"fused from {type(self.original).__name__}, backend={self.backend or 'auto'}"
