"""``pointwise_conv``: a 1x1 convolution as one GEMM over pixels, with its neighbours fused in.

``act(conv1x1(x * gate, weight) + bias) + residual`` (or, with ``pool``, that output's spatial
mean): the SE gate applied to the input as it is loaded (the prologue: the excited tensor is
never written), the folded BatchNorm's shift as the bias, the activation and the residual add
in the epilogue, and for a network's head the global average pool, so its output is never
stored. The expand conv (bias + activation), the projection conv (gate + bias + residual) and
the head (bias + SiLU + pool) of an MBConv network are each one call.

Schema, fake kernel, autograd wiring and the typed public function; backends register
implementations with :func:`effnet_kernels.backends.register_backend`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _checks
from ._library import define, empty_4d

Tensor = torch.Tensor


def _check_forward(x, weight, bias, gate, residual, activation, pool):
    _checks.normalize_activation(activation)
    if not isinstance(pool, bool):
        raise TypeError(f"pool must be a bool, got {pool!r}")
    _checks.check_pointwise_args(x, weight, bias, gate, residual, pool)


def _fake_forward(x, weight, bias, gate, residual, activation, pool, backend):
    _check_forward(x, weight, bias, gate, residual, activation, pool)
    n, cout = x.shape[0], weight.shape[0]
    if pool:
        return x.new_empty((n, cout), dtype=_checks.accumulation_dtype(x))
    return empty_4d(x, (n, cout, x.shape[2], x.shape[3]), _checks.memory_format_of(x))


def _check_backward(grad_out, x, weight, bias, gate, residual, activation, pool):
    _check_forward(x, weight, bias, gate, residual, activation, pool)
    n, cout = x.shape[0], weight.shape[0]
    want = (n, cout) if pool else (n, cout, x.shape[2], x.shape[3])
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape {list(want)}, got {list(grad_out.shape)}")


def _fake_backward(grad_out, x, weight, bias, gate, residual, activation, pool, backend):
    _check_backward(grad_out, x, weight, bias, gate, residual, activation, pool)
    fmt = _checks.memory_format_of(x)
    return (  # an absent input's gradient: an empty tensor (each its own: outputs must not alias)
        empty_4d(x, tuple(x.shape), fmt),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias) if bias is not None else x.new_empty((0,)),
        torch.empty_like(gate) if gate is not None else x.new_empty((0,)),
        empty_4d(x, tuple(residual.shape), fmt) if residual is not None else x.new_empty((0,)),
    )


define(
    "pointwise_conv",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor? residual, str activation, bool pool, "
    "str backend) -> Tensor",
    _check_forward,
    _fake_forward,
)
define(
    "pointwise_conv_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor? residual, str activation, "
    "bool pool, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _check_backward,
    _fake_backward,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, residual, activation, pool, backend = inputs
    ctx.save_for_backward(x, weight, bias, gate, residual)
    ctx.args = (activation, pool, backend)


def _backward(ctx, grad_out):
    x, weight, bias, gate, residual = ctx.saved_tensors
    gx, gw, gb, gg, gr = torch.ops.effnet.pointwise_conv_backward.default(
        grad_out, x, weight, bias, gate, residual, *ctx.args
    )
    return (gx, gw, gb if bias is not None else None, gg if gate is not None else None,
            gr if residual is not None else None, None, None, None)


torch.library.register_autograd("effnet::pointwise_conv", _backward, setup_context=_setup_context)

_OP = torch.ops.effnet.pointwise_conv.default


def pointwise_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    gate: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: str = "identity",
    pool: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """A 1x1 convolution with its prologue and epilogue fused:
    ``act(conv2d(x * gate[:, :, None, None], weight) + bias) + residual``.

    ``x * gate`` is rounded to x's dtype (as :func:`se_excite`'s output would be) and the
    GEMM accumulates in float32 (float64 for float64 x, computed by the ``torch`` backend);
    bias, activation and residual are applied to the float32 sum, which is rounded once.

    Args:
        x: ``[N, K, H, W]`` float32, float16, bfloat16 or float64, NCHW or channels_last; the
            output keeps its memory format.
        weight: ``[Cout, K]`` or the ``[Cout, K, 1, 1]`` weight of a 1x1 conv (BatchNorm's scale
            folded in: ``w * scale[:, None]``); any float dtype, used in x's dtype (as an
            autocast conv uses it).
        bias: ``[Cout]`` float32 or x's dtype (the folded shift ``beta - mean * scale``), or None.
        gate: ``[N, K]`` float32 or x's dtype (:func:`se_gate`'s output), or None.
        residual: ``[N, Cout, H, W]`` in x's dtype, added after the activation, or None.
        activation: one of :data:`~effnet_kernels.ops._checks.ACTIVATIONS`.
        pool: return the ``[N, Cout]`` float32 spatial mean of the output instead of the output
            (a network's head followed by global average pooling); not with ``residual``.
        backend: see :func:`effnet_kernels.ops.dwconv_bn_act`.

    Returns:
        ``[N, Cout, H, W]`` in x's dtype, or ``[N, Cout]`` float32 (float64 for float64 x) with ``pool``.

    Raises:
        TypeError, ValueError: an argument has the wrong type, dtype, shape or value.
        BackendUnavailableError: the requested backend cannot serve this input.
    """
    _checks.require_tensors(x=x, weight=weight)
    weight = _checks.squeeze_weight_2d(weight, "weight")
    _checks.normalize_activation(activation)
    if not isinstance(pool, bool):
        raise TypeError(f"pool must be a bool, got {pool!r}")
    return _OP(x, weight, bias, gate, residual, activation, pool, backends.requested_backend(backend))
