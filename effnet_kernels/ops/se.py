"""The squeeze-and-excitation ops: ``se_gate`` (pooled -> gate) and ``se_excite`` (y * gate).

Schemas, fake kernels, autograd wiring and the typed public functions.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _checks
from ._library import define, empty_4d

Tensor = torch.Tensor


# ---------------------------------------------------------------- se_gate
def _check_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    _checks.normalize_se_activation(activation, gate)
    _checks.check_se_gate_args(pooled, w_reduce, b_reduce, w_expand, b_expand)


def _fake_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend):
    _check_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    # float32; float64 for float64 pooled (computed in float64 by the reference)
    return pooled.new_empty(pooled.shape, dtype=_checks.accumulation_dtype(pooled))


def _check_se_gate_backward(grad_gate, pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    _check_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    if tuple(grad_gate.shape) != tuple(pooled.shape):
        raise ValueError(f"grad_gate must have shape {list(pooled.shape)}, got {list(grad_gate.shape)}")


def _fake_se_gate_backward(grad_gate, pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend):
    _check_se_gate_backward(grad_gate, pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (pooled, w_reduce, b_reduce, w_expand, b_expand))


define(
    "se_gate",
    "(Tensor pooled, Tensor w_reduce, Tensor b_reduce, Tensor w_expand, Tensor b_expand, str activation, str gate, "
    "str backend) -> Tensor",
    _check_se_gate,
    _fake_se_gate,
)
define(
    "se_gate_backward",
    "(Tensor grad_gate, Tensor pooled, Tensor w_reduce, Tensor b_reduce, Tensor w_expand, Tensor b_expand, "
    "str activation, str gate, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _check_se_gate_backward,
    _fake_se_gate_backward,
)


def _se_gate_setup(ctx, inputs, output):
    *tensors, activation, gate, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.args = (activation, gate, backend)


def _se_gate_backward(ctx, grad_gate):
    grads = torch.ops.effnet.se_gate_backward.default(grad_gate, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


torch.library.register_autograd("effnet::se_gate", _se_gate_backward, setup_context=_se_gate_setup)


def se_gate(
    pooled: Tensor,
    w_reduce: Tensor,
    b_reduce: Tensor,
    w_expand: Tensor,
    b_expand: Tensor,
    *,
    activation: str = "silu",
    gate: str = "sigmoid",
    backend: Optional[str] = None,
) -> Tensor:
    """SE excitation gate: ``gate(W_e @ activation(W_r @ pooled + b_r) + b_e)``.

    Args:
        pooled: ``[N, C]`` squeezed activations (any float dtype).
        w_reduce: ``[R, C]`` or the ``[R, C, 1, 1]`` weight of a 1x1 conv.
        b_reduce: ``[R]``.
        w_expand: ``[C, R]`` or ``[C, R, 1, 1]``.
        b_expand: ``[C]``.
        activation: between the two FCs, one of :data:`~effnet_kernels.ops._checks.SE_ACTIVATIONS`:
            ``"silu"`` (EfficientNet) or ``"relu"`` (MobileNetV3, MnasNet).
        gate: the output nonlinearity, one of :data:`~effnet_kernels.ops._checks.SE_GATES`:
            ``"sigmoid"`` or ``"hardsigmoid"`` (``relu6(v + 3) / 6``, as ``F.hardsigmoid``; MobileNetV3).
        backend: see :func:`effnet_kernels.ops.dwconv_bn_act`.

    Returns:
        The gate, ``[N, C]`` float32 (float64 for float64 ``pooled``, computed by the ``torch`` backend).
    """
    _checks.require_tensors(pooled=pooled, w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand, b_expand=b_expand)
    _checks.normalize_se_activation(activation, gate)
    w_reduce = _checks.squeeze_weight_2d(w_reduce, "w_reduce")
    w_expand = _checks.squeeze_weight_2d(w_expand, "w_expand")
    return torch.ops.effnet.se_gate.default(
        pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backends.requested_backend(backend)
    )


# ---------------------------------------------------------------- se_excite
def _fake_se_excite(y, gate, backend):
    _checks.check_se_excite_args(y, gate)
    return empty_4d(y, tuple(y.shape), _checks.memory_format_of(y))


def _check_se_excite_backward(grad_out, y, gate):
    _checks.check_se_excite_args(y, gate)
    if tuple(grad_out.shape) != tuple(y.shape):
        raise ValueError(f"grad_out must have shape {list(y.shape)}, got {list(grad_out.shape)}")


def _fake_se_excite_backward(grad_out, y, gate, backend):
    _check_se_excite_backward(grad_out, y, gate)
    return empty_4d(y, tuple(y.shape), _checks.memory_format_of(y)), torch.empty_like(gate)


define("se_excite", "(Tensor y, Tensor gate, str backend) -> Tensor", _checks.check_se_excite_args, _fake_se_excite)
define(
    "se_excite_backward",
    "(Tensor grad_out, Tensor y, Tensor gate, str backend) -> (Tensor, Tensor)",
    _check_se_excite_backward,
    _fake_se_excite_backward,
)


def _se_excite_setup(ctx, inputs, output):
    y, gate, backend = inputs
    ctx.save_for_backward(y, gate)
    ctx.backend = backend


def _se_excite_backward(ctx, grad_out):
    y, gate = ctx.saved_tensors
    grad_y, grad_gate = torch.ops.effnet.se_excite_backward.default(grad_out, y, gate, ctx.backend)
    return grad_y, grad_gate, None


torch.library.register_autograd("effnet::se_excite", _se_excite_backward, setup_context=_se_excite_setup)


def se_excite(y: Tensor, gate: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """SE excitation: ``y * gate[:, :, None, None]`` in y's dtype and memory format.

    Args:
        y: ``[N, C, H, W]`` float32, float16, bfloat16 or float64 (``torch`` backend only).
        gate: ``[N, C]`` (float32 from :func:`se_gate`, or y's dtype).
        backend: see :func:`effnet_kernels.ops.dwconv_bn_act`.
    """
    _checks.require_tensors(y=y, gate=gate)
    return torch.ops.effnet.se_excite.default(y, gate, backends.requested_backend(backend))
