"""A training block whose BatchNorms are all frozen (eval mode, running statistics), fused.

Fine-tuning often freezes BatchNorm: ``model.train()``, then every ``nn.BatchNorm2d`` back to
``eval()``, so the statistics stay those of pre-training while the weights learn. Such a block
computes exactly what it computes in eval, BN folded into the convs, plus its stochastic depth
(the block is training), so it runs the eval ops (:func:`effnet_kernels.nn.folded_forward`) with
autograd:

* the folds are differentiable: ``scale = gamma * rsqrt(running_var + eps)``,
  ``shift = beta - running_mean * scale`` (:func:`~effnet_kernels.nn.fold_batchnorm`) and the
  projection's ``weight * scale`` (:func:`~effnet_kernels.nn.fold_into_conv`), so gamma and beta
  get their gradients through the ops' ``scale`` / ``shift`` / ``bias`` gradients, the conv weights
  through the folded weight; :func:`~effnet_kernels.nn.cached_fold` folds afresh whenever autograd
  needs the graph, and otherwise keys its cache on the sources' version counters (an optimizer
  step invalidates it);
* the running statistics and ``num_batches_tracked`` are left alone (an eval BatchNorm updates
  neither);
* stochastic depth draws its mask with the library's own code (:func:`~effnet_kernels._train_block.drop_mask_for`,
  the random numbers the original draws) and the block is ``project(y) * mask + x``; without a
  mask (no drop, rate 0) the projection adds the residual itself.

Frozen BatchNorm *modules* (torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``: what
``timm.utils.model.freeze_batch_norm_2d`` swaps in, or a detection backbone's ``norm_layer``) count as
frozen in train mode too (:mod:`effnet_kernels._norms`); their ``weight`` and ``bias`` are buffers, so
the gradients reach only the convs, the SE weights and the input.

Memory by recompute (:class:`RecomputedFrozenMBConv`, the default when autograd records): the
four ops run without a graph, and the block saves its input, the SE squeeze and gate (``[N, C]``),
the stochastic-depth mask and the folds; its backward recomputes the expand output and the
depthwise output from those (two of the four kernels) and chains the ops' backward functions by
hand. The folds are computed outside it with autograd, so gamma, beta and the conv weights get their
gradients through the folds' own (tiny) graph. Under ``torch.compile``, without grad mode, or for an
empty batch the block is :func:`~effnet_kernels.nn.folded_forward`'s differentiable ops instead,
whose autograd keeps each op's inputs (the expanded tensors).

A block with some BatchNorms frozen and others training trains through its eager forward
(:func:`batchnorm_blocker` says why).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._norms import bn_uses_batch_stats, bn_uses_running_stats, frozen_how
from ._train_block import (
    BlockStep, autocast_input, autocast_off, backward_outputs, drop_mask_for, or_empty, or_none, run_under,
)
from .nn import folded_forward


def _norms(plan: Any) -> list[tuple[str, nn.Module]]:
    """``(where, BatchNorm)`` of a block that trains fused: expand (if any), depthwise, projection."""
    out = [("expand", plan.pre[0].bn)] if plan.pre else []
    return out + [("depthwise", plan.dw.bn), ("projection", plan.post[0].bn)]


def _listed(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _bns(names: Sequence[str]) -> str:
    """``"the expand BatchNorm is"`` / ``"the expand and depthwise BatchNorms are"``."""
    return f"the {_listed(names)} " + ("BatchNorm is" if len(names) == 1 else "BatchNorms are")


def batchnorm_blocker(norms: Sequence[tuple[str, nn.Module]]) -> Optional[str]:
    """Why BatchNorms in these modes keep a training block eager, or None: they must be all
    training (batch statistics, :mod:`effnet_kernels._train_block`) or all frozen (this module)."""
    frozen = [(where, bn) for where, bn in norms if bn_uses_running_stats(bn)]
    training = [where for where, bn in norms if bn_uses_batch_stats(bn)]
    untracked = [where for where, bn in norms if not bn_uses_batch_stats(bn) and not bn_uses_running_stats(bn)]
    if untracked:
        return (f"{_bns(untracked)} in eval mode without running statistics (normalising with batch statistics "
                f"it does not track)")
    if frozen and training:
        return (f"{_frozen_phrase(frozen)} while {_bns(training)} training: a block trains "
                f"fused with all its BatchNorms frozen or all training")
    return None


def _frozen_phrase(frozen: Sequence[tuple[str, nn.Module]]) -> str:
    """``"the projection BatchNorm is in eval mode (frozen statistics)"``, ``"the expand and depthwise BatchNorms
    are FrozenBatchNorm2d modules (frozen statistics)"``, or both joined by "and"."""
    groups: dict[str, list[str]] = {}
    for where, bn in frozen:
        groups.setdefault(frozen_how(bn), []).append(where)
    phrases = []
    for how, names in groups.items():
        if how != "in eval mode" and len(names) > 1:
            how = f"{how[2:]} modules"  # "a FrozenBatchNorm2d" -> "FrozenBatchNorm2d modules"
        phrases.append(f"{_bns(names)} {how} (frozen statistics)")
    return " and ".join(phrases)


def all_frozen(plan: Any) -> bool:
    """True when every BatchNorm of ``plan`` (one that trains fused) normalises with its running statistics."""
    return all(bn_uses_running_stats(bn) for _, bn in _norms(plan))


def frozen_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str]) -> Tensor:
    """The training forward of a block whose BatchNorms are all frozen (see the module docstring):
    recomputing while autograd records, else the differentiable folded ops."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.shape[0] > 0:
        return recomputed_frozen_forward(plan, x, args, kwargs, backend)
    return _folded_ops_forward(plan, x, args, kwargs, backend)


def _folded_ops_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict, backend: Optional[str]) -> Tensor:
    """The frozen block as the differentiable folded ops, its stochastic depth drawn as the original draws it."""
    def mask(y: Tensor) -> Optional[Tensor]:
        # the residual branch has x's shape and the projection's output dtype (y's)
        return drop_mask_for(plan, tuple(x.shape), y.dtype, x.device, args, kwargs)

    return folded_forward(plan, x, backend, drop_mask=mask)


# ---------------------------------------------------------------- the recomputing frozen block
# order of the tensors RecomputedFrozenMBConv computes with (absent ones are None): the expand conv's
# folded weight and bias, the depthwise weight and its BatchNorm's scale and shift, the SE convs, the
# projection's folded weight and bias
_FOLDS = ("pre_w", "pre_b", "dw_w", "dw_scale", "dw_shift", "se_wr", "se_br", "se_we", "se_be", "post_w", "post_b")


def _folds(plan: Any) -> list[Optional[Tensor]]:
    """The tensors the frozen block computes with, in :data:`_FOLDS` order: the folds with autograd
    where their sources need gradients (:func:`~effnet_kernels.nn.cached_fold`)."""
    se = plan.se
    out: list[Optional[Tensor]] = list(plan.pre[0].folded()) if plan.pre else [None, None]
    out += [plan.dw.conv.weight, *plan.dw.folded()]
    out += ([se.conv_reduce.weight, se.conv_reduce.bias, se.conv_expand.weight, se.conv_expand.bias]
            if se is not None else [None] * 4)
    return out + list(plan.post[0].folded())


def _expand_and_depthwise(step: BlockStep, x: Tensor, f: dict, squeeze: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(h, a, y, pooled)``: x as the first conv takes it (autocast's dtype), the expand output (h
    without an expand conv), the depthwise output and, with ``squeeze``, its SE squeeze."""
    plan = step.plan
    h = autocast_input(x)
    a = h if f["pre_w"] is None else ops.pointwise_conv(h, f["pre_w"], f["pre_b"], activation=plan.pre[0].activation,
                                                       backend=step.backend)
    out = ops.dwconv_bn_act(a, f["dw_w"], f["dw_scale"], f["dw_shift"], stride=plan.dw.stride, padding=step.padding,
                            activation=plan.dw.activation, squeeze=squeeze, backend=step.backend)
    y, pooled = out if squeeze else (out, None)
    return h, a, y, pooled


class RecomputedFrozenMBConv(torch.autograd.Function):
    """A training block with frozen BatchNorm that saves its input and O(C) per image, and recomputes the rest.

    ``apply(x, step, *folds)`` with ``folds`` in :data:`_FOLDS` order. Forward: the eval block's four ops
    (expand, depthwise + squeeze, SE gate, projection taking the gate on load and adding the residual;
    with a stochastic-depth mask, ``project(y) * mask + x``). Saved: ``x``, the squeeze, the gate, the
    mask and the folds. Backward: the expand and depthwise outputs recomputed under the forward's
    autocast state, then the projection's, the gate's, the depthwise op's and the expand conv's
    backward functions in turn.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: BlockStep, *folds: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        plan = step.plan
        f = dict(zip(_FOLDS, folds))
        se = plan.se
        h, _, y, pooled = _expand_and_depthwise(step, x, f, squeeze=se is not None)
        gate = None
        if se is not None:
            gate = ops.se_gate(pooled, f["se_wr"], f["se_br"], f["se_we"], f["se_be"], activation=se.activation,
                               gate=se.gate_kind, backend=step.backend)
        # the residual branch has x's shape and the projection's output dtype (y's)
        mask = drop_mask_for(plan, tuple(x.shape), y.dtype, x.device, step.args, step.kwargs)
        fuse_residual = plan.residual and mask is None and h.dtype == x.dtype
        out = ops.pointwise_conv(y, f["post_w"], f["post_b"], gate=gate, residual=x if fuse_residual else None,
                                 backend=step.backend)
        if plan.residual and not fuse_residual:  # under autocast, or with a drawn mask
            out = (out if mask is None else out * mask) + x
        ctx.save_for_backward(x, or_empty(pooled, x), or_empty(gate, x), or_empty(mask, x),
                              *[or_empty(t, x) for t in folds])
        ctx.step = step
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises rather than being wrong
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # a backward called inside an autocast region runs its ops in the dtypes it chose (the recompute
        # under the forward's own autocast state), as eager autograd's do
        with autocast_off(grad_out.device.type):
            return _frozen_backward(ctx, grad_out)


def _frozen_backward(ctx: Any, grad_out: Tensor) -> tuple:
    """The body of :meth:`RecomputedFrozenMBConv.backward`: recompute, then each op's backward in turn."""
    step: BlockStep = ctx.step
    plan = step.plan
    se = plan.se
    backend = step.backend
    x, pooled, gate, mask, *saved = ctx.saved_tensors
    pooled, gate, mask = or_none(pooled), or_none(gate), or_none(mask)
    f = dict(zip(_FOLDS, (or_none(t) for t in saved)))
    grads: dict[str, Optional[Tensor]] = dict.fromkeys(_FOLDS)
    with torch.no_grad(), run_under(step.autocast):
        h, a, y, _ = _expand_and_depthwise(step, x, f, squeeze=False)

    gq = grad_out if mask is None else grad_out * mask
    gy, grads["post_w"], gb, ggate, _ = torch.ops.effnet.pointwise_conv_backward.default(
        gq.to(y.dtype), y, f["post_w"], f["post_b"], gate, None, "identity", False, backend)
    grads["post_b"] = gb if f["post_b"] is not None else None
    gpooled = None
    if se is not None:
        wr, we = f["se_wr"], f["se_we"]
        gpooled, gwr, grads["se_br"], gwe, grads["se_be"] = torch.ops.effnet.se_gate_backward.default(
            ggate.to(gate.dtype), pooled, wr.flatten(1), f["se_br"], we.flatten(1), f["se_be"], se.activation,
            se.gate_kind, backend)
        grads["se_wr"], grads["se_we"] = gwr.reshape(wr.shape), gwe.reshape(we.shape)
    ga, grads["dw_w"], grads["dw_scale"], grads["dw_shift"] = torch.ops.effnet.dwconv_bn_act_backward.default(
        gy, gpooled, a, f["dw_w"], f["dw_scale"], f["dw_shift"], list(plan.dw.stride), list(step.padding),
        plan.dw.activation, backend)
    if f["pre_w"] is not None:
        gh, grads["pre_w"], gb, _, _ = torch.ops.effnet.pointwise_conv_backward.default(
            ga, h, f["pre_w"], f["pre_b"], None, None, plan.pre[0].activation, False, backend)
        grads["pre_b"] = gb if f["pre_b"] is not None else None
        gx = gh.to(x.dtype)
    else:
        gx = ga.to(x.dtype)
    return backward_outputs(ctx, plan, gx, grad_out, _FOLDS, grads)


def recomputed_frozen_forward(plan: Any, x: Tensor, args: Sequence[Any], kwargs: dict,
                              backend: Optional[str]) -> Tensor:
    """The frozen block in training through :class:`RecomputedFrozenMBConv` (see the module docstring)."""
    step = BlockStep.of(plan, x, args, kwargs, backend)
    return RecomputedFrozenMBConv.apply(x, step, *_folds(plan))
