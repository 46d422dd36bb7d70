"""Providers: ways of running the same eager model, each a function of (model, config).

A provider's ``prepare(model, device)`` gets a private deep copy of the eager model,
already on ``device`` in the job's memory format, and returns the callable module to
benchmark, or raises :class:`ProviderSkipped` with the reason it cannot run here.

* ``eager``: the model as is (cuDNN with ``cudnn.benchmark=True``, set by the runner).
* ``compile``: ``torch.compile`` default mode; ``compile-max-autotune``: mode
  ``max-autotune-no-cudagraphs`` (CUDA graphs are measured separately, for every provider).
* ``fused-triton`` / ``fused-cuda`` / ``fused-torch``: ``effnet_kernels.convert(model,
  backend=...)``. ``fused-torch`` runs the reference backend and exists for CPU tests.

:func:`register_provider` adds one (tests inject a deliberately wrong provider).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["Provider", "ProviderSkipped", "PROVIDERS", "DEFAULT_PROVIDERS", "register_provider", "get_provider"]


class ProviderSkipped(RuntimeError):
    """This provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    """A named way to run a model; ``prepare(model, device) -> callable module``."""

    name: str
    prepare: Callable[[nn.Module, torch.device], nn.Module]
    compiles: bool = False


PROVIDERS: dict[str, Provider] = {}

# eager in both layouts, everything else channels_last (the layout the fused kernels like)
DEFAULT_PROVIDERS = (
    "eager@nchw", "eager", "compile", "compile-max-autotune", "fused-triton", "fused-cuda",
)


def register_provider(provider: Provider) -> None:
    """Add or replace ``provider`` under its name."""
    PROVIDERS[provider.name] = provider


def get_provider(name: str) -> Provider:
    """The provider called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {name!r}")
    return PROVIDERS[name]


def _eager(model: nn.Module, device: torch.device) -> nn.Module:
    return model


def _compile(mode: str | None) -> Callable[[nn.Module, torch.device], nn.Module]:
    def prepare(model: nn.Module, device: torch.device) -> nn.Module:
        import torch._dynamo

        # every job compiles a fresh copy of the same classes: start clean so earlier
        # jobs' guards neither hit the recompile limit nor leak dynamic shapes in
        torch._dynamo.reset()
        return torch.compile(model, mode=mode, dynamic=False)

    return prepare


def _fused(backend: str) -> Callable[[nn.Module, torch.device], nn.Module]:
    def prepare(model: nn.Module, device: torch.device) -> nn.Module:
        import effnet_kernels

        status = effnet_kernels.available_backends().get(backend)
        if status is None or not status.available:
            reasons = "; ".join(status.reasons) if status is not None else "not registered"
            raise ProviderSkipped(f"backend {backend!r} unavailable: {reasons}")
        convert = getattr(effnet_kernels, "convert", None)
        if convert is None:
            raise ProviderSkipped("effnet_kernels.convert is not available in this checkout")
        return convert(model, backend=backend)

    return prepare


register_provider(Provider("eager", _eager))
register_provider(Provider("compile", _compile(None), compiles=True))
register_provider(Provider("compile-max-autotune", _compile("max-autotune-no-cudagraphs"), compiles=True))
for _backend in ("triton", "cuda", "torch"):
    register_provider(Provider(f"fused-{_backend}", _fused(_backend)))
