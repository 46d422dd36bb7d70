"""``conv_bn_act``: a dense k x k convolution + folded BatchNorm + activation (a network's stem).

``act(conv2d(pad(x, padding), weight, stride) + bias)`` in one op, the BatchNorm's scale folded
into ``weight`` and its shift as ``bias``: the stem of EfficientNet / MobileNet (3 -> 32
channels, 3x3, stride 2) writes its output once instead of three times.

Schema, fake kernel, autograd wiring and the typed public function.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import backends
from . import _checks
from ._library import define, empty_4d

Tensor = torch.Tensor


def _check_forward(x, weight, bias, stride, padding, activation):
    _checks.normalize_activation(activation)
    return _checks.check_conv_args(x, weight, bias, stride, padding)


def _fake_forward(x, weight, bias, stride, padding, activation, backend):
    ho, wo = _check_forward(x, weight, bias, stride, padding, activation)
    return empty_4d(x, (x.shape[0], weight.shape[0], ho, wo), _checks.memory_format_of(x))


def _check_backward(grad_out, x, weight, bias, stride, padding, activation):
    ho, wo = _check_forward(x, weight, bias, stride, padding, activation)
    want = (x.shape[0], weight.shape[0], ho, wo)
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape {list(want)}, got {list(grad_out.shape)}")


def _fake_backward(grad_out, x, weight, bias, stride, padding, activation, backend):
    _check_backward(grad_out, x, weight, bias, stride, padding, activation)
    return (
        empty_4d(x, tuple(x.shape), _checks.memory_format_of(x)),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias) if bias is not None else x.new_empty((0,)),
    )


define(
    "conv_bn_act",
    "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, str activation, str backend) -> Tensor",
    _check_forward,
    _fake_forward,
)
define(
    "conv_bn_act_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, str activation, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    _check_backward,
    _fake_backward,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (stride, padding, activation, backend)


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = torch.ops.effnet.conv_bn_act_backward.default(grad_out, x, weight, bias, *ctx.args)
    return gx, gw, gb if bias is not None else None, None, None, None, None


torch.library.register_autograd("effnet::conv_bn_act", _backward, setup_context=_setup_context)

_OP = torch.ops.effnet.conv_bn_act.default


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[None, int, Sequence[int]] = None,
    activation: str = "silu",
    backend: Optional[str] = None,
) -> Tensor:
    """Dense conv + folded BatchNorm + activation: ``act(conv2d(pad(x, padding), weight, stride) + bias)``.

    float32 accumulation, one rounding to x's dtype (float64 inputs: the ``torch`` backend, in
    float64).

    Args:
        x: ``[N, Cin, H, W]`` float32, float16, bfloat16 or float64, NCHW or channels_last; the
            output keeps its memory format.
        weight: ``[Cout, Cin, k, k]``, k odd, one group (BatchNorm's scale folded in); any float
            dtype, used in x's dtype.
        bias: ``[Cout]`` float32 or x's dtype (the folded shift), or None.
        stride: 1 or 2, or a pair of them.
        padding: as :func:`effnet_kernels.ops.dwconv_bn_act` takes it (``None``: k // 2; an int; a
            pair ``(ph, pw)``; ``(left, right, top, bottom)`` for TF "same").
        activation: one of :data:`~effnet_kernels.ops._checks.ACTIVATIONS`.
        backend: see :func:`effnet_kernels.ops.dwconv_bn_act`.

    Returns:
        ``[N, Cout, Ho, Wo]`` in x's dtype.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, shape or value.
        BackendUnavailableError: the requested backend cannot serve this input.
    """
    _checks.require_tensors(x=x, weight=weight)
    _checks.check_tensor(weight, "weight", 4)
    stride_pair = _checks.normalize_stride(stride)
    pad4 = _checks.normalize_padding(padding, weight.shape[-1])
    _checks.normalize_activation(activation)
    return _OP(x, weight, bias, stride_pair, pad4, activation, backends.requested_backend(backend))
