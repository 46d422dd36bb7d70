"""``convert(model)``: swap MBConv blocks for fused ones in place; ``revert(model)``: undo it.

The replacement (:class:`effnet_kernels.nn.MBConv`) adopts the original block's
children, Parameters and buffers (no copies) under the same names, so ``state_dict()``
keys, optimizer state and outputs stay the same. Blocks an adapter cannot fuse are left
alone and the report says why.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .backends import check_backend_name
from .integrations._common import NotFusable
from .nn import MBConv
from .sibling_stems import FusedMethod, MethodSpec, remove_fused_methods, set_fused_method, static_reason
from .stem_head import FusedConvBNAct, container_types, fusable_reason

logger = logging.getLogger("effnet_kernels")

_ADAPTERS = ("native", "efficientnet_pytorch", "torchvision", "timm", "huggingface")
_REPORT_ATTR = "_effnet_conversion_report"

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConversionReport:
    """What :func:`convert` did: blocks swapped, left alone (with the reason), already fused."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: conv + BN + activation containers outside the blocks (stems, heads) fused into one op
    fused_convs: list[str] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)
    filtered_out: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{len(self.swapped)} blocks fused"]
        if self.fused_convs:
            parts.append(f"{len(self.fused_convs)} stem/head convs fused ({', '.join(self.fused_convs)})")
        if self.already_fused:
            parts.append(f"{len(self.already_fused)} already fused")
        if self.filtered_out:
            parts.append(f"{len(self.filtered_out)} excluded by filter_fn")
        if self.skipped:
            why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
            parts.append(f"{len(self.skipped)} left unfused ({why})")
        return "effnet_kernels.convert: " + ", ".join(parts)


def _adapters():
    for name in _ADAPTERS:
        yield importlib.import_module(f".integrations.{name}", __package__)


def _method_specs(adapters) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for adapter in adapters:
        try:
            specs.extend(getattr(adapter, "method_specs", tuple)())
        except Exception as exc:  # as in _match
            logger.debug("effnet_kernels: adapter %s cannot list its method specs: %r", adapter.__name__, exc)
    return specs


def _match(module: nn.Module, adapters) -> Optional[Callable]:
    for adapter in adapters:
        try:
            types = adapter.block_types()
        except Exception as exc:  # a library in an unexpected state must not break convert()
            logger.debug("effnet_kernels: adapter %s cannot list its block types: %r", adapter.__name__, exc)
            continue
        if types and type(module) in types:
            return adapter.plan
    return None


def convert(
    model: nn.Module,
    *,
    backend: Optional[str] = "auto",
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Swap every fusable MBConv block of ``model`` for a fused :class:`effnet_kernels.MBConv`, in place,
    and every conv + BatchNorm + activation container outside the blocks (the stem and head of
    :mod:`effnet_kernels.models` and torchvision's models, transformers' stem) for a
    :class:`~effnet_kernels.stem_head.FusedConvBNAct`. timm's and efficientnet_pytorch's stems and
    heads and transformers' head, whose conv, norm and activation are the model's own attributes,
    run as one op each through a :class:`~effnet_kernels.sibling_stems.FusedMethod` set on the
    model in place of the method that calls them (``forward_features``, ``extract_features``, the
    encoder's ``forward``); their modules stay.

    Recognised blocks: :class:`effnet_kernels.blocks.MBConvBlock`, efficientnet_pytorch
    ``MBConvBlock``, torchvision ``MBConv`` / ``FusedMBConv`` / MobileNetV2 and V3
    ``InvertedResidual`` / MNASNet ``_InvertedResidual``, timm ``InvertedResidual`` /
    ``DepthwiseSeparableConv`` (/ ``EdgeResidual``, ``CondConvResidual``) and transformers
    ``EfficientNetBlock``. A recognised block that cannot be fused (``FusedMBConv``, an
    activation the kernels do not compute, an unexpected layout) is left alone and the
    report says why; ``convert`` never raises for a block. Converting twice changes nothing.

    Args:
        model: the model (or a single block).
        backend: ``"auto"`` (defer to :func:`effnet_kernels.use_backend`, then
            ``EFFNET_KERNELS_BACKEND``, then the fastest available), ``"torch"``,
            ``"triton"`` or ``"cuda"``.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; blocks and containers it rejects
            stay; for a stem or head of model attributes it is asked with the conv and its name.

    Returns:
        ``model`` itself (converted in place), or the replacement when ``model`` is
        itself a block. The :class:`ConversionReport` is logged at INFO and available
        from :func:`conversion_report`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        check_backend_name(backend)
    adapters = list(_adapters())
    report = ConversionReport()
    containers = container_types()
    specs = _method_specs(adapters)

    def fuse_chains(module: nn.Module, name: str) -> None:
        for spec in specs:
            if not spec.matches(module):
                continue
            labels = {c.name: f"{name}.{c.conv}" if name else c.conv for c in spec.chains}
            if isinstance(module.__dict__.get(spec.method), FusedMethod):
                report.already_fused.extend(labels.values())
                return
            excluded, fusable = set(), []
            for chain in spec.chains:
                reason = static_reason(spec, chain, module)
                if filter_fn is not None and not filter_fn(getattr(module, chain.conv), labels[chain.name]):
                    report.filtered_out.append(labels[chain.name])
                    excluded.add(chain.name)
                elif reason is not None:
                    report.skipped[labels[chain.name]] = reason
                else:
                    fusable.append(labels[chain.name])
            if fusable:
                set_fused_method(module, FusedMethod(module, spec, backend, frozenset(excluded)))
                report.fused_convs.extend(fusable)
            return

    def visit(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, (MBConv, FusedConvBNAct)):
            report.already_fused.append(name or "<model>")
            return module
        if type(module) in containers and fusable_reason(module) is None:
            if filter_fn is not None and not filter_fn(module, name):
                report.filtered_out.append(name or "<model>")
                return module
            report.fused_convs.append(name or "<model>")
            return FusedConvBNAct.from_container(module, backend)
        planner = _match(module, adapters)
        if planner is not None:
            if filter_fn is not None and not filter_fn(module, name):
                report.filtered_out.append(name or "<model>")
                return module
            try:
                fused = MBConv.from_plan(planner(module), backend)
            except NotFusable as exc:
                report.skipped[name or "<model>"] = str(exc)
                return module
            except Exception as exc:  # an unexpected layout: leave the block alone, never raise for it
                report.skipped[name or "<model>"] = f"adapter error: {type(exc).__name__}: {exc}"
                return module
            report.swapped.append(name or "<model>")
            return fused
        fuse_chains(module, name)
        for child_name, child in list(module.named_children()):
            new = visit(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    result = visit(model, "")
    object.__setattr__(result, _REPORT_ATTR, report)
    logger.info("%s", report)
    return result


def conversion_report(model: nn.Module) -> Optional[ConversionReport]:
    """The report of the last :func:`convert` call on ``model`` (None if never converted)."""
    return getattr(model, _REPORT_ATTR, None)


def revert(model: nn.Module) -> nn.Module:
    """Give back the original blocks (their classes and modules) in place of fused ones, and the
    library's own methods in place of :class:`~effnet_kernels.sibling_stems.FusedMethod` ones.

    For export (ONNX, TorchScript) or to compare. The Parameters and buffers are the
    same objects throughout. Returns ``model`` (or the original block when ``model``
    itself is a fused block).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def unwrap(fused: nn.Module) -> nn.Module:
        original = fused.plan.original if isinstance(fused, MBConv) else fused.original
        for child_name, child in fused.named_children():
            setattr(original, child_name, child)
        original.train(fused.training)
        return original

    if isinstance(model, (MBConv, FusedConvBNAct)):
        return unwrap(model)
    for parent in list(model.modules()):
        remove_fused_methods(parent)
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (MBConv, FusedConvBNAct)):
                setattr(parent, child_name, unwrap(child))
    return model
