"""Checks shared by the conversion adapters: what a fusable block part looks like.

Activations are recognised by class (PyTorch's own, and the classes timm, efficientnet_pytorch
and transformers use for the same functions) and named with the kernels' names (``"silu"``,
``"relu"``, ``"relu6"``, ``"hardswish"``, ``"identity"``; gates ``"sigmoid"``,
``"hardsigmoid"``). A kind is fusable only where the ops compute it: the depthwise step's
activation must be in ``effnet_kernels.ops._checks.ACTIVATIONS``, the SE path's in
``SE_ACTIVATIONS`` and its gate in ``SE_GATES`` (read at call time).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from torch import nn

from .._norms import is_batchnorm, num_features
from ..nn import DWConvSpec, Padding, PointwiseSpec, SESpec
from ..ops import _checks


def _call_child(owner: nn.Module, name: str, t):
    return getattr(owner, name)(t)


def child_call(owner: nn.Module, name: str) -> Callable:
    """``t -> owner.<name>(t)``, the child looked up at each call (a replaced one is honoured), for a
    plan's ``drop``: a ``functools.partial`` of a module-level function, so a converted model pickles."""
    return functools.partial(_call_child, owner, name)


# torch.nn classes whose forward is exactly the named function
_TORCH_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Identity, "identity"), (nn.SiLU, "silu"), (nn.ReLU, "relu"), (nn.ReLU6, "relu6"),
    (nn.Hardswish, "hardswish"), (nn.Sigmoid, "sigmoid"), (nn.Hardsigmoid, "hardsigmoid"),
)
# other libraries' classes for the same functions: (module prefix, class name) -> kind
_LIBRARY_KINDS: dict[tuple[str, str], str] = {
    ("timm", "Swish"): "silu", ("timm", "SwishMe"): "silu", ("timm", "SwishAuto"): "silu",
    ("timm", "Sigmoid"): "sigmoid", ("timm", "GateSigmoid"): "sigmoid",
    ("timm", "HardSwish"): "hardswish", ("timm", "HardSwishMe"): "hardswish",
    ("timm", "HardSigmoid"): "hardsigmoid", ("timm", "HardSigmoidMe"): "hardsigmoid",
    ("efficientnet_pytorch", "Swish"): "silu", ("efficientnet_pytorch", "MemoryEfficientSwish"): "silu",
    ("transformers", "SiLUActivation"): "silu",
}


class NotFusable(Exception):
    """A block cannot be fused; the message says why (reported by ``convert``)."""


def loaded_module(name: str):
    """The already-imported module ``name``, or None (adapters never import libraries)."""
    return sys.modules.get(name)


def loaded_types(module_name: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of the already-imported module ``module_name`` (those it has)."""
    mod = loaded_module(module_name)
    if mod is None:
        return ()
    return tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))


# ---------------------------------------------------------------- what each op computes
def dw_activations() -> tuple[str, ...]:
    """Activations ``ops.dwconv_bn_act`` (and a folded :class:`PointwiseSpec`) compute."""
    return _checks.ACTIVATIONS


def se_activations() -> tuple[str, ...]:
    """Inner activations ``ops.se_gate`` computes."""
    return _checks.SE_ACTIVATIONS


def se_gates() -> tuple[str, ...]:
    """Gates ``ops.se_gate`` computes."""
    return _checks.SE_GATES


# ---------------------------------------------------------------- activations
def activation_kind(act: object) -> Optional[str]:
    """The kind of an activation or gate module (see the module docstring), or None (not recognised).

    ``None`` is ``"identity"``. A subclass counts only if it keeps its base class's forward.
    """
    if act is None:
        return "identity"
    cls = type(act)
    if cls is nn.Hardtanh and getattr(act, "min_val", None) == 0.0 and getattr(act, "max_val", None) == 6.0:
        return "relu6"
    for base, kind in _TORCH_KINDS:
        if isinstance(act, base) and cls.forward is base.forward:
            return kind
    library = cls.__module__.split(".")[0]
    return _LIBRARY_KINDS.get((library, cls.__name__))


def describe(act: object) -> str:
    kind = activation_kind(act)
    name = type(act).__name__ if act is not None else "None"
    return name if kind is None or kind == name.lower() else f"{name} ({kind})"


def require_kind(act: object, where: str, allowed: tuple[str, ...], what: str = "activation") -> str:
    """``act``'s kind if it is in ``allowed``, else NotFusable saying which kinds the kernel has."""
    kind = activation_kind(act)
    if kind is None:
        raise NotFusable(f"{where} {what} {type(act).__name__} is not one the kernels recognise")
    if kind not in allowed:
        raise NotFusable(f"{where} {what} {describe(act)} is not one the fused kernel computes ({', '.join(allowed)})")
    return kind


def require_activation(act: Optional[nn.Module], where: str) -> str:
    """The depthwise step's activation kind (one of ``ops._checks.ACTIVATIONS``), else NotFusable."""
    return require_kind(act, where, dw_activations())


def is_sigmoid(gate: object) -> bool:
    """True for a sigmoid gate module."""
    return activation_kind(gate) == "sigmoid"


def is_activation(module: object) -> bool:
    """True for a module :func:`activation_kind` recognises (identity included)."""
    return isinstance(module, nn.Module) and activation_kind(module) is not None


# ---------------------------------------------------------------- convs and norms
def is_plain_conv(conv: object) -> bool:
    """An ``nn.Conv2d`` (or subclass) that keeps ``nn.Conv2d``'s own forward."""
    return isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward


def plain_conv_padding(conv: nn.Module, extra: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[int, int, int, int]:
    """:func:`conv_padding` of a conv whose forward is ``nn.Conv2d``'s, else NotFusable."""
    if not isinstance(conv, nn.Conv2d):
        raise NotFusable(f"conv is {type(conv).__name__}, not an nn.Conv2d")
    if not is_plain_conv(conv):
        raise NotFusable(f"conv {type(conv).__name__} has a forward of its own (unknown padding)")
    return conv_padding(conv, extra)


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
    if not is_batchnorm(bn):
        raise NotFusable(f"depthwise norm is {type(bn).__name__}, not a BatchNorm2d")
    if num_features(bn) != c:
        raise NotFusable("depthwise BatchNorm has the wrong number of features")
    if activation not in dw_activations():
        raise NotFusable(f"depthwise activation {activation} is not one the fused kernel computes "
                         f"({', '.join(dw_activations())})")
    if padding != "same" and (len(padding) != 4 or any(int(p) < 0 for p in padding)):
        raise NotFusable(f"padding {padding!r} is not 4 non-negative ints")
    return DWConvSpec(conv, bn, padding if padding == "same" else tuple(int(p) for p in padding), activation)


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


def zero_pad(pad: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of an ``nn.ZeroPad2d`` (or a constant-0 pad), else NotFusable."""
    if not isinstance(pad, (nn.ZeroPad2d, nn.ConstantPad2d)) or float(getattr(pad, "value", 0.0)) != 0.0:
        raise NotFusable(f"padding module {type(pad).__name__} is not a ZeroPad2d")
    p = tuple(int(v) for v in pad.padding)
    if len(p) != 4 or any(v < 0 for v in p):
        raise NotFusable(f"padding {p} is not 4 non-negative ints")
    return p  # type: ignore[return-value]


def se_spec(conv_reduce: nn.Module, act: nn.Module, conv_expand: nn.Module, gate: object,
            paddings: Optional[tuple[Padding, Padding]] = None) -> SESpec:
    """An :class:`SESpec`, or NotFusable saying what does not fit.

    ``paddings``: the two convs' paddings as the adapter resolved them (for conv classes with a
    padding forward of their own, e.g. TF "same"); by default the convs must be plain.
    """
    for i, (name, conv) in enumerate((("reduce", conv_reduce), ("expand", conv_expand))):
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise NotFusable(f"SE {name} is not a 1x1 nn.Conv2d")
        if paddings is not None:
            pad = paddings[i]
            ok = (pad == "same" and tuple(conv.stride) == (1, 1)) or (pad != "same" and tuple(pad) == (0, 0, 0, 0))
        else:
            ok = is_plain_conv(conv) and conv_padding(conv) == (0, 0, 0, 0)
        if not ok or conv.padding_mode != "zeros":
            raise NotFusable(f"SE {name} conv is padded or has a forward of its own")
        if conv.bias is None:
            raise NotFusable(f"SE {name} conv has no bias")
    if conv_expand.in_channels != conv_reduce.out_channels or conv_expand.out_channels != conv_reduce.in_channels:
        raise NotFusable("SE reduce / expand channels do not chain")
    act_kind = require_kind(act, "SE", se_activations())
    gate_kind = require_kind(gate, "SE", se_gates(), what="gate")
    return SESpec(conv_reduce, conv_expand, activation=act_kind, gate_kind=gate_kind)


def pointwise(conv: nn.Module, bn: nn.Module, activation: Optional[str], fallback: tuple[nn.Module, ...],
              padding: Padding | None = None) -> tuple:
    """``(PointwiseSpec,)`` for a plain 1x1 conv + BatchNorm (+ activation), else ``fallback``.

    "Plain" is stride 1, one group, no padding (``padding`` overrides the conv's own, e.g.
    an external pad module; TF "same" is zero for a 1x1 stride-1 conv). The activation must
    be one :class:`PointwiseSpec` applies; ``fallback`` (the block's own modules, run in
    order) is always correct, just not folded.
    """
    if not isinstance(conv, nn.Conv2d) or not is_batchnorm(bn) or activation not in dw_activations():
        return tuple(fallback)
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
        return tuple(fallback)
    if padding is None:
        if not is_plain_conv(conv):
            return tuple(fallback)
        padding = conv_padding(conv)
    if padding != "same" and tuple(padding) != (0, 0, 0, 0):
        return tuple(fallback)
    if conv.padding_mode != "zeros" or num_features(bn) != conv.out_channels:
        return tuple(fallback)
    return (PointwiseSpec(conv, bn, activation, tuple(fallback)),)


def conv_bn_act(conv: nn.Module, bn: nn.Module, act: Optional[nn.Module], fallback: tuple[nn.Module, ...]) -> tuple:
    """:func:`pointwise` for a plain (``nn.Conv2d``-forward) conv, BatchNorm and activation module."""
    if not is_plain_conv(conv):
        return tuple(fallback)
    return pointwise(conv, bn, activation_kind(act), fallback)
