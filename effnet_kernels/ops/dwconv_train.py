"""``dwconv_bn_act_train``: depthwise k x k conv + train-mode BatchNorm (batch statistics) + activation.

The training twin of :func:`effnet_kernels.ops.dwconv_bn_act`: the BatchNorm normalises with
the batch's own per-channel mean and (biased) variance of the conv output, which the op
returns so the caller can update running statistics the way ``nn.BatchNorm2d`` does
(:func:`effnet_kernels._train_block.update_running_stats`). Its backward differentiates
through those statistics. Schema, fake kernel, autograd wiring and the typed function.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import backends
from . import _checks
from .dwconv import check_output_grads, fake_input_grads
from ._library import define, empty_4d

Tensor = torch.Tensor


def _check_forward(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, squeeze):
    _checks.normalize_activation(activation)
    ho, wo = _checks.check_dwconv_args(x, weight, gamma, beta, stride, padding, ("gamma", "beta"))
    if not isinstance(eps, float) or not eps > 0.0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    c = x.shape[1]
    if (mean is None) != (var is None):
        raise ValueError("mean and var must be given together (the batch statistics of a forward) or both be None")
    if mean is not None:
        _checks.check_vector(mean, "mean", c, "the batch mean of the conv output per channel")
        _checks.check_vector(var, "var", c, "the biased batch variance of the conv output per channel")
        _checks.check_same_device(x, "x", mean=mean, var=var)
    if mean is None and x.shape[0] * ho * wo == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training (batch statistics of one value), "
            f"got x of shape {list(x.shape)} giving a {ho}x{wo} output")
    return ho, wo


def _fake_forward(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, squeeze, backend):
    ho, wo = _check_forward(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, squeeze)
    n, c = x.shape[0], x.shape[1]
    sdt = _checks.accumulation_dtype(x)
    y = empty_4d(x, (n, c, ho, wo), _checks.memory_format_of(x))
    pooled = x.new_empty((n, c), dtype=sdt) if squeeze else x.new_empty((0,), dtype=torch.float32)
    return y, pooled, x.new_empty((c,), dtype=sdt), x.new_empty((c,), dtype=sdt)


def _finish_forward(out, x, *args):
    y, pooled, mean, var = out
    return y, (pooled if pooled is not None else x.new_empty((0,), dtype=torch.float32)), mean, var


def _check_backward(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation):
    ho, wo = _check_forward(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, False)
    check_output_grads(grad_y, grad_pooled, x, ho, wo, "grad_pooled")


def _fake_backward(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation, backend):
    _check_backward(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    return fake_input_grads(x, weight, gamma, beta)


define(
    "dwconv_bn_act_train",
    "(Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor? mean, Tensor? var, float eps, int[2] stride, "
    "int[4] padding, "
    "str activation, bool squeeze, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    _check_forward,
    _fake_forward,
    _finish_forward,
)
define(
    "dwconv_bn_act_train_backward",
    "(Tensor? grad_y, Tensor? grad_pooled, Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, "
    "Tensor var, float eps, int[2] stride, int[4] padding, str activation, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _check_backward,
    _fake_backward,
)


# The two halves of the backward and the statistics alone, for a BatchNorm whose statistics
# span a process group (SyncBatchNorm, :mod:`effnet_kernels._sync_bn`): the caller all-reduces
# between them. Not differentiable (they are pieces of a backward).
def _check_stats(x, weight, stride, padding):
    _checks.check_dwconv_args(x, weight, None, None, stride, padding)


def _fake_stats(x, weight, stride, padding, backend):
    _check_stats(x, weight, stride, padding)
    sdt = _checks.accumulation_dtype(x)
    return x.new_empty((x.shape[1],), dtype=sdt), x.new_empty((x.shape[1],), dtype=sdt)


def _fake_grad_sums(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation,
                    backend):
    _check_backward(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    return torch.empty_like(gamma), torch.empty_like(beta)


def _check_input_grads(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, sum_g_xhat, sum_g, count, eps, stride,
                       padding, activation):
    _check_backward(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation)
    c = x.shape[1]
    _checks.check_vector(sum_g_xhat, "sum_g_xhat", c, "per channel sum of grad * xhat over the statistics' values")
    _checks.check_vector(sum_g, "sum_g", c, "per channel sum of grad over the statistics' values")
    _checks.check_same_device(x, "x", sum_g_xhat=sum_g_xhat, sum_g=sum_g)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be the non-negative number of values per channel the statistics span, got {count!r}")


def _fake_input_grads(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, sum_g_xhat, sum_g, count, eps, stride,
                      padding, activation, backend):
    _check_input_grads(grad_y, grad_pooled, x, weight, gamma, beta, mean, var, sum_g_xhat, sum_g, count, eps, stride,
                       padding, activation)
    return fake_input_grads(x, weight, gamma, beta)[:2]


define(
    "dwconv_bn_stats",
    "(Tensor x, Tensor weight, int[2] stride, int[4] padding, str backend) -> (Tensor, Tensor)",
    _check_stats,
    _fake_stats,
)
define(
    "dwconv_bn_grad_sums",
    "(Tensor? grad_y, Tensor? grad_pooled, Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, "
    "Tensor var, float eps, int[2] stride, int[4] padding, str activation, str backend) -> (Tensor, Tensor)",
    _check_backward,
    _fake_grad_sums,
)
define(
    "dwconv_bn_input_grads",
    "(Tensor? grad_y, Tensor? grad_pooled, Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, "
    "Tensor var, Tensor sum_g_xhat, Tensor sum_g, int count, float eps, int[2] stride, int[4] padding, "
    "str activation, str backend) -> (Tensor, Tensor)",
    _check_input_grads,
    _fake_input_grads,
)


def _setup_context(ctx, inputs, output):
    x, weight, gamma, beta, _mean, _var, eps, stride, padding, activation, squeeze, backend = inputs
    _, _, mean, var = output
    ctx.save_for_backward(x, weight, gamma, beta, mean, var)
    ctx.args = (eps, stride, padding, activation, backend)
    ctx.mark_non_differentiable(mean, var)


def _backward(ctx, grad_y, grad_pooled, _grad_mean, _grad_var):
    x, weight, gamma, beta, mean, var = ctx.saved_tensors
    eps, stride, padding, activation, backend = ctx.args
    grads = torch.ops.effnet.dwconv_bn_act_train_backward.default(
        grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding, activation, backend)
    return (*grads, None, None, None, None, None, None, None, None)


torch.library.register_autograd("effnet::dwconv_bn_act_train", _backward, setup_context=_setup_context)

_OP = torch.ops.effnet.dwconv_bn_act_train.default


def dwconv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    *,
    eps: float = 1e-5,
    mean: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[None, int, Sequence[int]] = None,
    activation: str = "silu",
    squeeze: bool = False,
    backend: Optional[str] = None,
) -> Union[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Depthwise conv + BatchNorm with batch statistics + activation (training mode).

    Computes ``z = conv2d(pad(x, padding), weight, stride=stride, groups=C)`` in float32, the
    per-channel ``mean`` and biased ``var`` of ``z`` over (N, H, W), and
    ``y = act((z - mean) / sqrt(var + eps) * gamma + beta)``, as ``nn.BatchNorm2d`` in training
    (with ``squeeze=True`` also ``pooled = y.mean((2, 3))`` in float32). Running statistics are
    not touched: the caller updates them from ``mean`` and ``var``. Gradients flow to x, weight,
    gamma and beta, through the batch statistics; ``mean`` and ``var`` are not differentiable.

    Args:
        x: ``[N, C, H, W]`` float32, float16, bfloat16 or float64, NCHW or channels_last.
        weight: ``[C, 1, k, k]`` depthwise weight, k odd.
        gamma, beta: ``[C]`` float32 (float64 when x is) BatchNorm weight and bias
            (``ones`` / ``zeros`` for a BatchNorm without affine parameters).
        eps: BatchNorm epsilon, > 0.
        mean, var: ``[C]`` batch statistics of the conv output to use instead of computing
            them (both or neither): a backward's recompute of its forward, which must pass the
            statistics that forward returned (the gradient still treats them as x's batch
            statistics). Returned as given.
        stride, padding, activation, backend: as :func:`effnet_kernels.ops.dwconv_bn_act`.
        squeeze: also return the SE squeeze.

    Returns:
        ``(y, mean, var)``, or ``(y, pooled, mean, var)`` when ``squeeze``; ``mean`` and
        ``var`` are ``[C]`` float32 (float64 for float64 x), zeros for an empty batch.

    Raises:
        TypeError, ValueError: a wrong argument, or one value per channel (as ``nn.BatchNorm2d``).
        BackendUnavailableError: the requested backend cannot serve this input.
    """
    _checks.require_tensors(x=x, weight=weight, gamma=gamma, beta=beta)
    _checks.check_tensor(weight, "weight", 4)
    stride_pair = _checks.normalize_stride(stride)
    pad4 = _checks.normalize_padding(padding, weight.shape[-1])
    _checks.normalize_activation(activation)
    if not isinstance(squeeze, bool):
        raise TypeError(f"squeeze must be a bool, got {squeeze!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {eps!r}")
    y, pooled, mean, var = _OP(x, weight, gamma, beta, mean, var, float(eps), stride_pair, pad4, activation, squeeze,
                               backends.requested_backend(backend))
    return (y, pooled, mean, var) if squeeze else (y, mean, var)
