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

A block with some BatchNorms frozen and others training trains through its eager forward
(:func:`batchnorm_blocker` says why).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ._norms import bn_uses_batch_stats, bn_uses_running_stats, frozen_how
from ._train_block import drop_mask_for
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
    """The training forward of a block whose BatchNorms are all frozen (see the module docstring)."""
    def mask(y: Tensor) -> Optional[Tensor]:
        # the residual branch has x's shape and the projection's output dtype (y's)
        return drop_mask_for(plan, tuple(x.shape), y.dtype, x.device, args, kwargs)

    return folded_forward(plan, x, backend, drop_mask=mask)
