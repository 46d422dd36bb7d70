"""Fused modules: :class:`MBConv`, :class:`SqueezeExcite`, :class:`FusedDWConvBNAct`.

Every fused module wraps ordinary PyTorch submodules (``nn.Conv2d``, ``nn.BatchNorm2d``)
and keeps them as its children under their original names, so ``state_dict()`` keys,
Parameters and optimizer state are those of the eager module it replaces.

* **eval** with running statistics: BatchNorm is folded (``scale``, ``shift`` in fp32) and
  the depthwise conv + BN + SiLU (+ SE squeeze), the SE gate and the excite run through
  :mod:`effnet_kernels.ops` on the selected backend.
* **train**: BatchNorm with batch statistics in the fused depthwise kernel, running
  statistics updated as ``nn.BatchNorm2d`` does (momentum or cumulative average, unbiased
  variance, ``num_batches_tracked``), the library's own stochastic depth, and a backward
  that recomputes the expanded tensors from the block input (:mod:`effnet_kernels._train_block`).
* **train with SyncBatchNorm** in a process group: the statistics and the backward's sums over
  the group's batches, one collective per BatchNorm each way (:mod:`effnet_kernels._sync_bn`).
* **train with frozen BatchNorm** (every BatchNorm of the block in eval mode, as fine-tuning
  recipes leave them, or a frozen BatchNorm module: torchvision's ``FrozenBatchNorm2d``, timm's
  ``FrozenBatchNormAct2d``, :mod:`effnet_kernels._norms`): the eval computation with autograd,
  through the folds, the running statistics untouched, the block's stochastic depth applied
  (:mod:`effnet_kernels._frozen_block`).

Under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) every fused module runs its
modules as they are (:func:`transform_reason`): the ops have no functorch rules.

A block whose parts are not all plain (some BatchNorms frozen and others training, conv biases,
an adapter that does not describe the drop; a SyncBatchNorm where PyTorch's raises, or
synchronising under torch.compile) trains through its eager forward.
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._folded_weights import _capturing as capturing, tensor_state
from ._hooks import hooks_reason
from ._norms import bn_uses_running_stats
from ._train_block import UNKNOWN_DROP, autocast_input, train_blocker, train_forward
from .reference import ACTIVATION_FNS
from .backends import check_backend_name

Tensor = torch.Tensor
Padding = Union[tuple[int, int, int, int], str]  # (left, right, top, bottom) or "same" (TF, dynamic)

__all__ = ["MBConv", "SqueezeExcite", "FusedDWConvBNAct", "fold_batchnorm", "tf_same_padding"]


def fold_batchnorm(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor] = None, *,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` in ``dtype`` (float32) such that ``bn(z + conv_bias) == z * scale + shift`` in eval.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``
    (+ ``conv_bias * scale``). Differentiable w.r.t. gamma, beta and the conv bias.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm needs a BatchNorm with running statistics (track_running_stats=True)")
    var = bn.running_var.to(dtype)
    mean = bn.running_mean.to(dtype)
    inv_std = torch.rsqrt(var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight.to(dtype) * inv_std
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    if conv_bias is not None:
        shift = shift + conv_bias.to(dtype) * scale
    return scale, shift


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(weight * scale, shift)`` of ``conv`` + ``bn`` (see :func:`fold_batchnorm`): the weight in its own
    dtype and shape, the shift (the conv's bias folded in) in float32.

    Computed in float64 and rounded once, each weight on its own: a float32 ``scale`` carries one
    rounding error per channel, the same for every pixel of that channel, which no global pool
    averages away (a deep network's logits drift by several times eager's own error with it)."""
    wide = torch.float64 if conv.weight.device.type != "mps" else torch.float32
    scale, shift = fold_batchnorm(bn, conv.bias, dtype=wide)
    w = conv.weight
    return (w.to(wide) * scale.reshape((-1,) + (1,) * (w.dim() - 1))).to(w.dtype), shift.to(torch.float32)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TRANSFORM_REASON = ("under a torch.func transform (grad, vmap, jvp, jacrev, ...): the fused ops have no "
                    "functorch rules, so the modules run as they are")


def transform_reason() -> Optional[str]:
    """:data:`TRANSFORM_REASON` while a ``torch.func`` transform is active, else None. The ops are
    ``torch.library`` ops with autograd formulas but no functorch rules, so under ``torch.func.grad``
    or ``vmap`` a fused module runs its modules (eager PyTorch, which the transforms support)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return TRANSFORM_REASON if active is not None and active() else None


def _refuse_kernel_backend(backend: Optional[str], x: Tensor) -> None:
    """Raise if a kernel backend was asked for explicitly for an input of a dtype the kernels do not take."""
    from .backends import BackendUnavailableError, requested_backend

    wanted = requested_backend(backend)
    if wanted in ("triton", "cuda"):
        raise BackendUnavailableError(
            f"effnet_kernels: backend {wanted!r} was requested, but its kernels take float32, float16 or "
            f"bfloat16 inputs, got {x.dtype}; use backend 'auto' or 'torch' (the block then runs its eager forward)")


def pinned_backend(backend: Optional[str]) -> Optional[str]:
    """The backend a fused module pins its ops to: ``None`` for ``None``/``"auto"`` (defer to
    :func:`effnet_kernels.use_backend`, the environment, then auto), else the validated name."""
    if backend is None:
        return None
    check_backend_name(backend)
    return None if backend == "auto" else backend




def apply_activation(t: Tensor, name: str) -> Tensor:
    """``t`` through the activation called ``name`` (one of the kernels' activations), eagerly
    (:data:`effnet_kernels.reference.ACTIVATION_FNS`, PyTorch's own functions)."""
    return ACTIVATION_FNS[name](t)


def tf_same_padding(h: int, w: int, kernel_size: int, stride: Sequence[int]) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding ``(left, right, top, bottom)`` for an ``h x w`` input."""
    def one(size: int, s: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + kernel_size - size, 0)
        return total // 2, total - total // 2

    top, bottom = one(h, stride[0])
    left, right = one(w, stride[1])
    return (left, right, top, bottom)


class _FoldEntry:
    """One owner's cached fold: the sources' :func:`~effnet_kernels._folded_weights.tensor_state`,
    weak references to the source tensors, and the result.

    A copy or an unpickled entry comes back empty (it never matches), so a deep copy or a
    loaded model folds its own tensors afresh and pickling carries no weak references.
    """

    __slots__ = ("state", "refs", "value")

    def __init__(self, state: tuple = (), refs: tuple = (), value: Any = None) -> None:
        self.state, self.refs, self.value = state, refs, value

    def serves(self, state: tuple, sources: Sequence[Optional[Tensor]]) -> bool:
        """True when this entry was folded from these very tensors, unchanged since."""
        return self.state == state and all(
            (ref is None and t is None) or (ref is not None and ref() is t) for ref, t in zip(self.refs, sources))

    def __reduce__(self) -> tuple:
        return (_FoldEntry, ())


def cached_fold(owner: object, conv: nn.Conv2d, bn: nn.BatchNorm2d, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a fold of ``conv`` + ``bn``), cached on ``owner`` while no tensor it reads changes.

    An entry serves only the very tensor objects it was folded from (held by weak reference, so
    a new tensor reusing a freed one's memory, at the same address with the same version, is
    folded afresh), while each keeps its storage, version counter (bumped by every in-place
    update: optimizer steps, ``load_state_dict``, ``.to()``), shape, stride, dtype and device.
    The cache is bypassed when autograd needs the graph, under ``torch.compile`` /
    ``torch.export``, under ``torch.jit.trace`` (a traced graph computes the fold from the
    parameters, it never bakes in a cached result) and while a CUDA graph is being captured
    (the graph folds on every replay, so it sees in-place updates of the parameters).
    """
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or capturing(conv.weight) or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)
    ):
        return compute()
    state = (bn.eps,) + tuple(None if t is None else tensor_state(t) for t in sources)
    entry = owner.__dict__.get("_fold_cache")
    if not isinstance(entry, _FoldEntry) or not entry.serves(state, sources):
        refs = tuple(None if t is None else weakref.ref(t) for t in sources)
        entry = _FoldEntry(state, refs, compute())
        owner.__dict__["_fold_cache"] = entry
    return entry.value


@dataclass
class DWConvSpec:
    """The fusable middle of a block: depthwise conv, its BatchNorm, activation, padding."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    padding: Padding  # (left, right, top, bottom) or "same"
    activation: str  # one of effnet_kernels.ops._checks.ACTIVATIONS

    @property
    def stride(self) -> tuple[int, int]:
        s = self.conv.stride
        return (int(s[0]), int(s[1]))

    def resolve_padding(self, x: Tensor) -> tuple[int, int, int, int]:
        if self.padding == "same":
            return tf_same_padding(x.shape[2], x.shape[3], self.conv.kernel_size[0], self.stride)
        return self.padding  # type: ignore[return-value]

    def folded(self) -> tuple[Tensor, Tensor]:
        """``fold_batchnorm`` of this conv + BN (see :func:`cached_fold`)."""
        return cached_fold(self, self.conv, self.bn, lambda: fold_batchnorm(self.bn, self.conv.bias))

    def fused(self, x: Tensor, squeeze: bool, backend: Optional[str]):
        scale, shift = self.folded()
        return ops.dwconv_bn_act(
            x, self.conv.weight, scale, shift, stride=self.stride, padding=self.resolve_padding(x),
            activation=self.activation, squeeze=squeeze, backend=backend,
        )


@dataclass
class SESpec:
    """The fusable SE path: 1x1 reduce conv, activation, 1x1 expand conv, gate."""

    conv_reduce: nn.Conv2d
    conv_expand: nn.Conv2d
    activation: str = "silu"  # "silu" | "relu"
    gate_kind: str = "sigmoid"  # "sigmoid" | "hardsigmoid"

    def gate(self, pooled: Tensor, backend: Optional[str]) -> Tensor:
        return ops.se_gate(pooled, self.conv_reduce.weight, self.conv_reduce.bias, self.conv_expand.weight,
                           self.conv_expand.bias, activation=self.activation, gate=self.gate_kind, backend=backend)


@dataclass
class PointwiseSpec:
    """A 1x1 conv + BatchNorm (+ activation) run as one :func:`effnet_kernels.ops.pointwise_conv`
    with the BN folded into it, which can also take the SE gate on load and add a residual.

    In eval with running statistics the op runs with ``weight * scale`` (in the weight's dtype)
    and bias ``shift`` (float32), folded and cached; otherwise ``fallback`` (the original
    modules) runs, and the caller applies any gate and residual itself.
    """

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    activation: str  # one of effnet_kernels.ops._checks.ACTIVATIONS
    fallback: tuple[nn.Module, ...]

    def folded(self) -> tuple[Tensor, Tensor]:
        def compute() -> tuple[Tensor, Tensor]:
            weight, shift = fold_into_conv(self.conv, self.bn)
            return weight.reshape(weight.shape[0], weight.shape[1]), shift

        return cached_fold(self, self.conv, self.bn, compute)

    @property
    def folds(self) -> bool:
        """True when the next call runs the folded op (eval BatchNorm with running statistics)."""
        return bn_uses_running_stats(self.bn)

    def __call__(self, x: Tensor, *, gate: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
        if not self.folds:
            if gate is not None or residual is not None:
                raise ValueError("a PointwiseSpec that is not folded applies no gate or residual; the caller does")
            for m in self.fallback:
                x = m(x)
            return x
        weight, bias = self.folded()
        return ops.pointwise_conv(x, weight, bias, gate=gate, residual=residual, activation=self.activation,
                                  backend=backend)


@dataclass
class MBConvPlan:
    """How a block is computed when fused; module references are the block's own children.

    ``pre`` (expand conv + BN + act) and ``post`` (project conv + BN) run in cuDNN, as one
    conv with the BN folded in (:class:`PointwiseSpec`) where the adapter recognised the
    pattern, else as the given modules; ``dw`` and ``se`` run fused. ``original`` is the eager block whose
    forward serves training and which :func:`effnet_kernels.revert` gives back.
    """

    pre: tuple[Callable[[Tensor], Tensor], ...]  # modules, or a PointwiseSpec
    dw: DWConvSpec
    se: Optional[SESpec]
    post: tuple[Callable[[Tensor], Tensor], ...]
    residual: bool
    original: nn.Module
    source: str  # which library the block came from, for reports
    # The block's stochastic depth / dropout on the residual branch, called in training as
    # ``drop(branch, *forward_args, **forward_kwargs)`` with the library's own code (None: the
    # block has none). Left UNKNOWN_DROP by an adapter that does not describe it: the block
    # then trains through its original forward.
    drop: Optional[Callable[..., Tensor]] = UNKNOWN_DROP
    drop_per_sample: bool = True  # the drop multiplies each sample by one number ([N, 1, 1, 1] mask)


def folded_forward(plan: MBConvPlan, x: Tensor, backend: Optional[str],
                   drop_mask: Optional[Callable[[Tensor], Optional[Tensor]]] = None) -> Tensor:
    """The block with its BatchNorms folded (running statistics): the eval forward, and a training
    block whose BatchNorms are all frozen (:mod:`effnet_kernels._frozen_block`). Differentiable
    through the ops' autograd and the folds (:func:`cached_fold` computes them afresh when autograd
    needs the graph).

    ``drop_mask(y)``, when given, is called with the depthwise (or excited) output once, before the
    projection, and returns the stochastic-depth multiplier of the residual branch or None; with a
    multiplier the block is ``project(y) * mask + x`` (the residual is not fused into the projection).
    Under autocast the block computes in the autocast dtype from its first conv on, and adds the
    residual in x's (promoted) dtype, as the eager block does.
    """
    h = autocast_input(x)
    for m in plan.pre:
        h = m(h, backend=backend) if isinstance(m, PointwiseSpec) else m(h)
    gate = None
    if plan.se is not None:
        y, pooled = plan.dw.fused(h, squeeze=True, backend=backend)
        gate = plan.se.gate(pooled, backend)
    else:
        y = plan.dw.fused(h, squeeze=False, backend=backend)
    mask = drop_mask(y) if drop_mask is not None and plan.residual else None
    project = plan.post[0] if len(plan.post) == 1 and isinstance(plan.post[0], PointwiseSpec) else None
    if project is not None and project.folds:
        # the four-kernel block: the projection takes the gate on load and adds the residual
        if mask is None and (not plan.residual or h.dtype == x.dtype):
            return project(y, gate=gate, residual=x if plan.residual else None, backend=backend)
        q = project(y, gate=gate, backend=backend)  # a residual block under autocast, or a drawn mask
        return (q if mask is None else q * mask) + x
    if gate is not None:
        y = ops.se_excite(y, gate, backend=backend)
    for m in plan.post:
        y = m(y)
    if plan.residual:
        y = (y if mask is None else y * mask) + x
    return y


def _mirror(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the children, Parameters and buffers of ``src`` (the same objects, under the same
    names, each buffer persistent or not as in ``src``; names ``src`` lacks are removed from ``dst``)."""
    for name in [n for n in dst._modules if n not in src._modules]:
        delattr(dst, name)
    for name, child in src._modules.items():
        if dst._modules.get(name) is not child:
            setattr(dst, name, child)
    for mine, theirs in ((dst._parameters, src._parameters), (dst._buffers, src._buffers)):
        for name in [n for n in mine if n not in theirs]:
            del mine[name]
        mine.update({n: t for n, t in theirs.items() if mine.get(n) is not t})
    dst._non_persistent_buffers_set = {n for n in src._non_persistent_buffers_set if n in dst._buffers}


class MBConv(nn.Module):
    """Fused MBConv (inverted residual) block: expand -> dwconv+BN+SiLU -> SE -> project (+ residual).

    Build one standalone with the arguments below (the same structure as
    :class:`effnet_kernels.blocks.MBConvBlock`, whose submodule names it keeps), or get
    one from :func:`effnet_kernels.convert`, which wraps an existing block's modules.

    Args:
        in_channels, out_channels: block input / output channels.
        kernel_size: depthwise kernel (odd: 3, 5, 7).
        stride: depthwise stride, 1 or 2.
        expand_ratio: expansion of the 1x1 expand conv (1 = no expand conv).
        se_ratio: SE reduction relative to ``in_channels`` (``None``/0: no SE).
        drop_path_rate: stochastic depth probability (training only).
        bn_eps, bn_momentum: BatchNorm settings (defaults as EfficientNet: 1e-3, 0.01).
        backend: ``None``/``"auto"`` (defer to :func:`effnet_kernels.use_backend`, the
            environment, then auto), or ``"torch"``, ``"triton"``, ``"cuda"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 6,
        se_ratio: Optional[float] = 0.25,
        drop_path_rate: float = 0.0,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        backend: Optional[str] = None,
    ) -> None:
        from .blocks import MBConvBlock
        from .integrations.native import plan_native

        block = MBConvBlock(in_channels, out_channels, kernel_size, stride, expand_ratio, se_ratio,
                            drop_path_rate=drop_path_rate, bn_eps=bn_eps, bn_momentum=bn_momentum)
        super().__init__()
        self._adopt(plan_native(block), backend)

    @classmethod
    def from_plan(cls, plan: MBConvPlan, backend: Optional[str] = None) -> "MBConv":
        """Wrap the block described by ``plan`` (used by the conversion adapters)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(plan, backend)
        return self

    def _adopt(self, plan: MBConvPlan, backend: Optional[str]) -> None:
        original = plan.original
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        self.training = original.training
        self.backend = pinned_backend(backend)
        self._use_plan(plan)

    # ------------------------------------------------------------ staying right after surgery
    # The plan holds references to the block's submodules. Users change those after
    # convert() (SyncBatchNorm.convert_sync_batchnorm, assigning a child, quantization
    # fusions, ...), so every forward first compares the modules now at each path the plan
    # was made from (and the number of children) with the ones it was made from; on any
    # difference the original block gets this block's current children and the adapter
    # plans it again, or, if it is no longer fusable, the block runs the original's eager
    # forward (and the report says why).

    def _use_plan(self, plan: MBConvPlan) -> None:
        self.plan = plan
        self.unfusable_reason: Optional[str] = None
        self._watch()

    def _watch(self) -> None:
        # (path, module) of every submodule now; references, not ids, so that deepcopy and
        # pickling (which copy them along with the children) keep them matching
        self._watched = tuple((tuple(name.split(".")), m) for name, m in self.plan.original.named_modules() if name)
        self._watched_children = tuple(self._modules)

    def _changed(self) -> bool:
        """Whether any watched submodule is no longer the module at its path (or children were added/removed)."""
        if tuple(self._modules) != self._watched_children:
            return True
        for parts, module in self._watched:
            m: Any = self
            for part in parts:
                m = m._modules.get(part) if isinstance(m, nn.Module) else None
            if m is not module:
                return True
        return False

    def _sync_original(self) -> nn.Module:
        """Give the original block this block's current children, Parameters and buffers."""
        original = self.plan.original
        _mirror(self, original)
        original.training = self.training
        return original

    def _replan(self) -> None:
        from .convert import _adapters, _match, logger
        from .integrations._common import NotFusable

        original = self._sync_original()
        planner = _match(original, list(_adapters()))
        reason = None
        if planner is None:
            reason = f"{type(original).__name__} is no longer a block type an adapter knows"
        else:
            try:
                plan = planner(original)
            except NotFusable as exc:
                reason = str(exc)
            except Exception as exc:  # an adapter must never break a forward
                reason = f"adapter error: {type(exc).__name__}: {exc}"
        if reason is None:
            self._use_plan(plan)
            return
        self.unfusable_reason = reason
        self._watch()
        logger.warning("effnet_kernels: a fused block changed after convert() and is no longer fusable (%s); "
                       "it runs its original eager forward", reason)

    def refresh(self) -> None:
        """Re-plan now if any submodule changed since the plan was made (forward does this itself)."""
        if self._changed():
            self._replan()

    # ------------------------------------------------------------ forward
    def __getattr__(self, name: str) -> Any:
        # Attributes of the wrapped block (e.g. efficientnet_pytorch's ``_block_args``)
        # stay reachable, so code that inspects blocks keeps working after convert().
        try:
            return super().__getattr__(name)
        except AttributeError:
            plan = self.__dict__.get("plan")
            if plan is None or name.startswith("__"):
                raise
            value = getattr(plan.original, name)
            if isinstance(value, types.MethodType) and value.__self__ is plan.original:
                return functools.partial(self._call_on_original, value)
            return value

    def _call_on_original(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method`` (one of the original block's, e.g. efficientnet_pytorch's ``set_swish``) called
        on the original with this block's current children, and whatever children it sets or removes
        taken back (the next forward re-plans)."""
        self._sync_original()
        try:
            return method(*args, **kwargs)
        finally:
            self._adopt_original()

    def _adopt_original(self) -> None:
        """Take the original block's children, Parameters and buffers (the inverse of :meth:`_sync_original`)."""
        _mirror(self.plan.original, self)

    def fused_active(self, x: Optional[Tensor] = None) -> bool:
        """True when the next forward (of ``x``, if given) runs through the fused ops: eval with
        running statistics, the block still fusable, and ``x`` in a dtype the kernels take."""
        self.refresh()
        if self.training or self.unfusable_reason is not None or not bn_uses_running_stats(self.plan.dw.bn):
            return False
        if self.hooks_reason() is not None or transform_reason() is not None:
            return False
        return x is None or x.dtype in KERNEL_DTYPES

    def hooks_reason(self) -> Optional[str]:
        """Why the block runs its original forward because a submodule has a module hook that the fused
        ops would not call (:mod:`effnet_kernels._hooks`), or None. Checked on every forward."""
        return hooks_reason(m for _, m in self._watched)

    def train_unfused_reason(self, x: Optional[Tensor] = None) -> Optional[str]:
        """Why the next training forward (of ``x``, if given) runs the original eager forward, or None
        when it runs fused (:mod:`effnet_kernels._train_block`)."""
        self.refresh()
        if self.unfusable_reason is not None:
            return self.unfusable_reason
        if x is not None and x.dtype not in KERNEL_DTYPES:
            return f"inputs of dtype {x.dtype} train eagerly"
        return self.hooks_reason() or transform_reason() or train_blocker(self.plan)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Fused forward in eval and in training (see the module docstring).

        Extra arguments (efficientnet_pytorch's ``drop_connect_rate``) go to the block's drop
        (its stochastic depth) in training and to the eager forward; eval ignores them. Inputs
        in a dtype the kernels do not take (float64, for gradcheck) run the eager forward,
        unless a kernel backend was asked for explicitly, which raises
        :class:`effnet_kernels.BackendUnavailableError`.
        """
        if self.training:
            if self.train_unfused_reason(x) is None:
                return train_forward(self.plan, x, args, kwargs, self.backend)
            return self._sync_original()(x, *args, **kwargs)
        if not self.fused_active(x):
            if x.dtype not in KERNEL_DTYPES:
                _refuse_kernel_backend(self.backend, x)
            return self._sync_original()(x, *args, **kwargs)
        return folded_forward(self.plan, x, self.backend)

    def extra_repr(self) -> str:
        return f"fused from {self.plan.source}, backend={self.backend or 'auto'}"


class FusedDWConvBNAct(nn.Module):
    """Depthwise conv + BatchNorm + activation (+ SE squeeze) as one module.

    Children ``conv`` (depthwise ``nn.Conv2d``, no padding of its own) and ``bn``
    (``nn.BatchNorm2d``). ``forward(x, squeeze=False)`` returns ``y`` or ``(y, mean)``.

    Args:
        channels: C.
        kernel_size: odd k.
        stride: 1 or 2.
        padding: ``None`` (k // 2), an int, ``(ph, pw)``, ``(left, right, top, bottom)``,
            or ``"same"`` (TensorFlow SAME, computed from each input's size).
        activation: one of ``effnet_kernels.ops._checks.ACTIVATIONS`` (``"silu"``, ``"identity"``, ...).
        eps, momentum: BatchNorm settings.
        backend: see :class:`MBConv`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Union[None, int, Sequence[int], str] = None,
        activation: str = "silu",
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        from .ops._checks import normalize_activation, normalize_padding

        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        normalize_activation(activation)
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=stride, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.padding: Padding = "same" if padding == "same" else normalize_padding(padding, kernel_size)  # type: ignore[arg-type]
        self.activation = activation
        self._spec = DWConvSpec(self.conv, self.bn, self.padding, activation)
        self.backend = pinned_backend(backend)

    @property
    def spec(self) -> DWConvSpec:
        """The fused computation over the *current* ``conv`` and ``bn`` (children may be replaced)."""
        spec = self._spec
        if spec.conv is not self.conv or spec.bn is not self.bn or spec.activation != self.activation:
            spec = self._spec = DWConvSpec(self.conv, self.bn, self.padding, self.activation)
        return spec

    def forward(self, x: Tensor, squeeze: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        bn = self.bn
        if (not self.training and isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn_uses_running_stats(bn)
                and transform_reason() is None):
            return self.spec.fused(autocast_input(x), squeeze, self.backend)
        z = F.conv2d(F.pad(x, self.spec.resolve_padding(x)), self.conv.weight, self.conv.bias,
                     self.conv.stride, groups=self.conv.groups)
        y = apply_activation(bn(z), self.activation)
        if squeeze:
            return y, y.float().mean(dim=(2, 3))
        return y


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with the fused gate and excite: ``x * sigmoid(W_e silu(W_r mean(x)))``.

    Children ``conv_reduce`` and ``conv_expand`` (1x1 ``nn.Conv2d`` with bias), the
    names timm and :class:`effnet_kernels.blocks.SqueezeExcite` use.
    ``forward(x, pooled=None)``: pass ``pooled`` (the ``[N, C]`` float32 mean of ``x``,
    e.g. from :func:`effnet_kernels.ops.dwconv_bn_act` with ``squeeze=True``) to skip
    the pooling pass.
    """

    def __init__(self, channels: int, reduced_channels: int, backend: Optional[str] = None) -> None:
        super().__init__()
        if reduced_channels < 1:
            raise ValueError(f"reduced_channels must be >= 1, got {reduced_channels}")
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.backend = pinned_backend(backend)

    @property
    def spec(self) -> SESpec:
        """The SE computation over the *current* ``conv_reduce`` and ``conv_expand``."""
        return SESpec(self.conv_reduce, self.conv_expand)

    def forward(self, x: Tensor, pooled: Optional[Tensor] = None) -> Tensor:
        if pooled is None:
            pooled = x.float().mean(dim=(2, 3))
        gate = self.spec.gate(pooled, self.backend)
        return ops.se_excite(x, gate, backend=self.backend)
