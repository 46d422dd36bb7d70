"""``dwconv_bn_act``: depthwise k x k conv + folded BatchNorm + activation (+ SE squeeze).

Schema, fake kernel, autograd wiring and the typed public function. Backends register
implementations with :func:`effnet_kernels.backends.register_backend`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import backends
from . import _checks
from ._library import define, empty_4d

Tensor = torch.Tensor


def _check_forward(x, weight, scale, shift, stride, padding, activation, squeeze):
    _checks.normalize_activation(activation)
    return _checks.check_dwconv_args(x, weight, scale, shift, stride, padding)


def _fake_forward(x, weight, scale, shift, stride, padding, activation, squeeze, backend):
    ho, wo = _check_forward(x, weight, scale, shift, stride, padding, activation, squeeze)
    n, c = x.shape[0], x.shape[1]
    y = empty_4d(x, (n, c, ho, wo), _checks.memory_format_of(x))
    mean = x.new_empty((n, c), dtype=_checks.accumulation_dtype(x)) if squeeze else x.new_empty((0,), dtype=torch.float32)
    return y, mean


def _finish_forward(out, x, *args):
    y, mean = out
    return y, (mean if mean is not None else x.new_empty((0,), dtype=torch.float32))


def check_output_grads(grad_y, grad_mean, x: Tensor, ho: int, wo: int, mean_name: str = "grad_mean") -> None:
    """The incoming gradients of a depthwise op: ``grad_y`` like its ``[N, C, Ho, Wo]`` output, the
    squeeze's gradient (``mean_name``) ``[N, C]`` or empty (either may be None)."""
    n, c = x.shape[0], x.shape[1]
    if grad_y is not None and tuple(grad_y.shape) != (n, c, ho, wo):
        raise ValueError(f"grad_y must have shape {[n, c, ho, wo]}, got {list(grad_y.shape)}")
    if grad_mean is not None and grad_mean.numel() and tuple(grad_mean.shape) != (n, c):
        raise ValueError(f"{mean_name} must have shape {[n, c]}, got {list(grad_mean.shape)}")


def fake_input_grads(x: Tensor, weight: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (grad_x, grad_weight, grad_a, grad_b) of a depthwise op with per-channel parameters a, b."""
    return (
        empty_4d(x, tuple(x.shape), _checks.memory_format_of(x)),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(a),
        torch.empty_like(b),
    )


def _check_backward(grad_y, grad_mean, x, weight, scale, shift, stride, padding, activation):
    ho, wo = _check_forward(x, weight, scale, shift, stride, padding, activation, False)
    check_output_grads(grad_y, grad_mean, x, ho, wo)


def _fake_backward(grad_y, grad_mean, x, weight, scale, shift, stride, padding, activation, backend):
    _check_backward(grad_y, grad_mean, x, weight, scale, shift, stride, padding, activation)
    return fake_input_grads(x, weight, scale, shift)


define(
    "dwconv_bn_act",
    "(Tensor x, Tensor weight, Tensor scale, Tensor shift, int[2] stride, int[4] padding, "
    "str activation, bool squeeze, str backend) -> (Tensor, Tensor)",
    _check_forward,
    _fake_forward,
    _finish_forward,
)
define(
    "dwconv_bn_act_backward",
    "(Tensor? grad_y, Tensor? grad_mean, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
    "int[2] stride, int[4] padding, str activation, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    _check_backward,
    _fake_backward,
)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, activation, squeeze, backend = inputs
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.args = (stride, padding, activation, backend)


def _backward(ctx, grad_y, grad_mean):
    x, weight, scale, shift = ctx.saved_tensors
    stride, padding, activation, backend = ctx.args
    gx, gw, gscale, gshift = torch.ops.effnet.dwconv_bn_act_backward.default(
        grad_y, grad_mean, x, weight, scale, shift, stride, padding, activation, backend
    )
    return gx, gw, gscale, gshift, None, None, None, None, None


torch.library.register_autograd("effnet::dwconv_bn_act", _backward, setup_context=_setup_context)

_OP = torch.ops.effnet.dwconv_bn_act.default


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[None, int, Sequence[int]] = None,
    activation: str = "silu",
    squeeze: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Depthwise conv + folded BatchNorm + activation in one pass.

    Computes ``y = act(conv2d(pad(x, padding), weight, stride=stride, groups=C) * scale + shift)``
    with float32 accumulation, and with ``squeeze=True`` also ``mean = y.mean((2, 3))`` in
    float32 (the SE squeeze, taken from ``y`` before it is rounded to ``x.dtype``).
    float64 inputs are computed in float64 (mean too) by the ``torch`` backend; the kernel
    backends refuse them (``auto`` picks ``torch``).

    Args:
        x: ``[N, C, H, W]`` float32, float16, bfloat16 or float64, NCHW or channels_last;
            the output keeps its memory format.
        weight: ``[C, 1, k, k]`` depthwise weight, k odd.
        scale, shift: ``[C]`` float32 (or float64 when x is), BatchNorm folded:
            ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
        stride: 1 or 2, or a pair of them.
        padding: ``None`` (k // 2 on every side), an int, a pair ``(ph, pw)``, or a
            4-tuple ``(left, right, top, bottom)`` as ``F.pad`` takes it (TF "same").
        activation: one of :data:`~effnet_kernels.ops._checks.ACTIVATIONS`: ``"identity"``,
            ``"silu"``, ``"relu"``, ``"relu6"`` or ``"hardswish"`` (``u * relu6(u + 3) / 6``,
            as ``F.hardswish``).
        squeeze: also return the ``[N, C]`` float32 spatial mean of ``y``.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``; ``None`` defers to
            :func:`effnet_kernels.use_backend`, then ``EFFNET_KERNELS_BACKEND``, then auto.

    Returns:
        ``y`` (``[N, C, Ho, Wo]``, x's dtype), or ``(y, mean)`` when ``squeeze``.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, shape or value.
        BackendUnavailableError: the requested backend cannot serve this input.
    """
    _checks.require_tensors(x=x, weight=weight, scale=scale, shift=shift)
    _checks.check_tensor(weight, "weight", 4)
    stride_pair = _checks.normalize_stride(stride)
    pad4 = _checks.normalize_padding(padding, weight.shape[-1])
    _checks.normalize_activation(activation)
    if not isinstance(squeeze, bool):
        raise TypeError(f"squeeze must be a bool, got {squeeze!r}")
    y, mean = _OP(x, weight, scale, shift, stride_pair, pad4, activation, squeeze, backends.requested_backend(backend))
    return (y, mean) if squeeze else y
