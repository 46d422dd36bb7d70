"""The fused MBConv in training: batch-statistics BatchNorm in the kernels, memory by recompute.

A converted block in training runs one of two computations, both with the semantics of the
original block (batch statistics, running statistics updated as ``nn.BatchNorm2d`` does,
the library's own stochastic depth):

* :class:`RecomputedMBConv` (the default): an ``autograd.Function`` whose forward runs the
  block without building a graph and saves only the block input, the per-channel batch
  statistics of the three BatchNorms, the SE squeeze and gate (``[N, C]``) and the
  stochastic-depth mask (``[N, 1, 1, 1]``). Its backward recomputes the expanded tensor,
  its activation and the depthwise output from those, and chains the ops' backward functions by
  hand (no nested autograd call, so DDP, AMP and gradient
  accumulation see an ordinary graph node). The depthwise BatchNorm's statistics are
  computed once, in the forward; the recompute applies them (the train-mode op given the
  statistics: the same arithmetic as the forward, so the recomputed tensors are the forward's).
  The 1x1 convs' BatchNorms run as eager's do, one ``native_batch_norm`` each (statistics,
  running statistics and output; the recompute runs it again, bit for bit), and the expand
  activation's gradient is the activation's own backward op: each one kernel in the input's
  dtype, float32 inside, no float32 copies of the expanded tensors (``python -m
  benchmarks.traffic --mode train`` counts them).
  In half precision (x's dtype or autocast's) the expand step is one GEMM instead
  (:func:`_folded_expand_forward`): the expand BatchNorm's batch statistics come from x's mean and
  covariance (the conv is linear: :func:`conv1x1_moments`, O(C^2) work on a C-channel tensor), so
  the statistics are known before the conv runs and conv + BatchNorm + activation is one
  ``pointwise_conv`` with them folded in; neither the conv output nor the normalised tensor is
  written. The backward recomputes the activation with the same call, and runs the conv + BatchNorm +
  activation backward as one op from the conv's input (``effnet::expand_bn_act_train_backward``: on
  the Triton backend the conv output, the BatchNorm output and their gradients are never written;
  each of its three kernels recomputes the conv output tile by tile from x). Per element of the
  expanded tensor, fp16, with real kernels' passes: the forward's expand step moved ~12 B (conv
  write, BatchNorm's two reads and write, activation) and now ~2 B plus ~16 B per element of x (the
  moments; x has 1/6 the channels); the recompute ~12 B and now ~2 B; the conv + BatchNorm +
  activation backward ~20 B (activation and BatchNorm backward, then the conv's two reads of its
  gradient) and now ~6 B (grad_a read three times) on Triton, ~16 B on the CUDA backend. Float32
  keeps the native path: the Gram matrix's float32 sum over all pixels rounds at ~sqrt(NHW) 2^-24,
  more than eager's own float32 error.
  With SE the projection conv takes the gate on load (``pointwise_conv(y, w, gate=gate)``, forward
  and recompute), so the excited tensor is never written there; its backward is
  ``pointwise_conv_backward`` (the input's, the weight's and the gate's gradients; on the Triton
  backend two GEMMs with the gate fused, :mod:`effnet_kernels.triton.pointwise_backward`, which
  write neither the excited tensor nor its gradient; on the CUDA backend cuDNN's convolution
  backward with its excite kernels, which form the excited tensor once for the weight's gradient).
* :func:`composed_forward`: the same block as differentiable ops (the train-mode fused
  depthwise op with its own autograd, the SE ops, the original 1x1 conv / BN modules);
  used under ``torch.compile`` (whose partitioner decides what to recompute) and for an
  empty batch.

A block whose BatchNorms are all frozen (eval mode) trains through the folded eval ops instead
(:mod:`effnet_kernels._frozen_block`); one with some frozen and some training trains eagerly.

Bytes, per output pixel of an MBConv with expansion 6 and C input channels, fp16: eager
autograd keeps the expand conv output, its BN and SiLU outputs, the depthwise conv, BN and
SiLU outputs, the excite product and the projection's conv output (~8 tensors of 6C or C
channels: ~2 * (C + 7 * 6C) bytes); the recomputed block keeps its input (2C bytes) and
O(C) per image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops._checks import accumulation_dtype, conv_output_size
from ._norms import is_frozen_batchnorm, trains_like_batchnorm
from ._sync_bn import group_moments, group_sums, process_group, sync_blocker
from ._aten_convs import activation_backward
from .reference import ACTIVATION_FNS

Tensor = torch.Tensor


class _UnknownDrop:
    """Sentinel for :attr:`effnet_kernels.nn.MBConvPlan.drop`: the adapter did not say."""

    def __repr__(self) -> str:
        return "UNKNOWN_DROP"


UNKNOWN_DROP: Any = _UnknownDrop()


# ---------------------------------------------------------------- BatchNorm bookkeeping
def momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-statistics factor of this training forward, bumping ``num_batches_tracked``
    first, exactly as ``_BatchNorm.forward`` does (``momentum=None``: cumulative average)."""
    factor = 0.0 if bn.momentum is None else float(bn.momentum)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
    return factor


def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int,
                         factor: float) -> None:
    """``running = (1 - factor) * running + factor * batch`` with the unbiased variance, as
    ``torch.batch_norm`` does in training; nothing for a BN without running statistics or an empty batch."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None or count == 0:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


# ---------------------------------------------------------------- what can train fused
def train_blocker(plan: Any) -> Optional[str]:
    """Why ``plan`` (an :class:`~effnet_kernels.nn.MBConvPlan`) cannot train fused, or None: its parts
    must be plain, and its BatchNorms all training or all frozen (eval mode, or frozen BatchNorm modules:
    :mod:`effnet_kernels._frozen_block`)."""
    from .nn import PointwiseSpec

    if plan.drop is UNKNOWN_DROP:
        return "the adapter does not describe the block's stochastic depth"
    if len(plan.pre) > 1 or (plan.pre and not isinstance(plan.pre[0], PointwiseSpec)):
        return "the expand step is not a plain 1x1 conv + BatchNorm (+ activation)"
    if len(plan.post) != 1 or not isinstance(plan.post[0], PointwiseSpec) or plan.post[0].activation != "identity":
        return "the projection is not a plain 1x1 conv + BatchNorm"
    parts = [("expand", plan.pre[0])] if plan.pre else []
    parts += [("depthwise", plan.dw), ("projection", plan.post[0])]
    for where, spec in parts:
        if spec.conv.bias is not None:
            return f"the {where} conv has a bias"
        bn = spec.bn
        if not (trains_like_batchnorm(bn) or is_frozen_batchnorm(bn)):
            return f"the {where} norm is {type(bn).__name__}, whose training forward is its own"
    from ._frozen_block import batchnorm_blocker

    reason = batchnorm_blocker([(where, spec.bn) for where, spec in parts])
    for where, spec in parts:
        reason = reason or sync_blocker(spec.bn, where)
    return reason


# ---------------------------------------------------------------- stochastic depth
def drop_mask(plan: Any, branch: Tensor, args: Sequence[Any], kwargs: dict) -> Optional[Tensor]:
    """The multiplier the block's own stochastic depth / dropout applies to ``branch``, drawn with
    the library's code on a tensor of ones (the same random numbers the original draws), or None.

    Per-sample drops (``plan.drop_per_sample``) get a ``[N, 1, 1, 1]`` ones tensor, others one of
    ``branch``'s shape.
    """
    return drop_mask_for(plan, tuple(branch.shape), branch.dtype, branch.device, args, kwargs)


def drop_mask_for(plan: Any, shape: Sequence[int], dtype: torch.dtype, device: torch.device, args: Sequence[Any],
                  kwargs: dict) -> Optional[Tensor]:
    """:func:`drop_mask` for a branch of this shape, dtype and device, before the branch is computed."""
    if plan.drop is None or not plan.residual:
        return None
    shape = (shape[0],) + (1,) * (len(shape) - 1) if plan.drop_per_sample else tuple(shape)
    ones = torch.ones(shape, dtype=dtype, device=device)
    mask = plan.drop(ones, *args, **kwargs)
    return None if mask is ones else mask


# ---------------------------------------------------------------- the differentiable composition
def composed_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str]) -> Tensor:
    """The block in training as differentiable ops: the original 1x1 conv / BN modules, the
    train-mode fused depthwise op (running statistics updated here), the SE ops."""
    h = x if plan.pre else autocast_input(x)  # the depthwise conv is the first: autocast's dtype
    for m in plan.pre:
        h = m(h)  # a PointwiseSpec in training runs the original conv, BN, activation
    y, pooled, _, _, _ = dw_forward(plan, h, backend)
    if plan.se is not None:
        y = ops.se_excite(y, plan.se.gate(pooled, backend), backend=backend)
    for m in plan.post:
        y = m(y)
    if plan.residual:
        mask = drop_mask(plan, y, args, kwargs)
        y = (y if mask is None else y * mask) + x
    return y


def dw_forward(plan: Any, h: Tensor, backend: Optional[str],
               group: Any = None) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, int]:
    """The train-mode fused depthwise step (with the squeeze when the block has SE), updating the
    depthwise BN's running statistics: ``(y, pooled or None, batch mean, biased batch var, count)``.

    With a process ``group`` (SyncBatchNorm) the statistics are the group's: this batch's from
    ``dwconv_bn_stats``, combined by :func:`~effnet_kernels._sync_bn.group_moments`, then applied;
    ``count`` is the values per channel they span.
    """
    dw = plan.dw
    bn = dw.bn
    squeeze = plan.se is not None
    factor = momentum_factor(bn)
    gamma, beta = _affine(bn.weight, bn.bias, bn.num_features, h)
    padding = dw.resolve_padding(h)
    mean = var = None
    count = None
    if group is not None:
        stride, pad4 = list(dw.stride), list(padding)
        mean, var = torch.ops.effnet.dwconv_bn_stats.default(h, dw.conv.weight, stride, pad4,
                                                              _backend_name(backend))
        k = dw.conv.weight.shape[-1]
        ho = conv_output_size(h.shape[2], pad4[2], pad4[3], k, stride[0], "height")
        wo = conv_output_size(h.shape[3], pad4[0], pad4[1], k, stride[1], "width")
        mean, var, count = group_moments(mean.to(gamma.dtype), var.to(gamma.dtype), h.shape[0] * ho * wo, group)
    out = ops.dwconv_bn_act_train(h, dw.conv.weight, gamma, beta, eps=float(bn.eps), mean=mean, var=var,
                                  stride=dw.stride, padding=padding, activation=dw.activation, squeeze=squeeze,
                                  backend=backend)
    y, pooled, mean, var = out if squeeze else (out[0], None, out[1], out[2])
    if count is None:
        count = y.shape[0] * y.shape[2] * y.shape[3]
    update_running_stats(bn, mean, var, count, factor)
    return y, pooled, mean, var, count


def _backend_name(backend: Optional[str]) -> str:
    from .backends import requested_backend

    return requested_backend(backend)


# ---------------------------------------------------------------- the recomputing block
@dataclass
class BlockStep:
    """What one training forward of a recomputing block (this module's, or the frozen one of
    :mod:`effnet_kernels._frozen_block`) fixed, for its backward."""

    plan: Any
    backend: str  # the backend request, resolved when the forward ran
    padding: tuple[int, int, int, int]
    autocast: Optional[tuple[str, torch.dtype]]  # (device type, dtype) when the forward ran under autocast
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str], **fields: Any):
        """The step of a forward of ``plan`` on ``x`` (the block's forward arguments ``args``, ``kwargs``)
        starting now: the backend request resolved, the padding and the autocast state of x's device."""
        from .backends import requested_backend

        return cls(plan=plan, backend=requested_backend(backend), padding=plan.dw.resolve_padding(x),
                   autocast=autocast_state(x.device.type), args=tuple(args), kwargs=dict(kwargs), **fields)


@dataclass(kw_only=True)
class _Step(BlockStep):
    """:class:`BlockStep` with what the batch-statistics block needs too."""

    eps: tuple[float, float, float]  # expand (0 without one), depthwise, projection BN eps
    # expand, depthwise, projection: the process group a SyncBatchNorm's statistics span (None:
    # this batch's), and the values per channel the forward's statistics spanned (set by the forward)
    groups: tuple[Any, Any, Any] = (None, None, None)
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    folded_expand: bool = False  # the expand step runs as one folded GEMM (:func:`folds_expand`)


# order of the Parameters RecomputedMBConv takes (absent ones are None)
_PARAMS = ("pre_w", "pre_g", "pre_b", "dw_w", "dw_g", "dw_b", "se_wr", "se_br", "se_we", "se_be",
           "post_w", "post_g", "post_b")


def _params(plan: Any) -> list[Optional[Tensor]]:
    """The Parameters the block computes with, in :data:`_PARAMS` order."""
    pre = plan.pre[0] if plan.pre else None
    post = plan.post[0]
    se = plan.se
    out: list[Optional[Tensor]] = []
    out += [pre.conv.weight, pre.bn.weight, pre.bn.bias] if pre is not None else [None, None, None]
    out += [plan.dw.conv.weight, plan.dw.bn.weight, plan.dw.bn.bias]
    out += ([se.conv_reduce.weight, se.conv_reduce.bias, se.conv_expand.weight, se.conv_expand.bias]
            if se is not None else [None] * 4)
    out += [post.conv.weight, post.bn.weight, post.bn.bias]
    return out


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], c: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(gamma, beta) as the kernels take them: float32 (float64 for float64 inputs), ones/zeros without affine."""
    dtype = accumulation_dtype(like)
    gamma = weight.to(dtype) if weight is not None else torch.ones(c, dtype=dtype, device=like.device)
    beta = bias.to(dtype) if bias is not None else torch.zeros(c, dtype=dtype, device=like.device)
    return gamma, beta


def _bn_stats_forward(h: Tensor, bn: nn.modules.batchnorm._BatchNorm,
                      group: Any = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Train-mode BatchNorm of a 1x1 conv's output ``h``: ``(out, mean, invstd, count)``, running
    statistics updated as ``nn.BatchNorm2d`` updates them; the backward's :func:`_bn_recompute`
    reproduces ``out`` bit for bit. One ``native_batch_norm`` (the op eager's BatchNorm runs: statistics,
    running statistics and the normalised output, float32 inside, h's dtype out) when the statistics are
    this batch's (:func:`_native_statistics`); with a process ``group`` (SyncBatchNorm), one value per channel
    or an empty batch, they are computed here (the group's, ``count`` the values per channel they span)
    and applied by :func:`_bn_apply`."""
    factor = momentum_factor(bn)
    count = h.shape[0] * h.shape[2] * h.shape[3]
    if _native_statistics(group, count):
        track = bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            h, bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None, True,
            factor, float(bn.eps))
        return out, mean, invstd, count
    cdt = accumulation_dtype(h)
    if count:
        var, mean = torch.var_mean(h.to(cdt), dim=(0, 2, 3), correction=0)
    else:
        mean = var = torch.zeros(h.shape[1], dtype=cdt, device=h.device)
    if group is not None:
        mean, var, count = group_moments(mean, var, count, group)
    update_running_stats(bn, mean, var, count, factor)
    invstd = torch.rsqrt(var + float(bn.eps))
    return _bn_apply(h, bn.weight, bn.bias, mean, invstd), mean, invstd, count


# ---------------------------------------------------------------- the expand step as one GEMM
# Input dtypes whose expand step trains as one folded GEMM (:func:`_folded_expand_forward`). Its statistics
# come from x's float32 Gram matrix, a sum over all N*H*W pixels whose rounding (~sqrt(NHW) 2^-24
# relative) is far below half precision's 2^-11 but can exceed eager's own float32 error; float32 and
# float64 inputs keep the native_batch_norm path.
FOLDED_EXPAND_DTYPES = (torch.float16, torch.bfloat16)


class Conv1x1Moments(NamedTuple):
    """:func:`conv1x1_moments`: the conv output's per-channel ``mean`` and biased ``var``, and x's ``input_mean``."""

    mean: Tensor
    var: Tensor
    input_mean: Tensor


def conv1x1_moments(x: Tensor, weight: Tensor) -> Conv1x1Moments:
    """Per-channel mean and biased variance over (N, H, W) of ``h = conv1x1(x, weight)``, never forming h.

    h is linear in x, so ``mean_h = W mu`` and ``var_h = diag(W S W^T)`` with ``mu`` and ``S`` (``[C, C]``)
    x's per-channel mean and biased covariance, everything in the accumulation dtype
    (:func:`~effnet_kernels.ops._checks.accumulation_dtype`), autocast off. Reads x twice (the mean; the
    centred copy, written channels_last in float32 whatever x's layout, so that the Gram matrix is one GEMM
    over the pixels of a view) and otherwise touches O(C^2): for an MBConv's expand conv (6x as many output
    channels) a fraction of the bytes of h itself, in about nine small kernels.
    """
    cdt = accumulation_dtype(x)
    n, c = x.shape[0], x.shape[1]
    m = n * x.shape[2] * x.shape[3]
    w = weight.reshape(weight.shape[0], c).to(cdt)
    with autocast_off(x.device.type):
        mu = x.mean(dim=(0, 2, 3), dtype=cdt)
        centred = torch.empty(x.shape, dtype=cdt, device=x.device, memory_format=torch.channels_last)
        torch.sub(x, mu[None, :, None, None], out=centred)
        pixels = centred.permute(0, 2, 3, 1).reshape(m, c)  # a view: [N H W, C]
        cov = (pixels.t() @ pixels).div_(m)
        mean = w @ mu
        var = torch.linalg.vecdot(w @ cov, w).clamp_min_(0.0)
    return Conv1x1Moments(mean, var, mu)


def autocast_off(device: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device`` when it is on there (a no-op otherwise: meta, or autocast off)."""
    if autocast_state(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def folds_expand(plan: Any, x: Tensor, group: Any) -> bool:
    """Whether the recomputing block runs its expand step as one folded GEMM (:func:`_folded_expand_forward`):
    an expand conv, statistics of this batch (no process group) over more than one value per channel, and a
    half-precision conv input (x's dtype, or autocast's)."""
    if not plan.pre or group is not None or x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        return False
    return autocast_input(x).dtype in FOLDED_EXPAND_DTYPES


def _expand_fold(weight: Tensor, bn: nn.modules.batchnorm._BatchNorm, moments: Conv1x1Moments, invstd: Tensor,
                 x: Tensor) -> tuple[Tensor, Tensor]:
    """``(W * scale, shift)`` of the expand conv and its BatchNorm with these batch statistics: ``scale = gamma *
    invstd``, the weight rounded to x's dtype (the values the GEMM multiplies), and ``shift = beta - W' mu``
    (float32) from those rounded values and x's mean, so that the folded conv's output has mean ``beta`` over
    the batch exactly, whatever the weights' rounding and x's mean (``beta - mean * scale`` would leave
    ``(W' - W * scale) mu``, which grows with ``|mu| / std``)."""
    gamma, beta = _affine(bn.weight, bn.bias, bn.num_features, x)
    scale = gamma * invstd
    folded = (weight.reshape(weight.shape[0], -1).to(scale.dtype) * scale[:, None]).to(x.dtype)
    return folded, beta - folded.to(scale.dtype) @ moments.input_mean


def _folded_expand_forward(x: Tensor, pre: Any, backend: str) -> tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor]:
    """The expand conv + train-mode BatchNorm + activation as one GEMM with its epilogue:
    ``(a, mean, invstd, count, weight, shift)``.

    The batch statistics of the conv output come from x's moments (:func:`conv1x1_moments`), the
    running statistics are updated as ``nn.BatchNorm2d`` updates them, and ``a = act(conv1x1(x, W * scale)
    + shift)`` is one ``pointwise_conv`` (float32 accumulation, one rounding), so neither the conv output
    nor the normalised tensor is written: eager writes and re-reads both (the conv, BatchNorm's two
    passes, the activation). The backward recomputes ``a`` with the same call and the returned fold.
    """
    h = autocast_input(x)
    bn = pre.bn
    factor = momentum_factor(bn)
    moments = conv1x1_moments(h, pre.conv.weight)
    mean, var = moments.mean, moments.var
    count = h.shape[0] * h.shape[2] * h.shape[3]
    update_running_stats(bn, mean, var, count, factor)
    invstd = torch.rsqrt(var + float(bn.eps))
    weight, shift = _expand_fold(pre.conv.weight, bn, moments, invstd, h)
    a = ops.pointwise_conv(h, weight, shift, activation=pre.activation, backend=backend)
    return a, mean, invstd, count, weight, shift


def _native_statistics(group: Any, count: int) -> bool:
    """Whether :func:`_bn_stats_forward` computes this batch's statistics with ``native_batch_norm``."""
    return group is None and count > 1


def _bn_recompute(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                  eps: float, group: Any, count: int) -> Tensor:
    """:func:`_bn_stats_forward`'s ``out`` again, bit for bit, from the same ``h``: the same ``native_batch_norm``
    (its statistics recomputed, running statistics left alone), or :func:`_bn_apply` of the given statistics.
    (An eval-mode op given ``mean`` and ``invstd`` would read ``h`` once less but round its own inverse std,
    and the gradient through batch statistics of a few values per channel magnifies that difference.)"""
    if _native_statistics(group, count):
        return torch.ops.aten.native_batch_norm(h, weight, bias, None, None, True, 0.0, eps)[0]
    return _bn_apply(h, weight, bias, mean, invstd)


def _bn_apply(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """BatchNorm with given statistics, ``(h - mean) * invstd * gamma + beta`` in float32, h's dtype out."""
    gamma, beta = _affine(weight, bias, h.shape[1], h)
    scale = gamma * invstd
    out = (h.to(scale.dtype) - mean[None, :, None, None]) * scale[None, :, None, None] + beta[None, :, None, None]
    return out.to(h.dtype)


def _bn_backward(grad: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                 invstd: Tensor, eps: float, group: Any = None,
                 count: int = 0) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(grad_h, grad_gamma, grad_beta) of train-mode BatchNorm, through the batch statistics (with a
    process ``group``: statistics over ``count`` values per channel of the group's batches)."""
    if group is not None:
        return _bn_backward_group(grad, h, weight, bias, mean, invstd, group, count)
    want = [True, weight is not None, bias is not None]
    gh, gw, gb = torch.ops.aten.native_batch_norm_backward(grad.to(h.dtype), h, weight, None, None, mean, invstd,
                                                           True, eps, want)
    return gh, (gw if weight is not None else None), (gb if bias is not None else None)


def _bn_backward_group(grad: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                       invstd: Tensor, group: Any, count: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:func:`_bn_backward` for statistics spanning a process group (SyncBatchNorm's backward): this
    batch's ``sum(g)``, ``sum(g * (h - mean))`` are summed over the group for the input gradient; the
    weight and bias gradients are this batch's."""
    cdt = mean.dtype
    g = grad.to(cdt)
    centred = h.to(cdt) - mean[None, :, None, None]
    sum_g, sum_g_centred = g.sum(dim=(0, 2, 3)), (g * centred).sum(dim=(0, 2, 3))
    grad_w = (sum_g_centred * invstd).to(weight.dtype) if weight is not None else None
    grad_b = sum_g.to(bias.dtype) if bias is not None else None
    total_g, total_gc = group_sums(sum_g, sum_g_centred, group)
    m = max(count, 1)
    gamma = weight.to(cdt) if weight is not None else torch.ones_like(mean)
    k = (gamma * invstd)[None, :, None, None]
    gh = (g - (total_g / m)[None, :, None, None] - centred * (invstd * invstd * total_gc / m)[None, :, None, None]) * k
    return gh.to(h.dtype), grad_w, grad_b


def _conv1x1(x: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(x, weight)


def _project(y: Tensor, gate: Optional[Tensor], weight: Tensor, backend: str) -> Tensor:
    """The projection conv's output (before its BatchNorm): with an SE ``gate`` one ``pointwise_conv`` that
    scales y on load (the excited tensor is never written; its backward, ``pointwise_conv_backward``, gives
    the gate's gradient too), else the plain 1x1 conv."""
    if gate is None:
        return _conv1x1(y, weight)
    return ops.pointwise_conv(y, weight, gate=gate, backend=backend)


def _conv1x1_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of a 1x1 conv, computed in ``grad``'s dtype (autocast's) and cast back."""
    dt = grad.dtype
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x.to(dt), weight.to(dt), None, [1, 1], [0, 0], [1, 1],
                                                    False, [0, 0], 1, [True, True, False])
    return gx.to(x.dtype), gw.to(weight.dtype)


def run_under(state: Optional[tuple[str, torch.dtype]]) -> contextlib.AbstractContextManager:
    """Autocast as a forward found it (:func:`autocast_state`: ``(device, dtype)``, or None for off), for its
    backward's recompute."""
    if state is None:
        return contextlib.nullcontext()
    device, dtype = state
    return torch.autocast(device, dtype=dtype)


def or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or an empty tensor standing for None in ``save_for_backward`` (:func:`or_none` undoes it)."""
    return t if t is not None else like.new_empty(0)


def or_none(t: Tensor) -> Optional[Tensor]:
    """A saved tensor, None where :func:`or_empty` stood in for one."""
    return t if t.numel() else None


def _dw_backward(gy: Tensor, gpooled: Optional[Tensor], a: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                 mean: Tensor, var: Tensor, eps: float, stride: list, padding: list, activation: str, backend: str,
                 group: Any, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_a, grad_weight, grad_gamma, grad_beta) of the train-mode depthwise step; with a process
    ``group`` the input gradients come from the group's sums (``dwconv_bn_grad_sums``, all-reduced,
    then ``dwconv_bn_input_grads``), gamma's and beta's from this batch's."""
    if group is None:
        return torch.ops.effnet.dwconv_bn_act_train_backward.default(
            gy, gpooled, a, weight, gamma, beta, mean, var, eps, stride, padding, activation, backend)
    sum_gx, sum_g = torch.ops.effnet.dwconv_bn_grad_sums.default(
        gy, gpooled, a, weight, gamma, beta, mean, var, eps, stride, padding, activation, backend)
    total_gx, total_g = group_sums(sum_gx, sum_g, group)
    ga, gw = torch.ops.effnet.dwconv_bn_input_grads.default(
        gy, gpooled, a, weight, gamma, beta, mean, var, total_gx, total_g, count, eps, stride, padding, activation,
        backend)
    return ga, gw, sum_gx, sum_g


class RecomputedMBConv(torch.autograd.Function):
    """One MBConv block in training that saves its input and O(C) per image, and recomputes the rest.

    ``apply(x, step, *params)`` with ``params`` in :data:`_PARAMS` order. Saved (all through
    ``save_for_backward``): ``x``, the batch statistics of the three BatchNorms, the SE squeeze
    and gate, the drop mask, and the Parameters (as eager autograd saves them, so in-place
    changes before backward are caught).
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: _Step, *params: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        plan = step.plan
        pre = plan.pre[0] if plan.pre else None
        post = plan.post[0]
        h = x if pre is not None else autocast_input(x)  # the depthwise conv first: autocast's dtype
        em = es = fold_w = fold_b = x.new_empty(0)
        pre_group, dw_group, post_group = step.groups
        if step.folded_expand:
            h, em, es, step.counts[0], fold_w, fold_b = _folded_expand_forward(x, pre, step.backend)
        elif pre is not None:
            b, em, es, step.counts[0] = _bn_stats_forward(_conv1x1(x, pre.conv.weight), pre.bn, pre_group)
            h = ACTIVATION_FNS[pre.activation](b)
        y, pooled, dw_mean, dw_var, step.counts[1] = dw_forward(plan, h, step.backend, dw_group)
        gate = None
        if plan.se is not None:
            gate = plan.se.gate(pooled, step.backend)
        q, pm, ps, step.counts[2] = _bn_stats_forward(_project(y, gate, post.conv.weight, step.backend), post.bn,
                                                      post_group)
        out = q
        mask = None
        if plan.residual:
            mask = drop_mask(plan, q, step.args, step.kwargs)
            out = (q if mask is None else q * mask) + x
        ctx.save_for_backward(x, em, es, fold_w, fold_b, dw_mean, dw_var, or_empty(pooled, x), or_empty(gate, x), pm,
                              ps, or_empty(mask, x), *[or_empty(p, x) for p in params])
        ctx.step = step
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises rather than being wrong
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # a backward called inside an autocast region runs its ops in the dtypes it chose (the recompute
        # under the forward's own autocast state), as eager autograd's do
        with autocast_off(grad_out.device.type):
            return _recomputed_backward(ctx, grad_out)


def _recomputed_backward(ctx: Any, grad_out: Tensor) -> tuple:
    """The body of :meth:`RecomputedMBConv.backward`: recompute, then each op's backward in turn."""
    step: _Step = ctx.step
    plan = step.plan
    x, em, es, fold_w, fold_b, dw_mean, dw_var, pooled, gate, pm, ps, mask, *saved = ctx.saved_tensors
    mask = or_none(mask)
    p = dict(zip(_PARAMS, (or_none(t) for t in saved)))
    has_pre = p["pre_w"] is not None
    pre_eps, dw_eps, post_eps = step.eps
    pre_act = plan.pre[0].activation if has_pre else "identity"
    dw = plan.dw
    se = plan.se
    backend = step.backend
    pre_group, dw_group, post_group = step.groups
    pre_count, dw_count, post_count = step.counts
    grads: dict[str, Optional[Tensor]] = dict.fromkeys(_PARAMS)

    # ---- recompute the block's large tensors, under the forward's autocast state
    with torch.no_grad(), run_under(step.autocast):
        if step.folded_expand:  # a as the forward computed it (the backward recomputes the conv output itself)
            xh = autocast_input(x)
            a = ops.pointwise_conv(xh, fold_w, fold_b, activation=pre_act, backend=backend)
        elif has_pre:
            h0 = _conv1x1(x, p["pre_w"])
            b = _bn_recompute(h0, p["pre_g"], p["pre_b"], em, es, pre_eps, pre_group, pre_count)
            a = ACTIVATION_FNS[pre_act](b)
        else:
            a = autocast_input(x)  # as the forward (under its autocast state)
        gamma, beta = _affine(p["dw_g"], p["dw_b"], a.shape[1], a)
        y = ops.dwconv_bn_act_train(a, p["dw_w"], gamma, beta, eps=dw_eps, mean=dw_mean, var=dw_var,
                                    stride=dw.stride, padding=step.padding, activation=dw.activation,
                                    backend=backend)[0]
        q_in = _project(y, gate if se is not None else None, p["post_w"], backend)

    # ---- backward, op by op
    gq = grad_out if mask is None else grad_out * mask
    gp, grads["post_g"], grads["post_b"] = _bn_backward(gq, q_in, p["post_g"], p["post_b"], pm, ps, post_eps,
                                                        post_group, post_count)
    gpooled = None
    if se is not None:  # the projection's backward through the gate it applied on load
        pw = p["post_w"]
        gy, gpw, _, ggate, _ = torch.ops.effnet.pointwise_conv_backward.default(
            gp.to(y.dtype), y, pw.reshape(pw.shape[0], -1), None, gate, None, "identity", False, backend)
        grads["post_w"] = gpw.reshape(pw.shape)
        wr, we = p["se_wr"], p["se_we"]
        (gpooled, gwr, grads["se_br"], gwe, grads["se_be"]) = torch.ops.effnet.se_gate_backward.default(
            ggate.to(gate.dtype), pooled, wr.flatten(1), p["se_br"], we.flatten(1), p["se_be"], se.activation,
            se.gate_kind, backend)
        grads["se_wr"], grads["se_we"] = gwr.reshape(wr.shape), gwe.reshape(we.shape)
    else:
        ge, grads["post_w"] = _conv1x1_backward(gp, y, p["post_w"])
        gy = ge.to(y.dtype)
    ga, grads["dw_w"], ggamma, gbeta = _dw_backward(gy, gpooled, a, p["dw_w"], gamma, beta, dw_mean, dw_var, dw_eps,
                                                    list(dw.stride), list(step.padding), dw.activation, backend,
                                                    dw_group, dw_count)
    if p["dw_g"] is not None:
        grads["dw_g"] = ggamma.to(p["dw_g"].dtype)
    if p["dw_b"] is not None:
        grads["dw_b"] = gbeta.to(p["dw_b"].dtype)
    if step.folded_expand:  # the expand conv + BatchNorm + activation backward as one op, from the conv's input
        pw = p["pre_w"]
        pre_gamma, pre_beta = _affine(p["pre_g"], p["pre_b"], pw.shape[0], xh)
        gxh, gpw, ggamma, gbeta = torch.ops.effnet.expand_bn_act_train_backward.default(
            ga, xh, pw.reshape(pw.shape[0], -1), pre_gamma, pre_beta, em, es, pre_act, backend)
        grads["pre_g"] = ggamma.to(p["pre_g"].dtype) if p["pre_g"] is not None else None
        grads["pre_b"] = gbeta.to(p["pre_b"].dtype) if p["pre_b"] is not None else None
        gx, grads["pre_w"] = gxh.to(x.dtype), gpw.reshape(pw.shape)
    elif has_pre:
        gb = activation_backward(ga, b, pre_act)
        gh0, grads["pre_g"], grads["pre_b"] = _bn_backward(gb, h0, p["pre_g"], p["pre_b"], em, es, pre_eps,
                                                           pre_group, pre_count)
        gx, grads["pre_w"] = _conv1x1_backward(gh0, x, p["pre_w"])
    else:
        gx = ga.to(x.dtype)
    return backward_outputs(ctx, plan, gx, grad_out, _PARAMS, grads)


def backward_outputs(ctx: Any, plan: Any, gx: Tensor, grad_out: Tensor, names: Sequence[str],
                     grads: dict[str, Optional[Tensor]]) -> tuple:
    """What a recomputing block's backward returns for ``apply(x, step, *tensors)``: x's gradient (plus
    ``grad_out`` through the residual), None for the step, and each of the ``names`` tensors' gradient
    from ``grads`` where autograd needs it."""
    if plan.residual:
        gx = gx + grad_out.to(gx.dtype)
    out = [grads[name] if need else None for name, need in zip(names, ctx.needs_input_grad[2:])]
    return (gx, None, *out)


def autocast_input(x: Tensor) -> Tensor:
    """``x`` as a convolution inside an autocast region computes with it: in the autocast dtype
    when autocast is on for x's device (float64 and non-float tensors are left alone, as autocast
    leaves them). The fused ops have no autocast rule of their own, so a fused module casts its
    input where the module it replaces starts with a convolution."""
    state = autocast_state(x.device.type)
    if state is None or not x.is_floating_point() or x.dtype in (torch.float64, state[1]):
        return x
    return x.to(state[1])


def autocast_state(device: str) -> Optional[tuple[str, torch.dtype]]:
    """``(device, dtype)`` when autocast is on for ``device`` (None for off, or a device autocast does not know: meta)."""
    try:
        if not torch.is_autocast_enabled(device):
            return None
    except RuntimeError:
        return None
    return device, torch.get_autocast_dtype(device)


def recomputed_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str]) -> Tensor:
    """The block in training through :class:`RecomputedMBConv` (see the module docstring)."""
    eps = (float(plan.pre[0].bn.eps) if plan.pre else 0.0, float(plan.dw.bn.eps), float(plan.post[0].bn.eps))
    groups = process_groups(plan)
    step = _Step.of(plan, x, args, kwargs, backend, eps=eps, groups=groups,
                    folded_expand=folds_expand(plan, x, groups[0]))
    return RecomputedMBConv.apply(x, step, *_params(plan))


def process_groups(plan: Any) -> tuple[Any, Any, Any]:
    """The process groups the expand, depthwise and projection statistics span (None: this batch's)."""
    pre = process_group(plan.pre[0].bn) if plan.pre else None
    return pre, process_group(plan.dw.bn), process_group(plan.post[0].bn)


def train_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str]) -> Tensor:
    """A converted block's training forward (``plan`` passed :func:`train_blocker`): with every
    BatchNorm frozen the folded ops with autograd (:func:`effnet_kernels._frozen_block.frozen_forward`);
    else recomputing, or composed under torch.compile, without grad mode, or for an empty batch. A
    block whose statistics span a process group (SyncBatchNorm) always recomputes (every process
    must issue the same collectives; it never compiles fused: :func:`train_blocker`)."""
    from ._frozen_block import all_frozen, frozen_forward

    if all_frozen(plan):
        return frozen_forward(plan, x, args, kwargs, backend)
    synced = any(g is not None for g in process_groups(plan))
    if not synced and (torch.compiler.is_compiling() or x.shape[0] == 0 or not torch.is_grad_enabled()):
        return composed_forward(plan, x, args, kwargs, backend)
    return recomputed_forward(plan, x, args, kwargs, backend)
