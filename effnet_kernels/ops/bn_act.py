"""``bn_act_train_backward`` and ``expand_bn_act_train_backward``: the backward of train-mode BatchNorm +
activation, in one op, alone or with the 1x1 conv before it.

``y = act((h - mean) * invstd * gamma + beta)`` with ``mean`` / ``invstd`` the batch statistics of
``h`` over (N, H, W): the op returns the gradients w.r.t. h (through the statistics), gamma and
beta from ``grad_y``, recomputing the BatchNorm output and the activation's derivative from h.
What eager autograd runs as two ops on the full tensor plus the BatchNorm output it kept (the
activation's backward, reading grad_y and that output and writing its gradient; then
``native_batch_norm_backward``, reading that gradient and h twice), one op reading grad_y and h
(twice: the per-channel sums, then the input gradient) and writing grad_h. The training block's
folded expand step uses it (:mod:`effnet_kernels._train_block`), so that its backward needs
neither the BatchNorm output nor the activation's input.

Not differentiable (a piece of a backward); schema, checks and fake kernel here, implementations
in the backends (``torch``: :func:`effnet_kernels.reference.bn_act_train_backward`; ``triton``:
:func:`effnet_kernels.triton.dwconv_backward.bn_act_train_backward`, two passes; ``cuda``: aten's
three ops as eager runs them, :func:`effnet_kernels._aten_convs.bn_act_train_backward`).

``expand_bn_act_train_backward(grad_a, x, weight, gamma, beta, mean, invstd, activation)``: the same backward
for ``a = act(batch_norm(conv1x1(x, weight)))`` from the conv's *input* (the MBConv expand step), returning the
gradients w.r.t. x, the weight, gamma and beta. The conv output ``h`` is recomputed inside from x (a sixth of
h's channels in an MBConv), so neither h, nor the BatchNorm output, nor ``grad_h`` need be written: the
``triton`` backend's three kernels (:mod:`effnet_kernels.triton.expand_backward`) each recompute h tile by tile
and read grad_a once (the per-channel sums; ``grad_x``; ``grad_weight``), where recomputing h, this op's
BatchNorm backward and cuDNN's conv backward write h and ``grad_h`` and read each twice (the ``cuda``
backend's, :func:`effnet_kernels._aten_convs.expand_bn_act_train_backward`). The recomputing block's folded
expand step uses it (:mod:`effnet_kernels._train_block`).
"""

from __future__ import annotations

import torch

from . import _checks
from ._library import define, empty_4d


def _check(grad_y, h, gamma, beta, mean, invstd, activation):
    _checks.normalize_activation(activation)
    _checks.check_tensor(h, "h", 4)
    _checks.check_tensor(grad_y, "grad_y", 4)
    if tuple(grad_y.shape) != tuple(h.shape):
        raise ValueError(f"grad_y must have h's shape {list(h.shape)}, got {list(grad_y.shape)}")
    _check_statistics(h, "h", h.shape[1], gamma, beta, mean, invstd)
    _checks.check_same_device(h, "h", grad_y=grad_y)


def _fake(grad_y, h, gamma, beta, mean, invstd, activation, backend):
    _check(grad_y, h, gamma, beta, mean, invstd, activation)
    return empty_4d(h, tuple(h.shape), _checks.memory_format_of(h)), torch.empty_like(gamma), torch.empty_like(beta)


define(
    "bn_act_train_backward",
    "(Tensor grad_y, Tensor h, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, str activation, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    _check,
    _fake,
)


def _check_expand(grad_a, x, weight, gamma, beta, mean, invstd, activation):
    _checks.normalize_activation(activation)
    _checks.check_tensor(x, "x", 4)
    _checks.check_tensor(grad_a, "grad_a", 4)
    _checks.check_tensor(weight, "weight", 2)
    n, k, hh, ww = x.shape
    j = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must have shape [Cout, {k}] (x has {k} channels), got {list(weight.shape)}")
    if tuple(grad_a.shape) != (n, j, hh, ww):
        raise ValueError(f"grad_a must have shape {[n, j, hh, ww]} (the conv's output), got {list(grad_a.shape)}")
    _check_statistics(x, "x", j, gamma, beta, mean, invstd)
    _checks.check_same_device(x, "x", grad_a=grad_a, weight=weight)


def _check_statistics(like, like_name, c, gamma, beta, mean, invstd):
    """gamma, beta, mean, invstd: ``[c]`` in the accumulation dtype of ``like`` (named ``like_name``), on its device."""
    _checks.check_vector(gamma, "gamma", c, "the BatchNorm weight per channel (ones without affine)")
    _checks.check_vector(beta, "beta", c, "the BatchNorm bias per channel (zeros without affine)")
    _checks.check_vector(mean, "mean", c, f"the batch mean of {'h' if like_name == 'h' else 'the conv output'} per channel")
    _checks.check_vector(invstd, "invstd", c, "1 / sqrt(batch variance + eps) of the conv output per channel")
    want = _checks.accumulation_dtype(like)
    for name, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)):
        if t.dtype != want:
            raise TypeError(f"{name} must be {want} for a {like.dtype} {like_name}, got {t.dtype}")
    _checks.check_same_device(like, like_name, gamma=gamma, beta=beta, mean=mean, invstd=invstd)


def _fake_expand(grad_a, x, weight, gamma, beta, mean, invstd, activation, backend):
    _check_expand(grad_a, x, weight, gamma, beta, mean, invstd, activation)
    return (empty_4d(x, tuple(x.shape), _checks.memory_format_of(x)),
            torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(gamma),
            torch.empty_like(beta))


define(
    "expand_bn_act_train_backward",
    "(Tensor grad_a, Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, str activation, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    _check_expand,
    _fake_expand,
)
