"""Module hooks that a fused op would skip.

A fused op computes what several modules compute without calling them, so a forward
(pre-)hook or a backward hook registered on one of them would never run: timm's
``features_only`` models with ``feature_location="expansion"`` collect their outputs through
such hooks on each block's expand conv, and ``torch.nn.utils.weight_norm`` recomputes a
conv's weight in a forward pre-hook. Where a module the op stands for has one, the modules
run as they are, their hooks with them. Global module hooks
(``register_module_forward_hook``: observers such as ``torch.utils.module_tracker``) see the
fused module itself and do not stop fusion.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

__all__ = ["hooks_reason", "submodules"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_reason(modules: Iterable[Optional[nn.Module]]) -> Optional[str]:
    """Why ``modules`` must run as modules, not as one fused op: the first one with a forward, forward
    pre-, or backward hook, by class; None when none has one. Not recursive (a fused block checks its
    flat list of submodules on every forward: a few attribute reads each)."""
    for m in modules:
        if m is None:
            continue
        for attr in _HOOK_DICTS:
            if getattr(m, attr, None):
                kind = attr.strip("_").replace("_", " ")[: -len("s")]
                return f"{type(m).__name__} has a {kind} (the fused op would not call it)"
    return None


def submodules(modules: Iterable[Optional[nn.Module]]) -> Iterable[nn.Module]:
    """Every module of ``modules`` and below (None skipped)."""
    for module in modules:
        if isinstance(module, nn.Module):
            yield from module.modules()
