"""Stems and heads whose conv, BatchNorm and activation are attributes of the model, as one op each.

timm's ``EfficientNet`` calls ``self.conv_stem`` then ``self.bn1`` (a ``BatchNormAct2d``: BN and its
activation) in ``forward_features``, and ``self.conv_head`` then ``self.bn2`` after the blocks;
efficientnet_pytorch's ``extract_features`` calls ``self._swish(self._bn0(self._conv_stem(x)))``;
transformers' ``EfficientNetEncoder.forward`` ends with ``top_conv``, ``top_bn``, ``top_activation``.
No module holds such a chain, so none can be swapped for a fused one without changing the
``state_dict`` keys or the modules the user holds. :func:`effnet_kernels.convert` sets instead, on
the model instance, an attribute named like the method: a :class:`FusedMethod` that runs the
library's method body (a copy the adapter keeps, checked against the library's own function:
the same function on the model's class, the same names in its code) with each chain as one op
where it can (:func:`effnet_kernels.stem_head.run_fused`). So:

* every module stays where it was, the same object: keys, Parameters, hooks and direct calls
  (``model.conv_stem(x)``) are unchanged;
* each chain's modules are read from the model at call time: a replaced one is honoured, and a
  chain that no longer fits (or trains with batch statistics, or gets float64) runs its modules
  in sequence as the library does;
* :func:`effnet_kernels.revert` deletes the attribute; ``copy.deepcopy`` and pickle keep it;
* ``nn.DataParallel``'s replicas (shallow copies of each module) get their own, bound to the
  replica (:class:`ReplicaBinding`), so each device runs its replica's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._hooks import hooks_reason, submodules
from ._norms import normalises_only
from .integrations._common import NotFusable, activation_kind, conv_padding, is_plain_conv, loaded_types
from .nn import KERNEL_DTYPES, _refuse_kernel_backend, pinned_backend
from .stem_head import ConvBNActParts, parts_reason, run_fused, run_reason

Tensor = torch.Tensor
PartsResult = tuple[Optional[ConvBNActParts], Optional[str]]

__all__ = ["Chain", "FusedMethod", "MethodSpec", "ReplicaBinding", "fused_methods", "make_parts", "module_chain_parts",
           "remove_fused_methods", "set_fused_method", "static_reason"]


@dataclass(frozen=True)
class Chain:
    """A conv, its norm and (``act``, when the norm does not apply it) its activation, by attribute name
    on the model; ``name`` is the handle the method body runs it by (``"stem"``, ``"head"``)."""

    name: str
    conv: str
    norm: str
    act: Optional[str] = None

    def modules(self, owner: nn.Module) -> tuple[Any, Any, Any]:
        return (getattr(owner, self.conv), getattr(owner, self.norm),
                getattr(owner, self.act) if self.act is not None else None)

    def run_unfused(self, owner: nn.Module, x: Tensor) -> Tensor:
        """The modules in sequence, as the library's method calls them."""
        conv, norm, act = self.modules(owner)
        x = norm(conv(x))
        return act(x) if act is not None else x


def make_parts(conv: Any, bn: Any, resolve: Callable[[], tuple[Optional[str], Any]]) -> PartsResult:
    """:class:`ConvBNActParts` of ``conv`` and ``bn``, or why not: ``resolve()`` gives ``(activation kind,
    padding)`` as the library computes them (raising :class:`~effnet_kernels.integrations._common.NotFusable`
    where it cannot say)."""
    try:
        activation, padding = resolve()
    except NotFusable as exc:
        return None, str(exc)
    reason = parts_reason(conv, bn, activation, padding)
    return (None, reason) if reason is not None else (ConvBNActParts(conv, bn, activation, padding), None)  # type: ignore[arg-type]


def module_chain_parts(chain: Chain, conv: Any, norm: Any, act: Any, *,
                       conv_ok: Callable[[Any], bool] = is_plain_conv,
                       padding: Callable[[Any], Any] = conv_padding) -> PartsResult:
    """:func:`make_parts` of a chain of modules: a conv ``conv_ok`` accepts (by default a plain
    ``nn.Conv2d``), padded as ``padding(conv)`` says, a BatchNorm that only normalises and an
    activation module (``act``) of a kind the kernels compute."""

    def resolve() -> tuple[Optional[str], Any]:
        if not conv_ok(conv):
            raise NotFusable(f"{chain.name} conv {type(conv).__name__} has a forward of its own (unknown padding)")
        if not normalises_only(norm):
            raise NotFusable(f"{chain.name} norm {type(norm).__name__} is not a BatchNorm2d")
        return activation_kind(act), padding(conv)

    return make_parts(conv, norm, resolve)


@dataclass(frozen=True)
class MethodSpec:
    """A library model's method that runs sibling chains, and the adapter's copy of its body.

    ``body(model, run_chain, *args, **kwargs)`` computes what the library's function does, with
    ``run_chain(name, x)`` in place of each chain's calls; ``names`` are that function's
    ``__code__.co_names`` (a library version whose method differs is left alone).
    ``parts(chain, conv, norm, act)`` resolves a chain's modules as the library computes them."""

    library: str
    module: str
    cls: str
    method: str
    names: tuple[str, ...]
    chains: tuple[Chain, ...]
    body: Callable[..., Any]
    parts: Callable[[Chain, Any, Any, Any], PartsResult]

    def library_function(self) -> Optional[Callable]:
        found = loaded_types(self.module, self.cls)
        return found[0].__dict__.get(self.method) if found else None

    def matches(self, model: nn.Module) -> bool:
        """``model`` is of the class (or a subclass keeping its method) and the method is the one copied."""
        fn = self.library_function()
        if fn is None or not isinstance(model, loaded_types(self.module, self.cls)):
            return False
        return getattr(type(model), self.method, None) is fn and tuple(fn.__code__.co_names) == self.names

    def chain(self, name: str) -> Chain:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise KeyError(f"{self.cls}.{self.method} has no chain {name!r}")


class _FoldCache:
    """Where :func:`~effnet_kernels.nn.cached_fold` keeps one chain's folded weight."""


class FusedMethod:
    """Stands in for ``model.<spec.method>`` (an instance attribute): the library's method with each of
    its chains as one op where it can (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: MethodSpec, backend: Optional[str] = None,
                 excluded: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.spec = spec
        self.backend = pinned_backend(backend)
        #: chains that always run their modules in sequence (``convert``'s ``filter_fn`` rejected them)
        self.excluded = frozenset(excluded)
        self._caches = {chain.name: _FoldCache() for chain in spec.chains}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.spec.body(self.model, self.run_chain, *args, **kwargs)

    def _parts(self, chain: Chain, x: Optional[Tensor]) -> PartsResult:
        if chain.name in self.excluded:
            return None, "excluded by convert's filter_fn"
        modules = chain.modules(self.model)
        parts, reason = self.spec.parts(chain, *modules)
        if parts is not None:
            reason = hooks_reason(submodules(modules)) or run_reason(parts, self.model.training, x)
        return (parts, None) if reason is None else (None, reason)

    def unfused_reason(self, name: str, x: Optional[Tensor] = None) -> Optional[str]:
        """Why chain ``name``'s next forward (of ``x``, if given) runs its modules in sequence, or None."""
        return self._parts(self.spec.chain(name), x)[1]

    def run_chain(self, name: str, x: Tensor) -> Tensor:
        """Chain ``name`` of ``x``: one op, or its modules in sequence (:meth:`unfused_reason` says why)."""
        chain = self.spec.chain(name)
        parts, _ = self._parts(chain, x)
        if parts is None:
            if x.dtype not in KERNEL_DTYPES and not self.model.training:
                _refuse_kernel_backend(self.backend, x)
            return chain.run_unfused(self.model, x)
        return run_fused(parts, x, self.backend, self._caches[name])

    def bound_to(self, model: nn.Module) -> "FusedMethod":
        """The same method (spec, backend, exclusions) for ``model``, with caches of its own."""
        return FusedMethod(model, self.spec, self.backend, self.excluded)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_caches"] = {name: _FoldCache() for name in self._caches}  # folded tensors are recomputed
        return state

    def __repr__(self) -> str:
        chains = ", ".join(f"{c.name}: {c.conv}" for c in self.spec.chains)
        return f"FusedMethod({self.spec.cls}.{self.spec.method}; {chains}; backend={self.backend or 'auto'})"


def static_reason(spec: MethodSpec, chain: Chain, model: nn.Module) -> Optional[str]:
    """Why ``chain``'s modules on ``model`` can never run as one op as they are (None: they can, in eval)."""
    return spec.parts(chain, *chain.modules(model))[1]


def fused_methods(module: nn.Module) -> dict[str, FusedMethod]:
    """The :class:`FusedMethod` attributes ``convert`` set on ``module``, by method name."""
    return {k: v for k, v in vars(module).items() if isinstance(v, FusedMethod)}


_REPLICATE = "_replicate_for_data_parallel"


class ReplicaBinding:
    """Stands in for ``module._replicate_for_data_parallel`` (an instance attribute) on a module with
    :class:`FusedMethod` attributes.

    ``nn.DataParallel`` replicates each module as a shallow copy of its ``__dict__``, so without this
    every replica would share the original's fused methods, which run the original's modules. The
    replica here is the class's own copy with each fused method bound to the replica.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        for method in fused_methods(self.module).values():
            set_fused_method(replica, method.bound_to(replica))
        return replica


def set_fused_method(module: nn.Module, method: FusedMethod) -> None:
    """Set ``method`` on ``module`` (its model) under the method's name, replicas bound (:class:`ReplicaBinding`)."""
    if method.model is not module:
        raise ValueError(f"the FusedMethod is bound to another module ({type(method.model).__name__})")
    module.__dict__[method.spec.method] = method
    module.__dict__[_REPLICATE] = ReplicaBinding(module)


def remove_fused_methods(module: nn.Module) -> None:
    """Give ``module`` its class's methods back (what :func:`set_fused_method` set is deleted)."""
    for name in fused_methods(module):
        del module.__dict__[name]
    if isinstance(module.__dict__.get(_REPLICATE), ReplicaBinding):
        del module.__dict__[_REPLICATE]
