"""Providers: ways of running the same eager model, each a function of (model, config).

A provider's ``prepare(model, device)`` gets a private deep copy of the eager model,
already on ``device`` in the job's memory format, and returns the callable module to
benchmark, or raises :class:`ProviderSkipped` with the reason it cannot run here.
Providers with ``needs_example`` get ``prepare(model, device, example)``: one input image
in the job's layout (``eager-folded`` traces the model on it).

* ``eager``: the model as is (cuDNN with ``cudnn.benchmark=True``, set by the runner).
* ``eager-folded``: eager with every BatchNorm folded into the convolution that feeds it
  (conv + BN -> one conv with a bias; :func:`fold_batchnorms`), so what BN folding alone
  gains is reported apart from what the fused kernels gain. Inference only.
* ``compile``: ``torch.compile`` default mode; ``compile-max-autotune``: mode
  ``max-autotune-no-cudagraphs`` (CUDA graphs are measured separately, for every provider);
  ``compile-freeze``: default mode with Inductor's ``freezing`` (weights become constants,
  conv + BN folded; passed as ``options={"freezing": True}``, so the setting stays with that
  compiled model and never leaks into other providers). Inference only.
* ``fused-triton`` / ``fused-cuda`` / ``fused-torch``: ``effnet_kernels.convert(model,
  backend=...)``. ``fused-torch`` runs the reference backend and exists for CPU tests.
* ``fused-triton+compile`` / ``fused-cuda+compile`` / ``fused-torch+compile``: ``convert()``
  then ``torch.compile`` (default mode), what a user of both does.

Compiled providers (``compiles=True``) are ``torch.compile`` wrappers: the module they
wrap is ``model._orig_mod`` (:func:`unwrap`).

:func:`register_provider` adds one (tests inject a deliberately wrong provider).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["Provider", "ProviderSkipped", "PROVIDERS", "DEFAULT_PROVIDERS", "register_provider", "get_provider",
           "fold_batchnorms", "unwrap"]


class ProviderSkipped(RuntimeError):
    """This provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    """A named way to run a model; ``prepare(model, device[, example]) -> callable module``.

    ``compiles``: it compiles (slow first call; ``--skip-compile`` drops it).
    ``needs_example``: ``prepare`` also gets one example input (batch 1, the job's layout).
    ``inference_only``: training steps with it make no sense (they get ``skipped`` rows).
    """

    name: str
    prepare: Callable[..., nn.Module]
    compiles: bool = False
    needs_example: bool = False
    inference_only: bool = False


PROVIDERS: dict[str, Provider] = {}

# eager in both layouts, everything else channels_last (the layout the fused kernels like)
DEFAULT_PROVIDERS = (
    "eager@nchw", "eager", "eager-folded", "compile", "compile-freeze", "compile-max-autotune",
    "fused-triton", "fused-cuda", "fused-triton+compile", "fused-cuda+compile",
)

# backend -> backend the fused providers use instead (tests map triton/cuda to torch on the CPU)
BACKEND_SUBSTITUTES: dict[str, str] = {}


def register_provider(provider: Provider) -> None:
    """Add or replace ``provider`` under its name."""
    PROVIDERS[provider.name] = provider


def get_provider(name: str) -> Provider:
    """The provider called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {name!r}")
    return PROVIDERS[name]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (``_orig_mod``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


# ------------------------------------------------------------------ BatchNorm folding
class _UseTracker(TorchFunctionMode):
    """Sees every torch function call of a forward, to find conv outputs used by more than their BatchNorm."""

    def __init__(self, on_call: Callable[[tuple, dict, Any], None]):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.on_call(args, kwargs, out)
        return out


def _tensors_in(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors_in(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)


def _foldable_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` pairs where the BatchNorm's only input is the conv's output.

    One eval forward of ``example`` with hooks: a ``Conv2d`` (any subclass) whose output
    goes straight into an eval-mode ``BatchNorm2d`` with running statistics, each called
    exactly once, and whose output no other operation reads (a torch-function mode watches
    every call outside that BatchNorm).
    """
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, nn.BatchNorm2d) and not m.training and m.running_mean is not None
           and m.running_var is not None}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[weakref.ref, str]] = {}  # id(conv output) -> (tensor, conv name)
    pair_of_bn: dict[str, str] = {}
    shared: set[str] = set()
    active: list[tuple[str, Optional[torch.Tensor]]] = []  # BatchNorms running now, with their input

    def conv_of(t: torch.Tensor) -> Optional[str]:
        entry = produced.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def count(name):
        def pre(_m, _args):
            calls[name] = calls.get(name, 0) + 1
        return pre

    def conv_done(name):
        def post(_m, _args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (weakref.ref(out), name)
        return post

    def bn_pre(name):
        def pre(_m, args):
            calls[name] = calls.get(name, 0) + 1
            x = args[0] if args else None
            conv = conv_of(x) if isinstance(x, torch.Tensor) else None
            if conv is not None:
                pair_of_bn[name] = conv
            active.append((name, x if conv is not None else None))
        return pre

    def bn_post(_m, _args, _out):
        active.pop()

    def on_call(args, kwargs, out):
        if not any(True for _ in _tensors_in(out)):
            return  # metadata (dim(), shape, dtype): not a use of the data
        inside = active[-1][1] if active else None
        for t in _tensors_in((args, kwargs)):
            conv = conv_of(t)
            if conv is not None and t is not inside:
                shared.add(conv)

    handles = []
    try:
        for name, m in convs.items():
            handles.append(m.register_forward_pre_hook(count(name)))
            handles.append(m.register_forward_hook(conv_done(name)))
        for name, m in bns.items():
            handles.append(m.register_forward_pre_hook(bn_pre(name)))
            handles.append(m.register_forward_hook(bn_post))
        with torch.no_grad(), _UseTracker(on_call):
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn_name, conv_name in pair_of_bn.items():
        conv, bn = convs[conv_name], bns[bn_name]
        if calls.get(bn_name) != 1 or calls.get(conv_name) != 1 or conv_name in shared:
            continue
        if conv.out_channels != bn.num_features or conv.weight is None:
            continue
        if _replacement(bn) is None:
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _replacement(bn: nn.BatchNorm2d) -> Optional[nn.Module]:
    """What stands in for a folded BatchNorm: ``Identity``; for timm's ``BatchNormAct2d``
    (BN, then ``drop``, then ``act``) its dropout and activation; None when unknown."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(act, nn.Module):
        # timm: forward = act(drop(batch_norm(x))); older timm versions have no drop
        return nn.Sequential(drop, act) if isinstance(drop, nn.Module) else nn.Sequential(act)
    return None


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` (eval): weight and bias scaled, computed in fp64."""
    with torch.no_grad():
        w = conv.weight
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))  # keeps w's layout
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def fold_batchnorms(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm2d into the Conv2d that feeds it, in place; returns how many were folded.

    Pairs are found by tracing one forward of ``example`` in eval mode
    (:func:`_foldable_pairs`), so it works on any module tree whose convs and BatchNorms
    are modules (effnet_kernels.models, efficientnet_pytorch, timm, torchvision): the conv's
    weight and bias absorb the BatchNorm's eval transform and the BatchNorm is replaced by
    ``nn.Identity`` (timm's ``BatchNormAct2d`` by its dropout + activation). A BatchNorm
    whose input is not a conv output read by nothing else is left as it is.
    """
    was_training = model.training
    model.eval()
    try:
        pairs = _foldable_pairs(model, example)
    finally:
        model.train(was_training)
    by_id = {}
    for name, m in model.named_modules(remove_duplicate=False):
        by_id.setdefault(id(m), []).append(name)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        _fold_into(conv, bn)
        replacement = _replacement(bn)
        for alias in by_id[id(bn)]:
            _set_module(model, alias, replacement)
    return len(pairs)


# ------------------------------------------------------------------ providers
def _eager(model: nn.Module, device: torch.device) -> nn.Module:
    return model


def _eager_folded(model: nn.Module, device: torch.device, example: torch.Tensor) -> nn.Module:
    n = fold_batchnorms(model, example)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    object.__setattr__(model, "_bench_note", f"{n} BatchNorms folded" + (f", {left} left" if left else ""))
    return model


def _compiled(model: nn.Module, mode: Optional[str], options: Optional[dict] = None) -> nn.Module:
    import torch._dynamo

    # every job compiles a fresh copy of the same classes: start clean so earlier
    # jobs' guards neither hit the recompile limit nor leak dynamic shapes in
    torch._dynamo.reset()
    return torch.compile(model, mode=mode, dynamic=False, options=options)


def _compile(mode: Optional[str], options: Optional[dict] = None) -> Callable[[nn.Module, torch.device], nn.Module]:
    def prepare(model: nn.Module, device: torch.device) -> nn.Module:
        return _compiled(model, mode, options)

    return prepare


def _fused(backend: str, compiled: bool = False) -> Callable[[nn.Module, torch.device], nn.Module]:
    def prepare(model: nn.Module, device: torch.device) -> nn.Module:
        import effnet_kernels

        use = BACKEND_SUBSTITUTES.get(backend, backend)
        status = effnet_kernels.available_backends().get(use)
        if status is None or not status.available:
            reasons = "; ".join(status.reasons) if status is not None else "not registered"
            raise ProviderSkipped(f"backend {use!r} unavailable: {reasons}")
        convert = getattr(effnet_kernels, "convert", None)
        if convert is None:
            raise ProviderSkipped("effnet_kernels.convert is not available in this checkout")
        model = convert(model, backend=use)
        return _compiled(model, None) if compiled else model

    return prepare


register_provider(Provider("eager", _eager))
register_provider(Provider("eager-folded", _eager_folded, needs_example=True, inference_only=True))
register_provider(Provider("compile", _compile(None), compiles=True))
register_provider(Provider("compile-max-autotune", _compile("max-autotune-no-cudagraphs"), compiles=True))
register_provider(Provider("compile-freeze", _compile(None, {"freezing": True}), compiles=True, inference_only=True))
for _backend in ("triton", "cuda", "torch"):
    register_provider(Provider(f"fused-{_backend}", _fused(_backend)))
    register_provider(Provider(f"fused-{_backend}+compile", _fused(_backend, compiled=True), compiles=True))
