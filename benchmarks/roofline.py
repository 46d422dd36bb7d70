"""Minimum activation bytes and FLOPs per image, measured from the model itself.

Forward hooks on the model's *atomic* modules (modules without children, plus every
convolution, linear and normalisation layer even when it has children, such as
efficientnet_pytorch's ``Conv2dStaticSamePadding`` with its padding child) sum, per
call, the bytes of the module's tensor inputs and outputs: the traffic of a layer-by-
layer execution in which every layer reads its inputs once and writes its outputs once.
Parameters are not counted (they are small next to the activations at batch > 1).
Work done in ``forward`` code outside modules (residual adds, the SE multiply in some
implementations) is not seen by hooks, so the count is a lower bound of eager traffic.

FLOPs count convolutions and linear layers (2 per multiply-add).

The model runs once on the ``meta`` device by default, so B7 at 600x600 costs no compute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["Roofline", "measure", "atomic_modules", "bound_img_per_s", "fraction_of_bound", "module_flops"]

_ATOMIC_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Roofline:
    """Per-image minimum activation bytes (at ``element_size`` bytes per element) and FLOPs."""

    bytes_per_image: float
    flops_per_image: float

    @property
    def mb_per_image(self) -> float:
        return self.bytes_per_image / 1e6

    @property
    def gflops_per_image(self) -> float:
        return self.flops_per_image / 1e9


def atomic_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules whose calls are counted: leaves and conv/linear/norm layers, outermost first."""

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        children = list(module.named_children())
        if not children or isinstance(module, _ATOMIC_TYPES):
            yield prefix, module
            return
        for name, child in children:
            yield from visit(f"{prefix}.{name}" if prefix else name, child)

    yield from visit("", model)


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def module_flops(module: nn.Module, output: torch.Tensor) -> int:
    """FLOPs of one call of a conv or linear ``module`` that produced ``output`` (else 0)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return 2 * output.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 0


def measure(
    model: nn.Module,
    resolution: int,
    element_size: int = 2,
    batch: int = 2,
    device: torch.device | str = "meta",
) -> Roofline:
    """Count per-image activation bytes and FLOPs of one inference forward of ``model``.

    ``model`` is deep-copied (to ``device``, eval mode) and left untouched. Element
    counts are converted to bytes with ``element_size`` (2 for fp16/bf16, 4 for fp32).
    Falls back to the CPU if the model cannot run on ``meta``.
    """
    if resolution < 1 or batch < 1 or element_size < 1:
        raise ValueError(
            f"resolution, batch and element_size must be >= 1, got {resolution}, {batch}, {element_size}"
        )
    try:
        return _measure(model, resolution, element_size, batch, torch.device(device))
    except (NotImplementedError, RuntimeError):
        if torch.device(device).type == "cpu":
            raise
        return _measure(model, resolution, element_size, batch, torch.device("cpu"))


def _measure(model: nn.Module, resolution: int, element_size: int, batch: int, device: torch.device) -> Roofline:
    m = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    totals = {"elems": 0, "flops": 0}

    def hook(module, inputs, output):
        totals["elems"] += sum(t.numel() for t in _tensors(inputs)) + sum(t.numel() for t in _tensors(output))
        if isinstance(output, torch.Tensor):
            totals["flops"] += module_flops(module, output)

    handles = [mod.register_forward_hook(hook) for _, mod in atomic_modules(m)]
    try:
        x = torch.empty(batch, 3, resolution, resolution, device=device)
        if device.type != "meta":
            x.normal_()
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    return Roofline(totals["elems"] * element_size / batch, totals["flops"] / batch)


def bound_img_per_s(bytes_per_image: float, copy_gb_per_s: float) -> float:
    """Images per second if only the minimum activation bytes moved, at the copy bandwidth."""
    if bytes_per_image <= 0:
        raise ValueError(f"bytes_per_image must be > 0, got {bytes_per_image}")
    return copy_gb_per_s * 1e9 / bytes_per_image


def fraction_of_bound(img_per_s: float, bound: float) -> float:
    """Achieved images/s over the bandwidth bound (1.0 = at the bound)."""
    return img_per_s / bound if bound > 0 else float("nan")
