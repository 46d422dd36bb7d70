"""Networks the benchmark can build, by name.

* ``b0`` ... ``b7`` (or the full names in ``effnet_kernels.models.MODEL_NAMES``):
  :func:`effnet_kernels.models.efficientnet` at its native resolution.
* ``timm-b0``, ``torchvision-b0``, ``lukemelas-b0``: the B0 of timm, torchvision and
  efficientnet_pytorch, where importable (fused providers convert them with ``convert()``).
* ``tiny``: an efficientnet_pytorch B0 shrunk to 7 narrow blocks at 32x32, for CPU tests.

:func:`register_model` adds a builder (tests use it for stand-ins).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["ModelUnavailable", "build_model", "register_model", "known_models", "default_models", "randomize_norm_stats"]


class ModelUnavailable(RuntimeError):
    """The model cannot be built here (its library is missing); the message says why."""


Builder = Callable[[], tuple[nn.Module, int]]
_BUILDERS: dict[str, Builder] = {}


def register_model(name: str, builder: Builder) -> None:
    """Make ``build_model(name)`` call ``builder() -> (module, resolution)``."""
    _BUILDERS[name] = builder


def _effnet_names() -> list[str]:
    try:
        from effnet_kernels import models
    except ImportError:
        return []
    return list(getattr(models, "MODEL_NAMES", []))


def default_models() -> list[str]:
    """B0..B7 as named by ``effnet_kernels.models.MODEL_NAMES`` (empty if that is missing)."""
    return _effnet_names()


def known_models() -> list[str]:
    """Every name :func:`build_model` accepts here."""
    return _effnet_names() + [n for n in _BUILDERS if n not in _effnet_names()]


def _canonical_effnet(name: str) -> str | None:
    names = _effnet_names()
    if name in names:
        return name
    for full in names:  # "b0" -> "efficientnet_b0" / "efficientnet-b0"
        if full.lower().replace("-", "_").endswith("_" + name.lower()):
            return full
    return None


def build_model(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """``(model in eval mode on the CPU, native resolution)`` for the benchmark name ``name``.

    Weights are random (seeded by ``seed``), with BatchNorm statistics randomised too so
    folding them is not a no-op. Raises ``ValueError`` for an unknown name and
    :class:`ModelUnavailable` when the model's library is not importable.
    """
    torch.manual_seed(seed)
    if name in _BUILDERS:
        model, resolution = _BUILDERS[name]()
    else:
        full = _canonical_effnet(name)
        if full is None:
            raise ValueError(f"model must be one of {known_models()}, got {name!r}")
        from effnet_kernels import models

        model = models.efficientnet(full)
        resolution = int(model.resolution)
    randomize_norm_stats(model, seed)
    return model.eval(), resolution


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm random affine parameters and running statistics (in place)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _timm_b0() -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as exc:
        raise ModelUnavailable(f"timm is not importable: {exc}") from None
    return timm.create_model("efficientnet_b0", pretrained=False), 224


def _torchvision_b0() -> tuple[nn.Module, int]:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelUnavailable(f"torchvision is not importable: {exc}") from None
    return torchvision.models.efficientnet_b0(weights=None), 224


def _lukemelas(name: str, **override) -> nn.Module:
    try:
        from efficientnet_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelUnavailable(f"efficientnet_pytorch is not importable: {exc}") from None
    return EfficientNet.from_name(name, **override)


def _lukemelas_b0() -> tuple[nn.Module, int]:
    return _lukemelas("efficientnet-b0"), 224


def _tiny() -> tuple[nn.Module, int]:
    model = _lukemelas(
        "efficientnet-b0", width_coefficient=0.25, depth_coefficient=0.1, image_size=32, num_classes=10,
        dropout_rate=0.0, drop_connect_rate=0.0,
    )
    return model, 32


register_model("timm-b0", _timm_b0)
register_model("torchvision-b0", _torchvision_b0)
register_model("lukemelas-b0", _lukemelas_b0)
register_model("tiny", _tiny)
