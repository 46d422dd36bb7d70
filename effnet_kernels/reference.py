"""Eager PyTorch implementation of every op: the ``torch`` backend, runs everywhere.

Functions take already-validated, normalised arguments (see :mod:`effnet_kernels.ops`):
``stride`` is ``(sh, sw)``, ``padding`` is ``(left, right, top, bottom)``, ``activation``
and ``gate`` names from :mod:`effnet_kernels.ops._checks` (``ACTIVATIONS``,
``SE_ACTIVATIONS``, ``SE_GATES``). They compute in float32 (float64 when given float64:
this backend is the one that serves float64) and round once at the end, the accumulation
contract the fused kernels keep too.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import backends
from .ops._checks import accumulation_dtype as _compute_dtype
from .ops._checks import memory_format_of

Tensor = torch.Tensor


def _bn_input(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(padded x, weight, depthwise conv output) in the compute dtype."""
    cdt = _compute_dtype(x)
    xp = F.pad(x.to(cdt), tuple(padding))
    w = weight.to(cdt)
    z = F.conv2d(xp, w, stride=tuple(stride), groups=x.shape[1])
    return xp, w, z


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype)[None, :, None, None]


# Every elementwise function of the ops, by name: PyTorch's own forward, and its derivative
# as PyTorch's backward defines it (relu: u > 0; relu6 = hardtanh(0, 6): 0 < u < 6;
# hardswish: 0 below -3, u / 3 + 1/2 up to 3, then 1; hardsigmoid: 1/6 on (-3, 3)).
ACTIVATION_FNS = {
    "identity": lambda u: u,
    "silu": F.silu,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def _silu_grad(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))


def _sigmoid_grad(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s)


ACTIVATION_GRADS = {
    "identity": torch.ones_like,
    "silu": _silu_grad,
    "relu": lambda u: (u > 0).to(u.dtype),
    "relu6": lambda u: ((u > 0) & (u < 6)).to(u.dtype),
    "hardswish": lambda u: torch.where(u < -3, 0.0, torch.where(u <= 3, u / 3 + 0.5, 1.0)).to(u.dtype),
    "sigmoid": _sigmoid_grad,
    "hardsigmoid": lambda u: ((u > -3) & (u < 3)).to(u.dtype) / 6,
}


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """y = act(dwconv(pad(x), weight) * scale + shift); mean = y's spatial mean (fp32; fp64 for fp64 x)."""
    _, _, z = _bn_input(x, weight, stride, padding)
    u = z * _per_channel(scale, z) + _per_channel(shift, z)
    y = ACTIVATION_FNS[activation](u)
    mean = _spatial_mean(y, x) if squeeze else None
    out = y.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    return out, mean


def _dwconv_input_grads(
    gz: Tensor, xp: Tensor, w: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of the depthwise conv from ``gz``, the gradient at its output (compute dtype)."""
    c = x.shape[1]
    grad_xp = torch.nn.grad.conv2d_input(xp.shape, w, gz, stride=tuple(stride), groups=c)
    left, _, top, _ = padding
    grad_x = grad_xp[:, :, top : top + x.shape[2], left : left + x.shape[3]]
    grad_w = torch.nn.grad.conv2d_weight(xp, w.shape, gz, stride=tuple(stride), groups=c)
    return grad_x.to(x.dtype).contiguous(memory_format=memory_format_of(x)), grad_w.to(weight.dtype)


def _grad_at_activation(grad_y: Optional[Tensor], grad_mean: Optional[Tensor], u: Tensor, activation: str) -> Tensor:
    """Gradient w.r.t. the activation's input ``u`` from ``grad_y`` and the squeeze's ``grad_mean``."""
    g = grad_y.to(u.dtype) if grad_y is not None else torch.zeros_like(u)
    if grad_mean is not None and grad_mean.numel() > 0 and u.shape[2] * u.shape[3] > 0:
        g = g + grad_mean.to(u.dtype)[:, :, None, None] / (u.shape[2] * u.shape[3])
    return g if activation == "identity" else g * ACTIVATION_GRADS[activation](u)


def _spatial_mean(y: Tensor, x: Tensor) -> Tensor:
    mean = y.mean(dim=(2, 3)) if y.shape[2] * y.shape[3] > 0 else y.new_zeros(y.shape[:2])
    return mean.to(torch.float32) if x.dtype != torch.float64 else mean


def dwconv_bn_act_backward(
    grad_y: Optional[Tensor],
    grad_mean: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``dwconv_bn_act`` w.r.t. (x, weight, scale, shift), recomputing z."""
    xp, w, z = _bn_input(x, weight, stride, padding)
    u = z * _per_channel(scale, z) + _per_channel(shift, z)
    g = _grad_at_activation(grad_y, grad_mean, u, activation)
    grad_scale = (g * z).sum(dim=(0, 2, 3))
    grad_shift = g.sum(dim=(0, 2, 3))
    grad_x, grad_w = _dwconv_input_grads(g * _per_channel(scale, z), xp, w, x, weight, stride, padding)
    return grad_x, grad_w, grad_scale.to(scale.dtype), grad_shift.to(shift.dtype)


def _batch_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``z`` over (N, H, W); zeros for an empty batch."""
    if z.numel() == 0:
        return z.new_zeros(z.shape[1]), z.new_zeros(z.shape[1])
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return mean, var


def dwconv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Optional[Tensor],
    var: Optional[Tensor],
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Train-mode BatchNorm: ``z = dwconv(pad(x))``, ``y = act((z - mean) / sqrt(var + eps) * gamma + beta)``
    with the batch's per-channel ``mean`` and biased ``var`` of ``z`` (computed here, or the given
    ones: the recompute of a forward); returns (y, squeeze, mean, var)."""
    _, _, z = _bn_input(x, weight, stride, padding)
    if mean is None or var is None:
        mean, var = _batch_moments(z)
    else:
        mean, var = mean.to(z.dtype), var.to(z.dtype)
    scale = gamma.to(z.dtype) * torch.rsqrt(var + eps)
    u = (z - mean[None, :, None, None]) * scale[None, :, None, None] + _per_channel(beta, z)
    y = ACTIVATION_FNS[activation](u)
    pooled = _spatial_mean(y, x) if squeeze else None
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x)), pooled, mean.to(gamma.dtype), var.to(gamma.dtype)


def dwconv_bn_stats(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``z = dwconv(pad(x))`` over (N, Ho, Wo), float32
    (float64 for float64 x); zeros for an empty batch."""
    _, _, z = _bn_input(x, weight, stride, padding)
    return _batch_moments(z)


def _train_grad_at_bn(grad_y: Optional[Tensor], grad_mean: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor,
                      beta: Tensor, mean: Tensor, var: Tensor, eps: float, stride: Sequence[int],
                      padding: Sequence[int], activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(padded x, weight, z, g, xhat, invstd): the conv output ``z`` recomputed from ``x``, the gradient
    ``g`` at the BatchNorm output and the normalised conv output ``xhat``, in the compute dtype."""
    xp, w, z = _bn_input(x, weight, stride, padding)
    invstd = torch.rsqrt(var.to(z.dtype) + eps)
    xhat = (z - mean.to(z.dtype)[None, :, None, None]) * invstd[None, :, None, None]
    u = xhat * _per_channel(gamma, z) + _per_channel(beta, z)
    return xp, w, z, _grad_at_activation(grad_y, grad_mean, u, activation), xhat, invstd


def _grad_sums(g: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
    return (g * xhat).sum(dim=(0, 2, 3)), g.sum(dim=(0, 2, 3))


def _bn_input_grad(g: Tensor, xhat: Tensor, gamma: Tensor, invstd: Tensor, sum_g_xhat: Tensor, sum_g: Tensor,
                   count: int) -> Tensor:
    """Train-mode BatchNorm's input gradient from ``g`` at its output, through statistics over ``count`` values
    per channel: ``gamma * invstd * (g - sum_g / count - xhat * sum_g_xhat / count)``, in g's dtype."""
    m = max(count, 1)
    gz = g - _per_channel(sum_g / m, g) - xhat * _per_channel(sum_g_xhat / m, g)
    return gz * _per_channel(gamma.to(g.dtype) * invstd.to(g.dtype), g)


def _input_grads(parts: tuple, x: Tensor, weight: Tensor, gamma: Tensor, sum_g_xhat: Tensor, sum_g: Tensor, count: int,
                 stride: Sequence[int], padding: Sequence[int]) -> tuple[Tensor, Tensor]:
    xp, w, z, g, xhat, invstd = parts
    gz = _bn_input_grad(g, xhat, gamma, invstd, sum_g_xhat, sum_g, count)
    return _dwconv_input_grads(gz, xp, w, x, weight, stride, padding)


def dwconv_bn_grad_sums(
    grad_y: Optional[Tensor], grad_mean: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, eps: float, stride: Sequence[int], padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """``(sum(g * xhat), sum(g))`` per channel over this batch: ``(grad_gamma, grad_beta)`` of
    ``dwconv_bn_act_train`` normalised with ``mean``/``var`` (see :func:`dwconv_bn_act_train_backward`)."""
    parts = _train_grad_at_bn(grad_y, grad_mean, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    sum_g_xhat, sum_g = _grad_sums(parts[3], parts[4])
    return sum_g_xhat.to(gamma.dtype), sum_g.to(beta.dtype)


def dwconv_bn_input_grads(
    grad_y: Optional[Tensor], grad_mean: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, sum_g_xhat: Tensor, sum_g: Tensor, count: int, eps: float, stride: Sequence[int],
    padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_weight)`` of ``dwconv_bn_act_train`` whose statistics span ``count`` values per
    channel (this batch's, or a whole process group's: SyncBatchNorm), given the per-channel
    ``sum(g * xhat)`` and ``sum(g)`` over those values:
    ``grad_z = gamma * invstd * (g - sum_g / count - xhat * sum_g_xhat / count)``."""
    parts = _train_grad_at_bn(grad_y, grad_mean, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    dt = parts[2].dtype
    return _input_grads(parts, x, weight, gamma, sum_g_xhat.to(dt), sum_g.to(dt), count, stride, padding)


def dwconv_bn_act_train_backward(
    grad_y: Optional[Tensor],
    grad_mean: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``dwconv_bn_act_train`` w.r.t. (x, weight, gamma, beta), through the batch statistics.

    ``mean``/``var`` are the forward's batch statistics of ``z`` (recomputed here from ``x``).
    With ``g`` the gradient at the BatchNorm output, ``xhat = (z - mean) * invstd`` and M = N*Ho*Wo:
    ``grad_beta = sum(g)``, ``grad_gamma = sum(g * xhat)``,
    ``grad_z = gamma * invstd * (g - grad_beta / M - xhat * grad_gamma / M)``.
    """
    parts = _train_grad_at_bn(grad_y, grad_mean, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    z = parts[2]
    grad_gamma, grad_beta = _grad_sums(parts[3], parts[4])
    grad_x, grad_w = _input_grads(parts, x, weight, gamma, grad_gamma, grad_beta, z.shape[0] * z.shape[2] * z.shape[3],
                                  stride, padding)
    return grad_x, grad_w, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)


def bn_act_train_backward(grad_y: Tensor, h: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                          activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``act((h - mean) * invstd * gamma + beta)`` w.r.t. (h, gamma, beta), ``mean`` / ``invstd``
    h's batch statistics over (N, H, W): with ``g`` the gradient at the activation's input and
    ``xhat = (h - mean) * invstd``, ``grad_beta = sum(g)``, ``grad_gamma = sum(g * xhat)``,
    ``grad_h = gamma * invstd * (g - grad_beta / M - xhat * grad_gamma / M)`` (M = N H W)."""
    gh, grad_gamma, grad_beta = _bn_act_grads(grad_y, h.to(_compute_dtype(h)), gamma, beta, mean, invstd, activation)
    return (gh.to(h.dtype).contiguous(memory_format=memory_format_of(h)), grad_gamma.to(gamma.dtype),
            grad_beta.to(beta.dtype))


def _bn_act_grads(grad_y: Tensor, h: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_h, grad_gamma, grad_beta) of :func:`bn_act_train_backward` in h's (compute) dtype."""
    xhat = (h - mean.to(h.dtype)[None, :, None, None]) * invstd.to(h.dtype)[None, :, None, None]
    u = xhat * _per_channel(gamma, xhat) + _per_channel(beta, xhat)
    g = _grad_at_activation(grad_y, None, u, activation)
    grad_gamma, grad_beta = _grad_sums(g, xhat)
    return _bn_input_grad(g, xhat, gamma, invstd, grad_gamma, grad_beta, h.shape[0] * h.shape[2] * h.shape[3]), \
        grad_gamma, grad_beta


def expand_bn_act_train_backward(grad_a: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                                 mean: Tensor, invstd: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``act(batch_norm(conv1x1(x, weight)))`` w.r.t. (x, weight, gamma, beta), ``mean`` / ``invstd``
    the conv output's batch statistics over (N, H, W): the conv output ``h`` recomputed from x (the weight's
    values in x's dtype, the product in the compute dtype, not rounded), then :func:`bn_act_train_backward`'s
    ``grad_h`` and the 1x1 conv's ``grad_x = grad_h W``, ``grad_weight = grad_h^T x``."""
    cdt = _compute_dtype(x)
    xc = x.to(cdt)
    w = weight.to(x.dtype).to(cdt)
    h = F.conv2d(xc, w[:, :, None, None])
    gh, grad_gamma, grad_beta = _bn_act_grads(grad_a, h, gamma, beta, mean, invstd, activation)
    grad_x = torch.einsum("nohw,ok->nkhw", gh, w)
    grad_w = torch.einsum("nohw,nkhw->ok", gh, xc)
    return (grad_x.to(x.dtype).contiguous(memory_format=memory_format_of(x)), grad_w.to(weight.dtype).contiguous(),
            grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype))


def _se_hidden(pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor) -> tuple[Tensor, Tensor]:
    cdt = _compute_dtype(pooled)
    p = pooled.to(cdt)
    a = p @ w_reduce.to(cdt).t() + b_reduce.to(cdt)
    return p, a


def se_gate(
    pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor, activation: str, gate: str
) -> Tensor:
    """gate(W_e . activation(W_r . pooled + b_r) + b_e), float32 [N, C] (float64 for float64 pooled)."""
    _, a = _se_hidden(pooled, w_reduce, b_reduce)
    v = ACTIVATION_FNS[activation](a) @ w_expand.to(a.dtype).t() + b_expand.to(a.dtype)
    out = ACTIVATION_FNS[gate](v)
    return out if pooled.dtype == torch.float64 else out.to(torch.float32)


def se_gate_backward(
    grad_gate: Tensor, pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor,
    activation: str, gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``se_gate`` w.r.t. (pooled, w_reduce, b_reduce, w_expand, b_expand)."""
    p, a = _se_hidden(pooled, w_reduce, b_reduce)
    h = ACTIVATION_FNS[activation](a)
    we = w_expand.to(a.dtype)
    v = h @ we.t() + b_expand.to(a.dtype)
    dv = grad_gate.to(a.dtype) * ACTIVATION_GRADS[gate](v)
    grad_we = dv.t() @ h
    grad_be = dv.sum(0)
    da = (dv @ we) * ACTIVATION_GRADS[activation](a)
    grad_wr = da.t() @ p
    grad_br = da.sum(0)
    grad_p = da @ w_reduce.to(a.dtype)
    return (
        grad_p.to(pooled.dtype),
        grad_wr.to(w_reduce.dtype),
        grad_br.to(b_reduce.dtype),
        grad_we.to(w_expand.dtype),
        grad_be.to(b_expand.dtype),
    )


def se_excite(y: Tensor, gate: Tensor) -> Tensor:
    """y * gate[:, :, None, None] in y's dtype and memory format."""
    cdt = _compute_dtype(y)
    out = y.to(cdt) * gate.to(cdt)[:, :, None, None]
    return out.to(y.dtype).contiguous(memory_format=memory_format_of(y))


def se_excite_backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``se_excite`` w.r.t. (y, gate)."""
    cdt = _compute_dtype(y)
    g = grad_out.to(cdt)
    grad_y = g * gate.to(cdt)[:, :, None, None]
    grad_gate = (g * y.to(cdt)).sum(dim=(2, 3))
    return grad_y.to(y.dtype).contiguous(memory_format=memory_format_of(y)), grad_gate.to(gate.dtype)


def _pointwise_pre(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(gated input in the compute dtype, weight [Cout, K] in it, z = the 1x1 conv + bias) of ``pointwise_conv``.

    The gated input is ``se_excite(x, gate)``, rounded to x's dtype as the excite op's output
    is; the GEMM then runs in float32 (float64 for float64 x) on x's-dtype values of the weight.
    """
    cdt = _compute_dtype(x)
    xin = (se_excite(x, gate) if gate is not None else x).to(cdt)
    w = weight.to(x.dtype).to(cdt)
    z = F.conv2d(xin, w[:, :, None, None])
    if bias is not None:
        z = z + _per_channel(bias, z)
    return xin, w, z


def pointwise_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor],
    activation: str, pool: bool,
) -> Tensor:
    """``act(conv1x1(se_excite(x, gate), weight) + bias) + residual``, or its spatial mean with ``pool``.

    Computed in float32 (float64 for float64 x) and rounded once to x's dtype and memory
    format; with ``pool`` the ``[N, Cout]`` float32 (float64) mean, the full output never formed
    in x's dtype.
    """
    _, _, z = _pointwise_pre(x, weight, bias, gate)
    y = ACTIVATION_FNS[activation](z)
    if pool:
        return _spatial_mean(y, x)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def pointwise_conv_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
    residual: Optional[Tensor], activation: str, pool: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``pointwise_conv`` w.r.t. (x, weight, bias, gate, residual); an absent input's is empty."""
    xin, w, z = _pointwise_pre(x, weight, bias, gate)
    g = grad_out.to(z.dtype)
    if pool:
        hw = z.shape[2] * z.shape[3]
        g = (g / max(hw, 1))[:, :, None, None].expand_as(z)
    # a copy: an op's output must not alias its input grad_out
    grad_residual = g.to(x.dtype).clone(memory_format=memory_format_of(x)) if residual is not None else None
    if activation != "identity":
        g = g * ACTIVATION_GRADS[activation](z)
    grad_w = torch.einsum("nohw,nkhw->ok", g, xin)
    grad_in = torch.einsum("nohw,ok->nkhw", g, w)
    grad_gate = None
    if gate is not None:
        grad_gate = (grad_in * x.to(z.dtype)).sum(dim=(2, 3)).to(gate.dtype)
        grad_in = grad_in * gate.to(z.dtype)[:, :, None, None]
    return (
        grad_in.to(x.dtype).contiguous(memory_format=memory_format_of(x)),
        grad_w.to(weight.dtype).contiguous(),
        g.sum(dim=(0, 2, 3)).to(bias.dtype) if bias is not None else x.new_empty((0,)),
        grad_gate if grad_gate is not None else x.new_empty((0,)),
        grad_residual if grad_residual is not None else x.new_empty((0,)),
    )


def _conv_pre(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int]
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(padded x, weight, z = conv + bias) of ``conv_bn_act`` in the compute dtype (the weight's
    values in x's dtype, as an autocast conv uses them)."""
    cdt = _compute_dtype(x)
    xp = F.pad(x.to(cdt), tuple(padding))
    w = weight.to(x.dtype).to(cdt)
    z = F.conv2d(xp, w, stride=tuple(stride))
    if bias is not None:
        z = z + _per_channel(bias, z)
    return xp, w, z


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                activation: str) -> Tensor:
    """``act(conv2d(pad(x), weight, stride) + bias)``: a network's stem, BatchNorm folded into weight and bias."""
    _, _, z = _conv_pre(x, weight, bias, stride, padding)
    return ACTIVATION_FNS[activation](z).to(x.dtype).contiguous(memory_format=memory_format_of(x))


def conv_bn_act_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                         padding: Sequence[int], activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``conv_bn_act`` w.r.t. (x, weight, bias); an absent bias's is empty."""
    xp, w, z = _conv_pre(x, weight, bias, stride, padding)
    g = grad_out.to(z.dtype)
    if activation != "identity":
        g = g * ACTIVATION_GRADS[activation](z)
    grad_xp = torch.nn.grad.conv2d_input(xp.shape, w, g, stride=tuple(stride))
    left, _, top, _ = padding
    grad_x = grad_xp[:, :, top : top + x.shape[2], left : left + x.shape[3]]
    grad_w = torch.nn.grad.conv2d_weight(xp, w.shape, g, stride=tuple(stride))
    return (
        grad_x.to(x.dtype).contiguous(memory_format=memory_format_of(x)),
        grad_w.to(weight.dtype).contiguous(),  # as the fake kernel says (conv2d_weight keeps x's channels_last)
        g.sum(dim=(0, 2, 3)).to(bias.dtype) if bias is not None else x.new_empty((0,)),
    )


IMPLEMENTATIONS = {
    "dwconv_bn_act": dwconv_bn_act,
    "dwconv_bn_act_backward": dwconv_bn_act_backward,
    "dwconv_bn_act_train": dwconv_bn_act_train,
    "dwconv_bn_act_train_backward": dwconv_bn_act_train_backward,
    "dwconv_bn_stats": dwconv_bn_stats,
    "dwconv_bn_grad_sums": dwconv_bn_grad_sums,
    "dwconv_bn_input_grads": dwconv_bn_input_grads,
    "bn_act_train_backward": bn_act_train_backward,
    "expand_bn_act_train_backward": expand_bn_act_train_backward,
    "se_gate": se_gate,
    "se_gate_backward": se_gate_backward,
    "se_excite": se_excite,
    "se_excite_backward": se_excite_backward,
    "pointwise_conv": pointwise_conv,
    "pointwise_conv_backward": pointwise_conv_backward,
    "conv_bn_act": conv_bn_act,
    "conv_bn_act_backward": conv_bn_act_backward,
}

backends.register_backend(
    "torch",
    unavailable=lambda: [],
    unsupported=lambda op, t, args=(): [],
    load=lambda: IMPLEMENTATIONS,
)
