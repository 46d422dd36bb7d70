"""Kernels per inference forward (or training step) and the activation bytes they move per image: eager vs converted.

``python -m benchmarks.traffic [--mode eval|train] [--models b0,b1,..] [--batch N] [--dtype fp16|bf16|fp32]
[--memory-format channels_last|nchw] [--csv F] [--md F] [--readme README.md] [--by-op]``

**What is counted.** :func:`count_traffic` puts the model in eval mode, runs one forward
under ``torch.no_grad()`` as a warm-up (converted blocks fold their BatchNorms into
scale/shift on first use and cache them) and counts the *second* forward, inside a
:class:`torch.utils._python_dispatch.TorchDispatchMode` that sees every op the dispatcher
runs below autograd. Each op is classified by :func:`classify` from its schema:

* **kernel**: every op not listed below, ``effnet::*`` ops included. It counts as one
  kernel that reads each of its tensor inputs once and writes each of its tensor outputs
  once. A tensor's bytes are those of the *view* the op gets, ``numel * element_size`` (not
  its storage's span: a strided slice counts its own elements; a stride-0 broadcast view
  counts at its full, expanded size). A tensor passed twice to one op (``x * x``) is read
  once. In-place ops read and write their mutated argument (``add_``); the mutated
  arguments of ``out=`` ops (schema tag ``out``) and of the overwrite-only in-place ops
  ``copy_``, ``fill_``, ``zero_``, ``normal_``, ``uniform_`` (the one thing the schema does
  not say: which in-place ops do not read what they overwrite) are written, not read; the
  tensor argument of ``zeros_like``, ``ones_like``, ``full_like``, ``rand*_like``,
  ``new_zeros``, ``new_ones``, ``new_full`` gives only a shape and is not read. A
  kernel on tensors with no elements still counts as a kernel, with zero bytes (an empty
  output, such as the CPU's eval ``native_batch_norm`` saved mean/invstd, costs nothing).
* **view**: an op whose every return aliases an input without writing it (schema alias
  annotations: ``view``, ``t``, ``transpose``, ``permute``, ``expand``, ``as_strided``,
  ``squeeze``, ``slice``, ``select``, ``split``, ``alias``, ``detach``, ...), plus
  ``aten::_unsafe_view`` (fresh in its schema, a view in fact, e.g. what ``reshape`` of a
  copied tensor ends with) and ``aten::as_strided_`` (in place in its schema, but it only
  restrides: what ``adaptive_avg_pool2d`` does to a channels_last result): no kernel, no bytes.
* **alloc**: ``empty``, ``empty_like``, ``empty_strided``, ``empty_permuted``,
  ``new_empty``, ``new_empty_strided``: memory is allocated, nothing is launched or moved
  (``zeros`` / ``full`` are kernels: fills that write their output).
* **query**: an op with no tensor return that mutates nothing (``sym_size``,
  ``is_same_size``, ...): metadata only.

Ops with a ``CompositeImplicitAutograd`` kernel and no kernel of their own for the device
(``_decomposes``) are decomposed inside the mode (``conv2d`` -> ``convolution``, ``batch_norm`` ->
``native_batch_norm``), and the parts are counted, as they are under ``no_grad`` anyway (under
``inference_mode`` the mode would otherwise see ``conv2d``, ``linear`` or ``dropout``
undecomposed); an op with both, such as ``silu_backward``, runs its own kernel, as the
dispatcher would, and counts as one. ``effnet::*`` ops are never
decomposed: each is one dispatched call, run inside the mode with the mode switched off, so
its fake (meta) kernel or its backend's inner ops are never counted (``calls`` counts every
dispatched op of every kind, so a test can check that one ``effnet::dwconv_bn_act`` is one
call). One ``effnet::`` op is one kernel *by this rule*: a real backend may launch small
helper kernels too (a squeeze's partial-sum reduction, a weight fold it caches).

**Activations and constants.** A byte read from a tensor whose storage (identity as in
:func:`benchmarks.memory.storage_key`: ``StorageImpl`` on meta) is one of the model's
Parameters or buffers, or any other tensor that existed before the counted forward and is
not its input (the folded BatchNorm scale/shift the converted blocks cached at the warm-up:
``cached_bytes``), is a *constant* byte. Everything else, the input batch and every tensor
an op produced in this forward (small per-(n, c) tensors such as SE squeezes and gates
included), is an *activation* byte, read or written. A reference to the storage of every
tensor seen is kept until the count ends, so no storage identity is reused (the storage, not
the tensor: autograd steals a gradient only it holds as ``.grad``, and copies one that is
referenced elsewhere).

**Per image.** Counted at batch ``N`` and ``2N``; activation bytes per image are the slope
``(A(2N) - A(N)) / N``, the bytes one more image moves. What does not grow with the batch
(a per-forward weight cast or fold, if a model had one; meta's BatchNorm statistics, below)
drops out and is reported as ``fixed_act_bytes``. Kernels are per forward, at batch ``N``;
constant bytes are per forward.

**A training step** (``--mode train``, :func:`count_train_step`). The model in ``train()``,
grad enabled, every Parameter's ``.grad`` set to None (as ``optimizer.zero_grad()`` does), one
step: forward, loss ``out.float().sum()`` (:func:`default_loss`: the logits cast to float32 and
summed; its kernels are counted: the cast, the sum, and in backward the ``ones_like`` seed and
the cast of the expanded gradient back, 16 kB per image for 1000 fp16 logits), and
``loss.backward()``. One step warms up (as for eval: anything a converted block caches at first
use would be ``cached_bytes``), the second is counted. Every op the autograd engine runs in
backward is dispatched through the same mode: the mode stack is thread-local, and on the CPU
and meta the engine runs backward on the calling thread (a test counts the step from another
thread and sees the same backward ops; on CUDA the engine runs backward on a device thread, to
which it passes the caller's thread-local state: not exercised here, nothing counts on CUDA).
Backward's gradients of the Parameters are fresh tensors, activations by the rule, that
autograd makes the ``.grad`` without a copy; they do not grow with the batch, so they drop out
of the per-image slope into ``fixed_act_bytes`` (with the BatchNorm batch statistics and the
loss seed) and are in the total; ``grad_bytes`` (a CSV column) is what the step read and wrote
in the ``.grad`` storages. ``accumulate=True`` keeps the warm-up's ``.grad``: the counted step
then adds into them (constants, like the Parameters). BatchNorm's running-statistics update is
a constant write that ``native_batch_norm``'s schema does not declare: not counted (2·C·4 bytes
per BatchNorm per step, constants). The models are cast to the dtype (fp16 by default) as
:mod:`benchmarks.memory` casts them, with no autocast (autocast does not run on meta): pure
fp16 training, fp16 BatchNorm parameters included, where AMP would keep fp32 master weights and
cast them per op (constant bytes) with activations in fp16. For a training op the rule is a
lower bound: ``effnet::dwconv_bn_act_train_backward`` counts one read of each input and one
write of each output, where a real backward makes several passes (a reduction of the gradient,
then its application); so do ``native_batch_norm_backward`` and the others.

**Where.** The CLI counts B0-B7 (``effnet_kernels.models``) at native resolution, built on
the **meta device** (no init, ``torch.empty`` input, nothing allocated; all eight take
seconds), eager and ``effnet_kernels.convert(copy.deepcopy(model))``, in fp16 channels_last
at batch 8 by default. Meta dispatch follows the device-generic path, as the CPU does: on
CUDA, cuDNN's eval BatchNorm is ``cudnn_batch_norm`` (one kernel, the same bytes) and a 1x1
conv may pick a different algorithm, none of which changes what is counted. One difference
is visible: meta's eval ``native_batch_norm`` returns its saved mean and inverse std as
``[C]`` float32 tensors where the CPU returns empty ones, 8·C bytes per BatchNorm per forward
that a real run does not write; they do not grow with the batch, so the per-image slope
leaves them out (they are ``fixed_act_bytes``). *Total* bytes per image, what one forward at
batch N moves in all (constants included) ÷ N, is reported too. The bound is
what the op graph must move if every kernel streams its inputs and outputs once: caches,
kernels' own re-reads (a conv reading its input once per filter tile) and workspaces are
not counted.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import DTYPES, LAYOUTS, RESULTS, _build, _input_maker, _order, storage_key

__all__ = ["OpTraffic", "TrafficCount", "PerImage", "classify", "count_traffic", "count_train_step", "default_loss",
           "traffic_per_image",
           "measure_model", "rows_for", "traffic_table", "main", "TRAFFIC_COLUMNS", "MARK_START", "MARK_END",
           "KERNEL", "VIEW", "ALLOC", "QUERY"]

MARK_START = "<!-- traffic:begin -->"
MARK_END = "<!-- traffic:end -->"
TRAIN_MARK_START = "<!-- traffic-train:begin -->"
TRAIN_MARK_END = "<!-- traffic-train:end -->"
PROVIDERS = ("eager", "converted")
MODES = {"eval": "infer", "train": "train"}  # --mode -> the CSV's mode column (as benchmarks.network writes it)
KERNEL, VIEW, ALLOC, QUERY = "kernel", "view", "alloc", "query"
EFFNET_NAMESPACE = "effnet"

# What the schema does not say (see the module docstring).
_ALLOC_OPS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::empty_permuted",
                        "aten::new_empty", "aten::new_empty_strided"})
_VIEW_OPS = frozenset({"aten::_unsafe_view", "aten::as_strided_"})
_OVERWRITE_OPS = frozenset({"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_"})
_SHAPE_ONLY_OPS = frozenset({"aten::zeros_like", "aten::ones_like", "aten::full_like", "aten::rand_like",
                             "aten::randn_like", "aten::randint_like", "aten::new_zeros", "aten::new_ones",
                             "aten::new_full"})


# --------------------------------------------------------------------------- classification

def _returns_tensor(ret: Any) -> bool:
    return "Tensor" in str(ret.type)


def classify(func: torch._ops.OpOverload) -> str:
    """:data:`KERNEL`, :data:`VIEW`, :data:`ALLOC` or :data:`QUERY` for dispatched op ``func``.

    From ``func._schema`` (alias annotations, return types) plus the three small lists the
    schema does not give (allocations, ``_unsafe_view``); see the module docstring.
    """
    schema = func._schema
    name = schema.name
    if name in _ALLOC_OPS:
        return ALLOC
    if name in _VIEW_OPS:
        return VIEW
    mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    returns = list(schema.returns)
    if not mutates and returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return VIEW
    if not mutates and not any(_returns_tensor(r) for r in returns):
        return QUERY
    return KERNEL


_BACKEND_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA, "meta": torch._C.DispatchKey.Meta}


def _decomposes(func: torch._ops.OpOverload, device: str | None) -> bool:
    """Whether the dispatcher would run ``func``'s ``CompositeImplicitAutograd`` kernel on ``device``:
    it has one and no kernel of its own for that device (``silu_backward`` has both: a kernel)."""
    if func.namespace == EFFNET_NAMESPACE:
        return False
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
        return False
    key = _BACKEND_KEYS.get(device) if device is not None else None
    return key is None or not has(func.name(), key)


def _device_of(args: tuple, kwargs: dict) -> str | None:
    """The device type of an op's first tensor argument (else its ``device=``), or None."""
    for t in _tensors((args, kwargs)):
        return t.device.type
    device = kwargs.get("device")
    return torch.device(device).type if device is not None else None


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _operands(func: torch._ops.OpOverload, args: tuple, kwargs: dict,
              out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(read, written)`` tensors of one kernel (each tensor once per list)."""
    schema = func._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    bound = list(zip(positional, args)) + [(a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
    write_only = torch.Tag.out in func.tags or schema.name in _OVERWRITE_OPS
    reads: dict[int, torch.Tensor] = {}
    writes: dict[int, torch.Tensor] = {}
    if schema.name in _SHAPE_ONLY_OPS:  # the tensor argument gives only shape, dtype, device
        bound = []
    for arg, value in bound:
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        for t in _tensors(value):
            if mutated:
                writes[id(t)] = t
            if not (mutated and write_only):
                reads[id(t)] = t
    results = out if len(schema.returns) > 1 else (out,)
    for ret, value in zip(schema.returns, results):
        if ret.alias_info is None:  # a fresh tensor (aliases of mutated args are written above)
            for t in _tensors(value):
                writes[id(t)] = t
    return list(reads.values()), list(writes.values())


def _owner(t: torch.Tensor) -> Any:
    """What keeps ``t``'s storage (and so its identity) alive: the storage, or ``t`` without one."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- counting

class OpTraffic(NamedTuple):
    """One op name's share of a count: kernels, activation bytes (read + written), constant bytes."""

    kernels: int
    bytes: int
    constant_bytes: int = 0


@dataclass(frozen=True)
class TrafficCount:
    """What one forward (:func:`count_traffic`) launched and moved.

    ``kernels``: ops classified :data:`KERNEL` (``effnet_kernels``: those in the ``effnet``
    namespace). ``read_bytes`` / ``write_bytes``: activation bytes read / written;
    ``constant_bytes``: bytes read from (or written to) Parameters, buffers and other
    tensors made before the forward, of which ``cached_bytes`` are not Parameters or
    buffers. ``calls``: every dispatched op. ``by_op``: op name (``aten::convolution``,
    ``effnet::dwconv_bn_act``) -> :class:`OpTraffic` of its kernels; ``skipped``: op name
    -> calls of the ops that are views, allocations or queries. ``grad_bytes`` (a training
    step, :func:`count_train_step`): the bytes read or written, activation or constant, in the
    storages that hold the Parameters' ``.grad`` after the step.
    """

    kernels: int
    read_bytes: int
    write_bytes: int
    constant_bytes: int
    cached_bytes: int
    calls: int
    by_op: dict[str, OpTraffic] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    grad_bytes: int = 0

    @property
    def activation_bytes(self) -> int:
        """Activation bytes read plus written."""
        return self.read_bytes + self.write_bytes

    @property
    def total_bytes(self) -> int:
        """Activation plus constant bytes."""
        return self.activation_bytes + self.constant_bytes

    @property
    def effnet_kernels(self) -> int:
        """Kernels that are ``effnet::`` ops."""
        return sum(v.kernels for k, v in self.by_op.items() if k.startswith(EFFNET_NAMESPACE + "::"))


class _TrafficMode(TorchDispatchMode):
    def __init__(self, params: set[Hashable], inputs: set[Hashable]) -> None:
        super().__init__()
        self.params = params
        self.produced = set(inputs)
        # keeps storages alive, so no identity is reused; storages, not tensors: a tensor referenced
        # here would not be the sole owner autograd's AccumulateGrad steals as .grad (it would copy)
        self.keep: list[Any] = []
        self.kernels = self.read = self.write = self.const = self.cached = self.calls = 0
        self.by_op: dict[str, list[int]] = {}
        self.skipped: dict[str, int] = {}
        self.by_storage: dict[Hashable, int] = {}  # bytes of every kind read or written, per storage

    def _bytes(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(activation, constant, cached) bytes of one access to ``t``."""
        key, _ = storage_key(t)
        n = _nbytes(t)
        self.by_storage[key] = self.by_storage.get(key, 0) + n
        if key in self.params:
            return 0, n, 0
        if key in self.produced:
            return n, 0, 0
        return 0, n, n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _decomposes(func, _device_of(args, kwargs)):
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        self.calls += 1
        name = func._schema.name
        kind = classify(func)
        if kind == KERNEL:
            reads, writes = _operands(func, args, kwargs, out)
            accesses = [self._bytes(t) for t in reads]  # before this op's outputs count as produced
            self._register(out)
            accesses += [self._bytes(t) for t in writes]
            act = sum(a for a, _, _ in accesses)
            const = sum(c for _, c, _ in accesses)
            self.read += sum(a for a, _, _ in accesses[:len(reads)])
            self.write += sum(a for a, _, _ in accesses[len(reads):])
            self.const += const
            self.cached += sum(k for _, _, k in accesses)
            self.kernels += 1
            entry = self.by_op.setdefault(name, [0, 0, 0])
            entry[0] += 1
            entry[1] += act
            entry[2] += const
        else:
            self._register(out)
            self.skipped[name] = self.skipped.get(name, 0) + 1
        return out

    def _register(self, out: Any) -> None:
        for t in _tensors(out):
            self.keep.append(_owner(t))
            key, _ = storage_key(t)
            if key not in self.params:
                self.produced.add(key)

    def result(self, grads: Sequence[torch.Tensor] = ()) -> TrafficCount:
        """The count; ``grads``: the Parameters' gradients after a training step (for ``grad_bytes``)."""
        grad_keys = {storage_key(g)[0] for g in grads}
        return TrafficCount(
            kernels=self.kernels, read_bytes=self.read, write_bytes=self.write, constant_bytes=self.const,
            cached_bytes=self.cached, calls=self.calls,
            by_op={k: OpTraffic(*v) for k, v in sorted(self.by_op.items())}, skipped=dict(sorted(self.skipped.items())),
            grad_bytes=sum(self.by_storage.get(k, 0) for k in grad_keys),
        )


def _count_second(model: nn.Module, args: tuple, step: Callable[[], Any], *, train: bool, warmup: bool,
                  constants: Callable[[], Sequence[torch.Tensor]] = lambda: ()) -> TrafficCount:
    """``step()`` with ``model`` in training (``train``) or eval mode, once to warm up (unless
    ``warmup=False``), then counted; every module's mode is restored after. Constant storages:
    the model's Parameters and buffers, and ``constants()`` (taken after the warm-up)."""
    before = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        if warmup:
            step()
        params = {storage_key(t)[0] for t in chain(model.parameters(), model.buffers(), constants())}
        inputs = {storage_key(t)[0] for t in _tensors(args)}
        mode = _TrafficMode(params, inputs)
        with mode:
            step()
    finally:
        for m, training in before:
            m.training = training
    return mode.result([p.grad for p in model.parameters() if p.grad is not None] if train else ())


def count_traffic(model: nn.Module, example_input: Any, *, warmup: bool = True) -> TrafficCount:
    """Run ``model(example_input)`` in eval under ``no_grad`` (once to warm up, unless
    ``warmup=False``) and count the kernels and bytes of the (next) forward.

    ``example_input``: a tensor, or a tuple of positional arguments. Every module's mode is
    restored after. See the module docstring for the rules.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        return _count_second(model, args, lambda: model(*args), train=False, warmup=warmup)


def default_loss(out: torch.Tensor) -> torch.Tensor:
    """The training step's loss: ``out.float().sum()`` (logits cast to float32, summed)."""
    return out.float().sum()


def count_train_step(model: nn.Module, example_input: Any, *, loss: Callable[[Any], torch.Tensor] = default_loss,
                     warmup: bool = True, accumulate: bool = False) -> TrafficCount:
    """Count one training step: ``loss(model(example_input)).backward()`` with the model in
    training mode and grad enabled, once to warm up (unless ``warmup=False``), then counted.

    Each step starts with every Parameter's ``.grad`` set to None (``optimizer.zero_grad()``'s
    default), so backward's gradients become the ``.grad`` (autograd steals them: no kernel);
    ``accumulate=True`` keeps the warm-up's ``.grad``, and the counted step adds into them (one
    in-place add per Parameter; those gradients are constants, like the Parameters). The
    ``.grad`` are left set, as after a step; every module's mode is restored.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)

    def step() -> None:
        if not accumulate:
            model.zero_grad(set_to_none=True)
        loss(model(*args)).backward()

    def kept_grads() -> list[torch.Tensor]:  # (without accumulate they are freed: no identity to keep)
        return [p.grad for p in model.parameters() if p.grad is not None] if accumulate else []

    with torch.enable_grad():
        return _count_second(model, args, step, train=True, warmup=warmup, constants=kept_grads)


@dataclass(frozen=True)
class PerImage:
    """:func:`count_traffic` at batch ``batch`` (``at_batch``) and ``2 * batch`` (``at_double``)."""

    batch: int
    at_batch: TrafficCount
    at_double: TrafficCount

    def _slope(self, field_name: str) -> float:
        return (getattr(self.at_double, field_name) - getattr(self.at_batch, field_name)) / self.batch

    @property
    def kernels(self) -> int:
        """Kernels per forward at batch N."""
        return self.at_batch.kernels

    @property
    def activation_bytes_per_image(self) -> float:
        """``(A(2N) - A(N)) / N``: the activation bytes one more image moves."""
        return self._slope("activation_bytes")

    @property
    def read_bytes_per_image(self) -> float:
        return self._slope("read_bytes")

    @property
    def write_bytes_per_image(self) -> float:
        return self._slope("write_bytes")

    @property
    def fixed_activation_bytes(self) -> float:
        """Activation bytes at batch N that do not grow with it."""
        return self.at_batch.activation_bytes - self.batch * self.activation_bytes_per_image

    @property
    def total_bytes_per_image(self) -> float:
        """Everything one forward at batch N moves (constant bytes included), divided by N."""
        return self.at_batch.total_bytes / self.batch

    def by_op_per_image(self) -> dict[str, tuple[int, float]]:
        """Op name -> (kernels per forward at batch N, activation bytes per image: the slope)."""
        names = sorted(set(self.at_batch.by_op) | set(self.at_double.by_op))
        zero = OpTraffic(0, 0, 0)
        return {n: (self.at_batch.by_op.get(n, zero).kernels,
                    (self.at_double.by_op.get(n, zero).bytes - self.at_batch.by_op.get(n, zero).bytes) / self.batch)
                for n in names}


def traffic_per_image(model: nn.Module, make_input: Callable[[int], Any], batch: int, *,
                      train: bool = False) -> PerImage:
    """:func:`count_traffic` (``train``: :func:`count_train_step`) of ``model(make_input(batch))``
    and of ``model(make_input(2 * batch))``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    count = count_train_step if train else count_traffic
    return PerImage(batch, count(model, make_input(batch)), count(model, make_input(2 * batch)))


# --------------------------------------------------------------------------- models

def measure_model(name: str, *, batch: int = 8, dtype: str = "fp16", layout: str = "channels_last",
                  mode: str = "eval") -> tuple[int, dict[str, PerImage], int]:
    """Count eager and ``effnet_kernels.convert(copy.deepcopy(model))`` for benchmark model ``name``
    on the meta device at its native resolution, one inference forward (``mode="eval"``) or one
    training step (``"train"``): ``(resolution, {"eager": .., "converted": ..}, converted blocks)``."""
    import effnet_kernels

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    train = mode == "train"
    model, resolution = _build(name, "meta")
    model = model.to(dtype=DTYPES[dtype], memory_format=LAYOUTS[layout]).train(train)
    converted = effnet_kernels.convert(copy.deepcopy(model)).train(train)
    blocks = sum(isinstance(m, effnet_kernels.MBConv) for m in converted.modules())
    make = _input_maker(resolution, "meta", DTYPES[dtype], LAYOUTS[layout])
    counts = {"eager": traffic_per_image(model, make, batch, train=train),
              "converted": traffic_per_image(converted, make, batch, train=train)}
    return resolution, counts, blocks


# --------------------------------------------------------------------------- CSV / markdown

TRAFFIC_COLUMNS: tuple[str, ...] = (
    "torch", "python", "commit", "src_hash", "run_id",
    "model", "resolution", "batch", "slope_batches", "dtype", "layout", "device", "mode", "provider",
    "kernels", "kernel_ratio", "effnet_kernels", "act_bytes_per_img", "act_mb_per_img", "ratio",
    "total_bytes_per_img", "total_mb_per_img", "total_ratio",
    "read_bytes_per_img", "write_bytes_per_img", "fixed_act_bytes", "act_bytes", "const_bytes", "cached_bytes",
    "calls", "skipped_calls", "converted_blocks", "wall_s", "note", "timestamp", "grad_bytes",
)
_KEY = ("model", "resolution", "batch", "dtype", "layout", "device", "mode", "provider")
_MB = 1e6


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def rows_for(name: str, resolution: int, counts: dict[str, PerImage], blocks: int, *, batch: int, dtype: str,
             layout: str, wall_s: float, versions: dict[str, str], note: str = "",
             mode: str = "eval") -> list[dict[str, object]]:
    """The CSV rows (eager, converted) of one :func:`measure_model` result."""
    eager = counts["eager"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for provider in PROVIDERS:
        c = counts[provider]
        act, total = c.activation_bytes_per_image, c.total_bytes_per_image
        rows.append({
            **{k: versions.get(k, "") for k in ("torch", "python", "commit", "src_hash", "run_id")},
            "model": name, "resolution": resolution, "batch": batch, "slope_batches": f"{batch},{2 * batch}",
            "dtype": dtype, "layout": layout, "device": "meta", "mode": MODES[mode], "provider": provider,
            "kernels": c.kernels, "kernel_ratio": round(c.kernels / eager.kernels, 4) if eager.kernels else "",
            "effnet_kernels": c.at_batch.effnet_kernels,
            "act_bytes_per_img": _number(act), "act_mb_per_img": round(act / _MB, 3),
            "ratio": round(act / eager.activation_bytes_per_image, 4) if eager.activation_bytes_per_image else "",
            "total_bytes_per_img": _number(total), "total_mb_per_img": round(total / _MB, 3),
            "total_ratio": round(total / eager.total_bytes_per_image, 4) if eager.total_bytes_per_image else "",
            "read_bytes_per_img": _number(c.read_bytes_per_image),
            "write_bytes_per_img": _number(c.write_bytes_per_image),
            "fixed_act_bytes": _number(c.fixed_activation_bytes), "act_bytes": c.at_batch.activation_bytes,
            "const_bytes": c.at_batch.constant_bytes, "cached_bytes": c.at_batch.cached_bytes,
            "calls": c.at_batch.calls, "skipped_calls": sum(c.at_batch.skipped.values()),
            "converted_blocks": blocks if provider == "converted" else "",
            "wall_s": round(wall_s, 2), "note": note, "timestamp": stamp, "grad_bytes": c.at_batch.grad_bytes,
        })
    return rows


def _intro(mode: str, device: str, batch: str, versions: str) -> str:
    """The paragraph above one table: what was counted, how (``versions``: torch and commits)."""
    if mode == "train":
        return (
            f"Counted by `python -m benchmarks.traffic --mode train` ({versions}) on the {device} device at native "
            "resolution, the second training step (model in `train()`, every `.grad` set to None, forward, loss "
            "`out.float().sum()`, `loss.backward()`): each dispatched op of forward and backward that launches a "
            "kernel reads its tensor inputs once and writes its outputs once (views and allocations: nothing; an "
            "`effnet::` op, forward or backward: one kernel, a lower bound for a fused backward that makes several "
            f"passes). Kernels per step at batch {batch}; activation bytes per image: slope between the two "
            "batches, Parameters and buffers excluded (the Parameters' gradients, written once per step, do not "
            f"grow with the batch and drop out); total: everything one step at batch {batch} moves (weights and "
            f"gradients included) ÷ {batch}. MB = 10⁶ bytes; ratios: converted ÷ eager.\n"
        )
    return (
        f"Counted by `python -m benchmarks.traffic` ({versions}) on the "
        f"{device} device at native resolution, second forward under `no_grad`: each dispatched op that launches "
        "a kernel reads its tensor inputs once and writes its outputs once (views and allocations: nothing; an "
        "`effnet::` op: one kernel). Kernels per forward at batch "
        f"{batch}; activation bytes per image: slope between the two batches, Parameters, buffers and cached "
        f"folds excluded; total: everything one forward at batch {batch} moves (weights included) ÷ {batch}. "
        "MB = 10⁶ bytes; ratios: converted ÷ eager.\n"
    )


def traffic_table(rows: list[dict], mode: str = "eval") -> str:
    """Markdown: a table per (device, dtype, layout, batch) of the latest row per configuration, of
    the rows of ``mode`` (``eval``: the CSV's ``infer`` rows, and rows without a mode; ``train``)."""
    from .report import latest

    rows = latest([r for r in rows if (r.get("mode") or MODES["eval"]) == MODES[mode]], _KEY)
    if not rows:
        return "_no traffic results_\n" if mode == "eval" else "_no training-step traffic results_\n"
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["dtype"], r["layout"], r["batch"]), []).append(r)
    parts = []
    for (device, dtype, layout, batch), group in groups.items():
        torches = ", ".join(sorted({r.get("torch") or "?" for r in group}))
        commits = ", ".join(sorted({r.get("commit") or "?" for r in group}))
        parts.append(f"#### {device} · {dtype} · {layout} · {mode} · batches {batch} and {2 * int(batch)}\n\n"
                     + _intro(mode, device, batch, f"torch {torches}, commit {commits}"))
        header = ["model", "resolution", "kernels eager", "kernels converted", "ratio", "act MB/img eager",
                  "act MB/img converted", "ratio", "total MB/img eager", "total MB/img converted",
                  "effnet:: kernels (converted)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in _order(r["model"] for r in group):
            by = {r["provider"]: r for r in group if r["model"] == model}
            e, c = by.get("eager", {}), by.get("converted", {})

            def mb(r: dict, col: str = "act_mb_per_img") -> str:
                return f"{float(r[col]):,.1f}" if r.get(col) not in (None, "") else ""

            def ratio(r: dict, col: str) -> str:
                return f"{float(r[col]):.2f}" if r.get(col) not in (None, "") else ""

            lines.append("| " + " | ".join([
                model, str(e.get("resolution") or c.get("resolution") or ""), str(e.get("kernels", "")),
                str(c.get("kernels", "")), ratio(c, "kernel_ratio"), mb(e), mb(c), ratio(c, "ratio"),
                mb(e, "total_mb_per_img"), mb(c, "total_mb_per_img"),
                str(c.get("effnet_kernels", "")),
            ]) + " |")
        notes = sorted({f"{r['model']}: {r['note']}" for r in group if r.get("note")})
        tail = ("\nNotes: " + "; ".join(notes) + "\n") if notes else ""
        parts.append("\n".join(lines) + "\n" + tail)
    return "\n".join(parts)


def _by_op_text(name: str, counts: dict[str, PerImage]) -> str:
    lines = []
    for provider in PROVIDERS:
        c = counts[provider]
        lines.append(f"  {name} {provider}: {c.kernels} kernels, {c.activation_bytes_per_image / _MB:,.2f} MB/img")
        ops = sorted(c.by_op_per_image().items(), key=lambda kv: -kv[1][1])
        for op, (kernels, per_img) in ops:
            lines.append(f"    {op:<40} {kernels:>5} kernels {per_img / _MB:>10,.2f} MB/img")
        if c.at_batch.skipped:
            skipped = ", ".join(f"{k} x{v}" for k, v in c.at_batch.skipped.items())
            lines.append(f"    not kernels: {skipped}")
    return "\n".join(lines)


def _measure(args: argparse.Namespace, name: str, versions: dict) -> list[dict]:
    """One model's two CSV rows (eager, converted), its summary (and with ``--by-op`` its ops) printed."""
    start = time.perf_counter()
    resolution, counts, blocks = measure_model(name, batch=args.batch, dtype=args.dtype, layout=args.layout,
                                               mode=args.mode)
    wall = time.perf_counter() - start
    rows = rows_for(name, resolution, counts, blocks, batch=args.batch, dtype=args.dtype, layout=args.layout,
                    wall_s=wall, versions=versions, mode=args.mode)
    e, c = rows
    print(f"{name} @{resolution} {args.mode}: {e['kernels']} -> {c['kernels']} kernels ({c['kernel_ratio']}), "
          f"{e['act_mb_per_img']} -> {c['act_mb_per_img']} MB/img ({c['ratio']}); {wall:.1f} s", flush=True)
    if args.by_op:
        print(_by_op_text(name, counts), flush=True)
    return rows


_MODE_OUTPUT = {  # --mode -> (markdown file, README markers, title)
    "eval": ("traffic.md", (MARK_START, MARK_END), "### Memory traffic per inference, per image"),
    "train": ("traffic_train.md", (TRAIN_MARK_START, TRAIN_MARK_END), "### Memory traffic per training step, per image"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Count B0-B7 (or ``--models``), append to the CSV, write the markdown (and the README section)
    of ``--mode`` (its own markdown file and README markers)."""
    import sys

    from . import counted_cli

    mode_flag = argparse.ArgumentParser(add_help=False)
    mode_flag.add_argument("--mode", choices=sorted(MODES), default="eval")
    mode = mode_flag.parse_known_args(sys.argv[1:] if argv is None else list(argv))[0].mode
    md, marks, title = _MODE_OUTPUT[mode]
    p = counted_cli.parser("python -m benchmarks.traffic", __doc__.split("\n\n")[0], dtypes=DTYPES,
                           default_dtype="fp16", dtype_help="model and input dtype (no autocast; default fp16)",
                           layouts=LAYOUTS, csv=RESULTS / "traffic.csv", md=RESULTS / md, marks=marks, verb="counted")
    p.add_argument("--mode", choices=sorted(MODES), default="eval",
                   help="eval: one inference forward (default); train: one training step, forward and backward "
                        "(its own markdown file and README markers)")
    p.add_argument("--by-op", action="store_true", help="print each model's kernels and bytes per op name")
    return counted_cli.run(p, argv, measure=_measure, columns=TRAFFIC_COLUMNS,
                           table=lambda rows: traffic_table(rows, mode), title=title, marks=marks)


if __name__ == "__main__":
    raise SystemExit(main())
