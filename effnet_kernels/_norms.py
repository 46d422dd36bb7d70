"""What a BatchNorm-like module computes with: the one place the fused modules ask.

Two kinds of module normalise per channel with an affine map that :func:`effnet_kernels.nn.fold_batchnorm`
folds (``scale = weight * rsqrt(running_var + eps)``, ``shift = bias - running_mean * scale``):

* ``nn.BatchNorm2d`` (and subclasses such as timm's ``BatchNormAct2d``) and ``nn.SyncBatchNorm``:
  with their running statistics in eval mode, with the batch's in training;
* *frozen BatchNorm modules*, which fine-tuning recipes swap in for them: torchvision's
  ``torchvision.ops.misc.FrozenBatchNorm2d`` (detection backbones' ``norm_layer``, and what timm's
  ``freeze_batch_norm_2d`` puts in place of a ``BatchNorm2d`` / ``SyncBatchNorm``), timm's own
  ``FrozenBatchNorm2d`` where a timm version carries one, and timm's ``FrozenBatchNormAct2d`` (BN,
  then its ``drop`` and ``act``, for a ``BatchNormAct2d``). Their ``weight``, ``bias``,
  ``running_mean`` and ``running_var`` are buffers (no Parameters, no ``num_batches_tracked``) and
  they always normalise with the running statistics, in train and eval mode alike.

Frozen modules are recognised by class name and library (the class, or a base whose forward it
keeps, named as above and defined in a module of ``torchvision`` or ``timm``) and by their
buffers, so the package never imports either library.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# (library, class name) of the frozen BatchNorm modules -> True where the class applies its own
# ``drop`` and ``act`` after normalising (timm's FrozenBatchNormAct2d)
FROZEN_BATCHNORMS: dict[tuple[str, str], bool] = {
    ("torchvision", "FrozenBatchNorm2d"): False,
    ("timm", "FrozenBatchNorm2d"): False,
    ("timm", "FrozenBatchNormAct2d"): True,
}
_STATE = ("weight", "bias", "running_mean", "running_var")


def _frozen_class(module: object) -> Optional[tuple[str, str]]:
    """``(library, name)`` of the frozen BatchNorm class whose forward ``module`` runs, or None."""
    forward = getattr(type(module), "forward", None)
    for cls in type(module).__mro__:
        key = (cls.__module__.split(".")[0], cls.__name__)
        if key in FROZEN_BATCHNORMS:
            return key if cls.__dict__.get("forward", forward) is forward else None
    return None


def is_frozen_batchnorm(module: object) -> bool:
    """True for a frozen BatchNorm module (see the module docstring) with its four tensors and an ``eps``."""
    return (isinstance(module, nn.Module) and _frozen_class(module) is not None
            and all(isinstance(getattr(module, n, None), torch.Tensor) for n in _STATE)
            and isinstance(getattr(module, "eps", None), (int, float)))


def frozen_applies_activation(module: object) -> bool:
    """True for a frozen BatchNorm module that applies its own ``drop`` and ``act`` (``FrozenBatchNormAct2d``)."""
    key = _frozen_class(module) if is_frozen_batchnorm(module) else None
    return key is not None and FROZEN_BATCHNORMS[key]


_PLAIN_FORWARDS = {nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, nn.modules.batchnorm._BatchNorm.forward}


def normalises_only(bn: object) -> bool:
    """True when ``bn``'s forward is the normalisation alone: ``nn.BatchNorm2d``'s, ``nn.SyncBatchNorm``'s, or a
    frozen BatchNorm module without an activation of its own (whatever children it carries:
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves a timm ``BatchNormAct2d``'s ``act`` on a plain
    ``SyncBatchNorm`` that never calls it)."""
    if is_frozen_batchnorm(bn):
        return not frozen_applies_activation(bn)
    return isinstance(bn, nn.Module) and type(bn).forward in _PLAIN_FORWARDS


def trains_like_batchnorm(bn: object) -> bool:
    """A BatchNorm whose training forward is ``_BatchNorm``'s or ``nn.SyncBatchNorm``'s (see
    :mod:`effnet_kernels._sync_bn`), or timm's ``BatchNormAct2d``'s (BN, then its act)."""
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return False
    if type(bn).forward in _PLAIN_FORWARDS:
        return True
    return any(c.__name__ == "BatchNormAct2d" and c.__module__.startswith("timm") for c in type(bn).__mro__)


def is_batchnorm(bn: object) -> bool:
    """``nn.BatchNorm2d`` (or a subclass, e.g. timm's ``BatchNormAct2d``), ``nn.SyncBatchNorm`` or a frozen
    BatchNorm module: with running statistics, all are the same per-channel affine map."""
    return isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or is_frozen_batchnorm(bn)


def num_features(bn: nn.Module) -> int:
    """The channels ``bn`` normalises (torchvision's ``FrozenBatchNorm2d`` has no ``num_features``: its weight's length)."""
    n = getattr(bn, "num_features", None)
    return int(n) if isinstance(n, int) else int(bn.weight.shape[0])


def bn_uses_running_stats(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with its running statistics: a frozen BatchNorm module always, a
    BatchNorm in eval mode with its statistics tracked."""
    if is_frozen_batchnorm(bn):
        return True
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def bn_uses_batch_stats(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with the batch's statistics: a BatchNorm in training (never a frozen module)."""
    return bool(bn.training) and not is_frozen_batchnorm(bn)


def frozen_how(bn: nn.Module) -> str:
    """How ``bn`` came to use its running statistics, for reasons: ``"in eval mode"`` or ``"a FrozenBatchNorm2d"``."""
    return f"a {type(bn).__name__}" if is_frozen_batchnorm(bn) else "in eval mode"
