"""Networks the benchmark can build, by name.

* ``b0`` ... ``b7`` (or the full names in ``effnet_kernels.models.MODEL_NAMES``):
  :func:`effnet_kernels.models.efficientnet` at its native resolution.
* ``timm-b0``, ``torchvision-b0``, ``lukemelas-b0``: the B0 of timm, torchvision and
  efficientnet_pytorch, where importable (fused providers convert them with ``convert()``).
* ``tiny``: an efficientnet_pytorch B0 shrunk to 7 narrow blocks at 32x32, for CPU tests.

Weights are random (seeded). BatchNorm is *calibrated* (:func:`calibrate`): its affine
parameters are jittered lightly and its running statistics set from a forward pass of a
seeded ``randn`` batch like the benchmark's inputs, so the model's output depends on its
input and the correctness gate can fail (with random running statistics B0's logits for
two unrelated batches differ by ~2e-7 and a provider fed zeros would pass). Calibration
runs on the benchmark device, in fp32 with TF32 off, on :data:`CALIBRATION_BATCH` images.

:func:`register_model` adds a builder (tests use it for stand-ins).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["ModelUnavailable", "build_model", "register_model", "known_models", "default_models", "calibrate",
           "native_resolution", "CALIBRATION_BATCH"]

#: Images in the batch BatchNorm statistics are calibrated on (at the model's resolution).
CALIBRATION_BATCH = 8
_CALIBRATION_SEED_OFFSET = 7919  # the calibration batch is not one of the benchmark's input buffers


class ModelUnavailable(RuntimeError):
    """The model cannot be built here (its library is missing); the message says why."""


Builder = Callable[[], tuple[nn.Module, int]]
_BUILDERS: dict[str, Builder] = {}
_RESOLUTIONS: dict[str, int] = {}


def register_model(name: str, builder: Builder, resolution: Optional[int] = None) -> None:
    """Make ``build_model(name)`` call ``builder() -> (module, resolution)``.

    ``resolution``, when given, is the one the builder will return, so
    :func:`native_resolution` (used by ``--resume`` to skip finished models without
    building them) knows it without building the model.
    """
    _BUILDERS[name] = builder
    if resolution is None:
        _RESOLUTIONS.pop(name, None)
    else:
        _RESOLUTIONS[name] = int(resolution)


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


def native_resolution(name: str) -> Optional[int]:
    """The resolution :func:`build_model` will use for ``name``, if known without building it."""
    if name in _BUILDERS:
        return _RESOLUTIONS.get(name)
    full = _canonical_effnet(name)
    if full is None:
        return None
    from effnet_kernels import models

    return int(models.native_resolution(full))


def calibration_batch(resolution: int, device: torch.device | str, seed: int = 0,
                      batch: int = CALIBRATION_BATCH) -> torch.Tensor:
    """The seeded ``randn`` batch BatchNorm is calibrated on (NCHW fp32, on ``device``)."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed + _CALIBRATION_SEED_OFFSET)
    return torch.randn(batch, 3, resolution, resolution, generator=gen, device=device)


def calibrate(model: nn.Module, resolution: int, seed: int = 0, batch: int = CALIBRATION_BATCH) -> nn.Module:
    """Calibrate ``model``'s BatchNorm (:func:`effnet_kernels.testing.calibrate_batchnorm`) in place.

    The batch is :func:`calibration_batch` on the model's device; the forward runs in fp32
    with TF32 off. Returns ``model``.
    """
    from effnet_kernels.testing import calibrate_batchnorm

    from .precision import precision

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = calibration_batch(resolution, device, seed, batch)
    with precision("fp32", device):
        calibrate_batchnorm(model, x, seed=seed)
    return model


def build_model(
    name: str,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    resolution: Optional[int] = None,
    calibrated: bool = True,
) -> tuple[nn.Module, int]:
    """``(model in eval mode on device, native resolution)`` for the benchmark name ``name``.

    Weights are random (seeded by ``seed``). With ``calibrated`` (the default) BatchNorm is
    then calibrated on ``device`` (:func:`calibrate`) on a batch at ``resolution`` (default:
    the native one), so the output depends on the input. Raises ``ValueError`` for an
    unknown name and :class:`ModelUnavailable` when the model's library is not importable.
    """
    torch.manual_seed(seed)
    if name in _BUILDERS:
        model, native = _BUILDERS[name]()
    else:
        full = _canonical_effnet(name)
        if full is None:
            raise ValueError(f"model must be one of {known_models()}, got {name!r}")
        from effnet_kernels import models

        model = models.efficientnet(full)
        native = int(model.resolution)
    model = model.to(device).eval()
    if calibrated:
        calibrate(model, resolution or native, seed)
    return model, native


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


register_model("timm-b0", _timm_b0, 224)
register_model("torchvision-b0", _torchvision_b0, 224)
register_model("lukemelas-b0", _lukemelas_b0, 224)
register_model("tiny", _tiny, 32)
