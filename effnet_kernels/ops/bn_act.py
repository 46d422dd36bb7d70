"""``bn_act_train_backward``: the backward of train-mode BatchNorm + activation, in one op.

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
    c = h.shape[1]
    _checks.check_vector(gamma, "gamma", c, "the BatchNorm weight per channel (ones without affine)")
    _checks.check_vector(beta, "beta", c, "the BatchNorm bias per channel (zeros without affine)")
    _checks.check_vector(mean, "mean", c, "the batch mean of h per channel")
    _checks.check_vector(invstd, "invstd", c, "1 / sqrt(batch variance + eps) of h per channel")
    want = _checks.accumulation_dtype(h)
    for name, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("invstd", invstd)):
        if t.dtype != want:
            raise TypeError(f"{name} must be {want} for a {h.dtype} h, got {t.dtype}")
    _checks.check_same_device(h, "h", grad_y=grad_y, gamma=gamma, beta=beta, mean=mean, invstd=invstd)


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
