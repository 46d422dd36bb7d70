"""``pointwise_conv`` and ``conv_bn_act`` as aten ops in the input's dtype: the ``cuda`` backend's
implementation of the two (no CUDA C++ GEMM or dense conv is written), and both ops' backward
(the ``cuda`` backend's, cuDNN's convolution backward with its excite kernels:
:func:`pointwise_conv_backward_with`; the ``triton`` backend's where its own GEMM backward,
:mod:`effnet_kernels.triton.pointwise_backward`, does not serve: an activation or the pool, and the stem).

``pointwise_conv``: cuDNN's 1x1 convolution with the folded BatchNorm's shift as its bias, then the activation,
the residual add (or the spatial mean) as separate aten ops, and the SE gate as the excite
op before the conv: how converted blocks ran their 1x1 convs before the fused GEMM, up to four
kernels. No CUDA C++ GEMM is written: cuDNN / cuBLAS is the one to beat, and
``backend="auto"`` takes this or the Triton GEMM per shape class as the committed auto table
says once both are measured (until then, this: :data:`effnet_kernels.backends.AUTO_ORDER`).

Rounding is eager PyTorch's (the conv's output, then each op's, in x's dtype), not the
fused kernels' single rounding: the parity rule's "plain PyTorch" itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .ops._checks import accumulation_dtype, memory_format_of
from . import reference
from .reference import ACTIVATION_FNS

Tensor = torch.Tensor


def pointwise_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor],
    activation: str, pool: bool, excite: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> Tensor:
    """``reference.pointwise_conv``'s result computed as eager PyTorch would, in x's dtype.

    ``excite(y, gate)`` applies the gate (default: ``y * gate`` in aten; the cuda backend passes
    its own excite kernel).
    """
    if gate is not None:
        x = excite(x, gate) if excite is not None else (x * gate.to(x.dtype)[:, :, None, None])
    w = weight.to(x.dtype)[:, :, None, None]
    y = F.conv2d(x, w, bias.to(x.dtype) if bias is not None else None)
    y = ACTIVATION_FNS[activation](y)
    if pool:
        if y.shape[2] * y.shape[3] == 0:
            return y.new_zeros(y.shape[:2], dtype=accumulation_dtype(y))
        return y.mean(dim=(2, 3), dtype=accumulation_dtype(y))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=memory_format_of(x))


ExciteBackward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def pointwise_conv_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
    residual: Optional[Tensor], activation: str, pool: bool,
    excite: Optional[Callable[[Tensor, Tensor], Tensor]] = None, excite_backward: Optional[ExciteBackward] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.pointwise_conv_backward``'s gradients (x, weight, bias, gate, residual; an absent input's
    is empty) as eager autograd computes them, in x's dtype (:func:`_conv_backward`); with a gate, the excited
    input ``excite(x, gate)`` recomputed for the weight's gradient and the input's and gate's gradients from
    ``excite_backward(grad_in, x, gate)`` (defaults: aten's ``x * gate`` and its gradients; the cuda backend
    passes its excite kernels, one pass each).

    What the ``cuda`` backend runs for a training step's 1x1 convs (tensor cores in fp16 / bf16; no CUDA C++
    GEMM backward is written), and the ``triton`` backend for those with an activation or the pool.
    """
    n, k, h, w = x.shape
    cout = weight.shape[0]
    if n * k * h * w == 0 or cout == 0:
        return reference.pointwise_conv_backward(grad_out, x, weight, bias, gate, residual, activation, pool)
    dt, fmt = x.dtype, memory_format_of(x)
    xin = x if gate is None else (excite or _aten_excite)(x, gate)
    g = (grad_out.to(accumulation_dtype(x)) / (h * w))[:, :, None, None].expand(n, cout, h, w) if pool else grad_out
    grad_in, grad_w, grad_b = _conv_backward(g, xin, weight[:, :, None, None], bias, (1, 1), (0, 0), activation)
    empty = x.new_empty((0,))
    grad_gate = empty
    if gate is not None:
        grad_in, grad_gate = (excite_backward or _aten_excite_backward)(grad_in, x, gate)
        grad_gate = grad_gate.to(gate.dtype)
    return (
        grad_in.contiguous(memory_format=fmt),
        grad_w.reshape(weight.shape),
        grad_b if bias is not None else empty.clone(),
        grad_gate,
        grad_out.to(dt).clone(memory_format=fmt) if residual is not None else empty.clone(),
    )


PointwiseBackward = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def pointwise_conv_backward_with(excite: Callable[[Tensor, Tensor], Tensor],
                                 excite_backward: ExciteBackward) -> PointwiseBackward:
    """:func:`pointwise_conv_backward` with a backend's own excite kernels (``excite(y, gate)``,
    ``excite_backward(grad, y, gate) -> (grad_y, grad_gate)``): the ``pointwise_conv_backward`` the ``cuda``
    and ``triton`` backends register (the op's signature, without ``backend``)."""

    def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                 residual: Optional[Tensor], activation: str,
                 pool: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """cuDNN's convolution backward and aten's activation backward, the gate by this backend's excite
        kernels (:func:`effnet_kernels._aten_convs.pointwise_conv_backward`)."""
        return pointwise_conv_backward(grad_out, x, weight, bias, gate, residual, activation, pool, excite=excite,
                                       excite_backward=excite_backward)

    return backward


def _aten_excite(x: Tensor, gate: Tensor) -> Tensor:
    return x * gate.to(x.dtype)[:, :, None, None]


def _aten_excite_backward(grad: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_gate) of ``x * gate[:, :, None, None]`` as eager's mul backward computes them."""
    return grad * gate.to(grad.dtype)[:, :, None, None], (grad * x).sum(dim=(2, 3), dtype=accumulation_dtype(x))


def conv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                         padding: Sequence[int], activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.conv_bn_act_backward``'s gradients (x, weight, bias; an absent bias's is empty) as eager
    autograd computes them, in x's dtype (:func:`_conv_backward`); 4-sided padding by an explicit pad when it
    is not symmetric (the input gradient cut back out of the padded one)."""
    if x.numel() == 0 or grad_out.numel() == 0:
        return reference.conv_bn_act_backward(grad_out, x, weight, bias, stride, padding, activation)
    left, right, top, bottom = padding
    symmetric = left == right and top == bottom
    xp = x if symmetric else F.pad(x, (left, right, top, bottom))
    grad_xp, grad_w, grad_b = _conv_backward(grad_out, xp, weight, bias, tuple(stride),
                                             (top, left) if symmetric else (0, 0), activation)
    if not symmetric:
        grad_xp = grad_xp[:, :, top: top + x.shape[2], left: left + x.shape[3]]
    return (grad_xp.contiguous(memory_format=memory_format_of(x)), grad_w,
            grad_b if bias is not None else x.new_empty((0,)))


def _conv_backward(g: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                   padding: Sequence[int], activation: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_x, grad_weight, grad_bias) of ``act(conv2d(x, weight, bias, stride, padding))`` for the gradient
    ``g`` at its output, in x's dtype: the conv recomputed for an activation's gradient only (the activation's
    own backward op, :func:`activation_backward`), then cuDNN's convolution backward for x and the weight
    (contiguous, in the weight's dtype); the bias's (the folded BatchNorm shift's, float32) summed in float32,
    as eager's BatchNorm backward sums beta's, not rounded to x's dtype."""
    dt = x.dtype
    w = weight.to(dt)
    g = g.to(dt)
    if activation != "identity":
        z = F.conv2d(x, w, bias.to(dt) if bias is not None else None, stride=tuple(stride), padding=tuple(padding))
        g = activation_backward(g, z, activation)
    g = g.contiguous(memory_format=memory_format_of(x))
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x, w, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [True, True, False])
    grad_b = g.sum(dim=(0, 2, 3), dtype=accumulation_dtype(x)).to(bias.dtype) if bias is not None else None
    return grad_x, grad_w.to(weight.dtype).contiguous(), grad_b


def bn_act_train_backward(grad_y: Tensor, h: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                          activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.bn_act_train_backward``'s gradients as eager autograd computes them, in h's dtype: the
    BatchNorm output for the activation's derivative (an eval-mode ``native_batch_norm`` given the statistics
    as running ones, ``var = invstd^-2`` with eps 0), the activation's own backward op, then
    ``native_batch_norm_backward`` with the saved statistics: three kernels, the ``cuda`` backend's (no CUDA C++
    kernel of its own; the Triton one reads two tensors fewer)."""
    if h.numel() == 0:
        return reference.bn_act_train_backward(grad_y, h, gamma, beta, mean, invstd, activation)
    grad = grad_y.to(h.dtype)
    if activation != "identity":
        u = torch.ops.aten.native_batch_norm(h, gamma, beta, mean, invstd.pow(-2), False, 0.0, 0.0)[0]
        grad = activation_backward(grad, u, activation)
    gh, gg, gb = torch.ops.aten.native_batch_norm_backward(grad, h, gamma, None, None, mean, invstd, True, 0.0,
                                                           [True, True, True])
    return gh.contiguous(memory_format=memory_format_of(h)), gg.to(gamma.dtype), gb.to(beta.dtype)


def expand_bn_act_train_backward(grad_a: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                                 mean: Tensor, invstd: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.expand_bn_act_train_backward``'s gradients as eager autograd computes them, in x's dtype: the
    conv output recomputed by cuDNN (rounded to x's dtype, as eager's is), :func:`bn_act_train_backward`, then
    cuDNN's convolution backward for x and the weight (the ``cuda`` backend's: five kernels, the conv output and
    its gradient written and read twice each)."""
    if x.numel() == 0 or weight.shape[0] == 0:
        return reference.expand_bn_act_train_backward(grad_a, x, weight, gamma, beta, mean, invstd, activation)
    w = weight.to(x.dtype)[:, :, None, None]
    h = F.conv2d(x, w)
    grad_h, grad_gamma, grad_beta = bn_act_train_backward(grad_a, h, gamma, beta, mean, invstd, activation)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad_h, x, w, None, [1, 1], [0, 0], [1, 1], False,
                                                            [0, 0], 1, [True, True, False])
    return (grad_x.contiguous(memory_format=memory_format_of(x)), grad_w.reshape(weight.shape).to(weight.dtype),
            grad_gamma, grad_beta)


def activation_backward(grad: Tensor, u: Tensor, kind: str) -> Tensor:
    """``grad * act'(u)`` as eager autograd computes it (the activation's own backward op: one kernel, float32
    inside, u's dtype out)."""
    grad = grad.to(u.dtype)
    if kind == "identity":
        return grad
    return _ACTIVATION_BACKWARD[kind](grad, u)


_ACTIVATION_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "silu": torch.ops.aten.silu_backward,
    "relu": lambda g, u: torch.ops.aten.threshold_backward(g, u, 0),
    "relu6": lambda g, u: torch.ops.aten.hardtanh_backward(g, u, 0.0, 6.0),
    "hardswish": torch.ops.aten.hardswish_backward,
}


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                activation: str) -> Tensor:
    """``reference.conv_bn_act``'s result as eager PyTorch computes it: cuDNN's conv with the folded
    bias, then the activation, in x's dtype."""
    xp = F.pad(x, tuple(padding)) if any(padding) else x
    y = F.conv2d(xp, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None, stride=tuple(stride))
    return ACTIVATION_FNS[activation](y).contiguous(memory_format=memory_format_of(x))

