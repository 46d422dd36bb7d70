"""What autograd saves for backward in one training forward, per image: eager vs converted.

``python -m benchmarks.memory [--models b0,b1,..] [--batch N] [--dtype fp32|fp16|bf16]
[--memory-format channels_last|nchw] [--device meta|cpu] [--batchnorm training|frozen] [--csv F] [--md F]
[--readme README.md]``

**What is counted.** :func:`saved_bytes` runs one training forward of a model under
:func:`torch.autograd.graph.saved_tensors_hooks`; its pack hook sees every tensor autograd
saves for backward (built-in ops' saved inputs/outputs, ``ctx.save_for_backward`` of custom
``torch.autograd.Function`` s and ``torch.library`` ops, the inputs of non-reentrant
``torch.utils.checkpoint`` regions). Each is mapped to the *storage* it lives in and the
distinct storages are summed, at their full ``nbytes``: a tensor saved by two ops (``x``
feeding a conv and a residual add) counts once, so do two views of one storage, and a
saved view keeps its whole storage alive, so it costs the whole storage. Storages of the
model's Parameters and buffers (``model.parameters()``, ``model.buffers()``: conv weights,
BatchNorm running statistics) are *constant* bytes; everything else (the input batch
included, when a layer saves it) is *activation* bytes.

**Storage identity** (:func:`storage_key`): ``(device, data_ptr)`` on a real device. On the
meta device every ``data_ptr`` is 0, so there it is the address of the C++ ``StorageImpl``
(``torch._C._storage_id``; views share it, distinct tensors do not); a tensor without a
single storage (sparse, nested) counts by itself. The recorder keeps a reference to every
saved tensor until it has counted, so no storage is freed and its identity reused during
a measurement.

**Per image.** Activation bytes are measured at batch ``N`` and ``2N`` and reported as the
slope ``(A(2N) - A(N)) / N``: the bytes one more image costs. What does not grow with the
batch (BatchNorm's per-channel batch mean and inverse std, saved Parameters) drops out; the
rest of the activation bytes at batch N is ``fixed_act_bytes``. *Total* bytes per image
is what batch N holds in all, Parameters included, divided by N (``total_bytes / N``).

**Where.** The CLI counts on the **meta device** at each model's native resolution: the
model is built there (no init), the input is ``torch.empty`` there, nothing is allocated
and B7 at 600×600 takes about a second. Meta kernels (and the effnet ops' fake kernels)
give real shapes and dtypes. Dispatch follows the device-generic path, as on the CPU: on
CUDA, cuDNN's BatchNorm also saves a (usually empty) reserve buffer and dropout saves a
1-byte mask where this path saves a float one (the classifier's ``[N, C]`` only). If a
forward fails on meta (an op without a meta kernel), the model is measured on the CPU
with real tensors at the same resolution instead, and the row's ``device`` and ``note``
say so. ``--device cpu`` measures there directly (tests check that meta and CPU agree).

**Limits.** Counted: tensors that go through the saved-tensor hooks. *Not* counted:
tensors a custom ``autograd.Function`` stashes on ``ctx`` attributes (``ctx.y = y``) or in
closures, and saves made under another ``saved_tensors_hooks`` context inside the model
(offloading; the inside of non-reentrant checkpoint regions, which are recomputed
anyway, their inputs are counted). The first are *detected*: the graph is walked after
the forward, custom nodes' attributes holding tensors not saved through the hooks are
summed in ``ctx_attr_bytes`` (not in the totals); closures cannot be seen. Checkpoint
regions are counted (``checkpoint_regions``: reentrant ones by their graph node,
non-reentrant ones by their hook). Not memory either: allocator rounding and caching,
the forward's transient peak, gradients and optimizer state.

A converted ``effnet_kernels.nn.MBConv`` trains through ``RecomputedMBConv`` (one custom
autograd node per block, ``custom_nodes``), which saves the block input, per-channel batch
statistics and the SE squeeze / gate / drop mask, and recomputes the expanded tensors in
backward: the converted models save ~0.1x the eager activation bytes (stem, head and
classifier still train eagerly). With ``--batchnorm frozen`` (every BatchNorm in eval mode while
the model trains) a converted block runs the eval ops with autograd, which save their inputs (the
block input, the expanded tensor and the depthwise output) instead of recomputing them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["SavedBytes", "PerImage", "saved_bytes", "saved_bytes_per_image", "storage_key", "measure_model",
           "memory_table", "main", "MEMORY_COLUMNS", "MARK_START", "MARK_END", "DTYPES", "LAYOUTS"]

RESULTS = Path(__file__).resolve().parent / "results"
MARK_START = "<!-- memory:begin -->"
MARK_END = "<!-- memory:end -->"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS: dict[str, torch.memory_format] = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
PROVIDERS = ("eager", "converted")


# --------------------------------------------------------------------------- counting

def storage_key(t: torch.Tensor) -> tuple[Hashable, int]:
    """``(identity, nbytes)`` of the storage ``t``'s data lives in.

    Identity: ``("ptr", device, data_ptr)`` where the storage has an address (real devices),
    else ``("impl", StorageImpl address)`` (meta tensors, empty storages), else
    ``("tensor", id(t))`` for a tensor without a single storage (sparse, nested), whose
    bytes are then ``numel * element_size``.
    """
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("tensor", id(t)), t.numel() * t.element_size()
    nbytes = int(storage.nbytes())
    ptr = 0 if t.device.type == "meta" else int(storage.data_ptr())
    if ptr:
        return ("ptr", str(t.device), ptr), nbytes
    try:
        impl = torch._C._storage_id(t)
    except (RuntimeError, TypeError, AttributeError):
        impl = getattr(storage, "_cdata", None)
        if impl is None:
            return ("tensor", id(t)), nbytes
    return ("impl", int(impl)), nbytes


@dataclass(frozen=True)
class SavedBytes:
    """What autograd saved in one forward (:func:`saved_bytes`), in distinct storages.

    ``activation_*``: storages that are not the model's Parameters or buffers;
    ``constant_*``: those that are. ``saved_tensors`` counts pack-hook calls (a tensor
    saved twice counts twice). ``custom_nodes``: autograd nodes of custom Functions and
    ``torch.library`` ops in the graph; ``custom_saved_bytes``: the activation storages
    their ``save_for_backward`` saved (part of ``activation_bytes``). ``ctx_attr_bytes`` /
    ``ctx_attr_tensors``: activation storages found on custom nodes' attributes that did
    *not* go through the hooks (not part of any total). ``checkpoint_regions``: reentrant
    plus non-reentrant ``torch.utils.checkpoint`` calls in the forward.
    """

    activation_bytes: int
    constant_bytes: int
    activation_storages: int
    constant_storages: int
    saved_tensors: int
    custom_nodes: int = 0
    custom_saved_bytes: int = 0
    ctx_attr_bytes: int = 0
    ctx_attr_tensors: int = 0
    checkpoint_regions: int = 0

    @property
    def total_bytes(self) -> int:
        """Activation plus constant bytes."""
        return self.activation_bytes + self.constant_bytes

    @property
    def storages(self) -> int:
        """Distinct storages saved."""
        return self.activation_storages + self.constant_storages


class _Recorder:
    """Pack/unpack hooks: every saved tensor's storage, a reference kept to each tensor."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.bytes: dict[Hashable, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors.append(t)  # keeps the storage alive, so its identity is not reused
        key, nbytes = storage_key(t)
        self.bytes[key] = max(nbytes, self.bytes.get(key, 0))
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


@contextlib.contextmanager
def _count_checkpoint_hooks(counter: list[int]) -> Iterator[None]:
    """Count non-reentrant ``torch.utils.checkpoint`` regions entered in the body.

    They push their own saved-tensor hooks (``torch.utils.checkpoint._checkpoint_hook``);
    its ``__init__`` is wrapped for the body and restored after.
    """
    import torch.utils.checkpoint as checkpoint

    cls = getattr(checkpoint, "_checkpoint_hook", None)
    if cls is None:  # another torch: nothing to count with
        yield
        return
    own = "__init__" in vars(cls)
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        counter[0] += 1
        original(self, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        if own:
            cls.__init__ = original
        else:
            del cls.__init__


def _nodes(outputs: Any) -> Iterator[Any]:
    """Every autograd node reachable from the tensors in ``outputs`` (each once)."""
    leaves = torch.utils._pytree.tree_leaves(outputs)
    stack = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node  # kept: ids stay unique while we walk
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def _tensors_in(value: Any, depth: int = 2) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _tensors_in(v, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)


def _set_training(model: nn.Module, mode: bool) -> list[tuple[nn.Module, bool]]:
    before = [(m, m.training) for m in model.modules()]
    model.train(mode)
    return before


def saved_bytes(model: nn.Module, example_input: Any, *, train: bool = True, frozen_bn: bool = False) -> SavedBytes:
    """Run ``model(example_input)`` once with grad enabled and count what autograd saved.

    ``example_input``: a tensor, or a tuple of positional arguments. The model runs in
    training mode (``train=False``: eval; ``frozen_bn=True``: training with every BatchNorm in
    eval mode, as fine-tuning leaves them) and every module's mode is restored after; the
    forward is real, so BatchNorm running statistics update. See the module docstring for
    what is and is not counted.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    constants = {storage_key(t)[0] for t in chain(model.parameters(), model.buffers())}
    recorder = _Recorder()
    checkpoints = [0]
    before = _set_training(model, train)
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        with torch.enable_grad(), _count_checkpoint_hooks(checkpoints), \
                torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            out = model(*args)
    finally:
        for m, mode in before:
            m.training = mode
    hooked = recorder.bytes
    custom_nodes = 0
    custom_saved: dict[Hashable, int] = {}
    stashed: dict[Hashable, int] = {}
    stashed_tensors = 0
    for node in _nodes(out):
        if type(node).__name__ == "CheckpointFunctionBackward":
            checkpoints[0] += 1
        if not isinstance(node, torch.autograd.function.BackwardCFunction):
            continue
        custom_nodes += 1
        try:
            saved = node.saved_tensors
        except RuntimeError:  # freed already
            saved = ()
        for t in saved:
            if t is not None:
                key, nbytes = storage_key(t)
                if key not in constants:
                    custom_saved[key] = nbytes
        for value in vars(node).values():
            for t in _tensors_in(value):
                key, nbytes = storage_key(t)
                if key not in hooked and key not in constants:
                    stashed_tensors += 1
                    stashed[key] = nbytes
    act = {k: v for k, v in hooked.items() if k not in constants}
    const = {k: v for k, v in hooked.items() if k in constants}
    return SavedBytes(
        activation_bytes=sum(act.values()),
        constant_bytes=sum(const.values()),
        activation_storages=len(act),
        constant_storages=len(const),
        saved_tensors=len(recorder.tensors),
        custom_nodes=custom_nodes,
        custom_saved_bytes=sum(custom_saved.values()),
        ctx_attr_bytes=sum(stashed.values()),
        ctx_attr_tensors=stashed_tensors,
        checkpoint_regions=checkpoints[0],
    )


@dataclass(frozen=True)
class PerImage:
    """:func:`saved_bytes` at batch ``batch`` (``at_batch``) and ``2 * batch`` (``at_double``)."""

    batch: int
    at_batch: SavedBytes
    at_double: SavedBytes

    def _slope(self, field: str) -> float:
        return (getattr(self.at_double, field) - getattr(self.at_batch, field)) / self.batch

    @property
    def activation_bytes_per_image(self) -> float:
        """``(A(2N) - A(N)) / N``: the saved activation bytes one more image adds."""
        return self._slope("activation_bytes")

    @property
    def fixed_activation_bytes(self) -> float:
        """Activation bytes at batch N that do not grow with it (e.g. BatchNorm batch statistics)."""
        return self.at_batch.activation_bytes - self.batch * self.activation_bytes_per_image

    @property
    def total_bytes_per_image(self) -> float:
        """Everything saved at batch N (Parameters included), divided by N."""
        return self.at_batch.total_bytes / self.batch

    @property
    def custom_saved_bytes_per_image(self) -> float:
        """The per-image slope of :attr:`SavedBytes.custom_saved_bytes`."""
        return self._slope("custom_saved_bytes")

    @property
    def ctx_attr_bytes_per_image(self) -> float:
        """The per-image slope of :attr:`SavedBytes.ctx_attr_bytes` (not in the totals)."""
        return self._slope("ctx_attr_bytes")


def saved_bytes_per_image(model: nn.Module, make_input: Callable[[int], Any], batch: int, *,
                          train: bool = True, frozen_bn: bool = False) -> PerImage:
    """:func:`saved_bytes` of ``model(make_input(batch))`` and of ``model(make_input(2 * batch))``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    return PerImage(batch, saved_bytes(model, make_input(batch), train=train, frozen_bn=frozen_bn),
                    saved_bytes(model, make_input(2 * batch), train=train, frozen_bn=frozen_bn))


# --------------------------------------------------------------------------- models

def _build(name: str, device: str) -> tuple[nn.Module, int]:
    """``(model in training mode on device, native resolution)``; B0-B7 are built on meta directly."""
    from . import models as bench_models

    full = bench_models._canonical_effnet(name) if name not in bench_models._BUILDERS else None
    if full is not None:
        from effnet_kernels import models

        with torch.device(device):
            model = models.efficientnet(full)
        return model.train(), int(model.resolution)
    model, resolution = bench_models.build_model(name, calibrated=False)
    return model.to(device).train(), resolution


def _input_maker(resolution: int, device: str, dtype: torch.dtype,
                 layout: torch.memory_format) -> Callable[[int], torch.Tensor]:
    def make(n: int) -> torch.Tensor:
        shape = (n, 3, resolution, resolution)
        if device == "meta":
            x = torch.empty(shape, device=device, dtype=dtype)
        else:
            x = torch.randn(shape, generator=torch.Generator(device).manual_seed(n), device=device).to(dtype)
        return x.contiguous(memory_format=layout)

    return make


def measure_model(name: str, *, batch: int = 8, dtype: str = "fp32", layout: str = "channels_last",
                  device: str = "meta", frozen_bn: bool = False) -> tuple[int, str, dict[str, PerImage], int, str]:
    """Count eager and ``effnet_kernels.convert(copy.deepcopy(model))`` for benchmark model ``name``
    (``frozen_bn``: training with every BatchNorm frozen, see :func:`saved_bytes`).

    Returns ``(resolution, device measured on, {"eager": PerImage, "converted": PerImage},
    converted blocks, note)``. On meta, a forward that fails is measured again on the CPU.
    """
    import effnet_kernels

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    note = ""
    for dev in ([device, "cpu"] if device == "meta" else [device]):
        model, resolution = _build(name, dev)
        model = model.to(dtype=DTYPES[dtype], memory_format=LAYOUTS[layout])
        converted = effnet_kernels.convert(copy.deepcopy(model))
        blocks = sum(isinstance(m, effnet_kernels.MBConv) for m in converted.modules())
        make = _input_maker(resolution, dev, DTYPES[dtype], LAYOUTS[layout])
        try:
            counts = {"eager": saved_bytes_per_image(model, make, batch, frozen_bn=frozen_bn),
                      "converted": saved_bytes_per_image(converted, make, batch, frozen_bn=frozen_bn)}
        except (NotImplementedError, RuntimeError) as exc:
            if dev != "meta":
                raise
            note = f"meta forward failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); measured on cpu"
            continue
        return resolution, dev, counts, blocks, note
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- CSV / markdown

MEMORY_COLUMNS: tuple[str, ...] = (
    "torch", "python", "commit", "src_hash", "run_id",
    "model", "resolution", "batch", "slope_batches", "dtype", "layout", "device", "batchnorm", "provider",
    "act_bytes_per_img", "total_bytes_per_img", "act_mb_per_img", "total_mb_per_img", "ratio", "total_ratio",
    "storages", "act_storages", "saved_tensors", "act_bytes", "total_bytes", "fixed_act_bytes", "param_bytes",
    "custom_nodes", "custom_saved_bytes_per_img", "ctx_attr_bytes_per_img", "checkpoint_regions",
    "converted_blocks", "wall_s", "note", "timestamp",
)
_KEY = ("model", "resolution", "batch", "dtype", "layout", "device", "batchnorm", "provider")
_MB = 1e6


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def rows_for(name: str, resolution: int, device: str, counts: dict[str, PerImage], blocks: int, *,
             batch: int, dtype: str, layout: str, wall_s: float, note: str,
             versions: dict[str, str], frozen_bn: bool = False) -> list[dict[str, object]]:
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
            "dtype": dtype, "layout": layout, "device": device, "batchnorm": "frozen" if frozen_bn else "training",
            "provider": provider,
            "act_bytes_per_img": _number(act), "total_bytes_per_img": _number(total),
            "act_mb_per_img": round(act / _MB, 3), "total_mb_per_img": round(total / _MB, 3),
            "ratio": round(act / eager.activation_bytes_per_image, 4) if eager.activation_bytes_per_image else "",
            "total_ratio": round(total / eager.total_bytes_per_image, 4) if eager.total_bytes_per_image else "",
            "storages": c.at_batch.storages, "act_storages": c.at_batch.activation_storages,
            "saved_tensors": c.at_batch.saved_tensors, "act_bytes": c.at_batch.activation_bytes,
            "total_bytes": c.at_batch.total_bytes, "fixed_act_bytes": _number(c.fixed_activation_bytes),
            "param_bytes": c.at_batch.constant_bytes, "custom_nodes": c.at_batch.custom_nodes,
            "custom_saved_bytes_per_img": _number(c.custom_saved_bytes_per_image),
            "ctx_attr_bytes_per_img": _number(c.ctx_attr_bytes_per_image),
            "checkpoint_regions": c.at_batch.checkpoint_regions,
            "converted_blocks": blocks if provider == "converted" else "",
            "wall_s": round(wall_s, 2), "note": note, "timestamp": stamp,
        })
    return rows


def _order(models: Iterable[str]) -> list[str]:
    from .report import _order as order

    return order(models)


def memory_table(rows: list[dict]) -> str:
    """Markdown: a table per (device, dtype, layout, batch, BatchNorm mode) of the latest row per
    configuration (rows from before the ``batchnorm`` column trained their BatchNorms)."""
    from .report import latest

    rows = latest(({**r, "batchnorm": r.get("batchnorm") or "training"} for r in rows), _KEY)
    if not rows:
        return "_no memory results_\n"
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["dtype"], r["layout"], r["batch"], r["batchnorm"]), []).append(r)
    parts = []
    for (device, dtype, layout, batch, batchnorm), group in groups.items():
        first = group[0]
        conv = [r for r in group if r["provider"] == "converted"]
        ratios = {r.get("ratio") for r in conv}
        fused = sum(int(r.get("custom_nodes") or 0) for r in conv)
        if ratios <= {"1", "1.0"} and fused == 0:
            verdict = ("The converted models save exactly what the eager ones save (ratio 1.00, no custom "
                       "autograd node in their graphs): in training, converted blocks run the original "
                       "block's eager forward; a fused training path would lower the ratio.")
        else:
            verdict = ("Ratio: converted activation bytes per image over eager; custom autograd nodes are "
                       "the fused ops' (and any other custom Function's) nodes in the converted graph.")
        commits = ", ".join(sorted({r.get("commit") or "?" for r in group}))
        parts.append(
            f"#### {device} · {dtype} · {layout} · batches {batch} and {2 * int(batch)}"
            f"{' · BatchNorm frozen (fine-tuning)' if batchnorm == 'frozen' else ''}\n\n"
            f"Counted by `python -m benchmarks.memory` (torch {first.get('torch') or '?'}, commit {commits}) "
            f"on the {device} device at native resolution: the distinct storages autograd saves in one "
            "training forward (saved-tensor hooks). Activations: per-image slope between the two batches, "
            f"Parameters and buffers excluded; total: everything saved at batch {batch} (Parameters included) "
            f"÷ {batch}. MB = 10⁶ bytes. {verdict}\n"
        )
        header = ["model", "resolution", "act MB/img eager", "act MB/img converted", "ratio",
                  "total MB/img eager", "total MB/img converted", "storages eager / converted",
                  "custom autograd nodes (converted)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in _order(r["model"] for r in group):
            by = {r["provider"]: r for r in group if r["model"] == model}
            e, c = by.get("eager", {}), by.get("converted", {})

            def mb(r: dict, col: str) -> str:
                return f"{float(r[col]):,.1f}" if r.get(col) not in (None, "") else ""

            ratio = f"{float(c['ratio']):.2f}" if c.get("ratio") not in (None, "") else ""
            lines.append("| " + " | ".join([
                model, str(e.get("resolution") or c.get("resolution") or ""), mb(e, "act_mb_per_img"),
                mb(c, "act_mb_per_img"), ratio, mb(e, "total_mb_per_img"), mb(c, "total_mb_per_img"),
                f"{e.get('storages', '')} / {c.get('storages', '')}", str(c.get("custom_nodes", "")),
            ]) + " |")
        notes = sorted({f"{r['model']}: {r['note']}" for r in group if r.get("note")})
        stashed = sorted({r["model"] for r in group if float(r.get("ctx_attr_bytes_per_img") or 0)})
        ckpt = sorted({r["model"] for r in group if int(r.get("checkpoint_regions") or 0)})
        tail = ""
        if stashed:
            tail += f"\nTensors on custom ctx attributes (not counted above): {', '.join(stashed)}.\n"
        if ckpt:
            tail += f"\nCheckpoint regions (their inside is not counted): {', '.join(ckpt)}.\n"
        if notes:
            tail += "\nNotes: " + "; ".join(notes) + "\n"
        parts.append("\n".join(lines) + "\n" + tail)
    return "\n".join(parts)


def _measure(args: argparse.Namespace, name: str, versions: dict) -> list[dict]:
    """One model's two CSV rows (eager, converted), its summary printed."""
    start = time.perf_counter()
    frozen = args.batchnorm == "frozen"
    resolution, device, counts, blocks, note = measure_model(
        name, batch=args.batch, dtype=args.dtype, layout=args.layout, device=args.device, frozen_bn=frozen)
    wall = time.perf_counter() - start
    rows = rows_for(name, resolution, device, counts, blocks, batch=args.batch, dtype=args.dtype,
                    layout=args.layout, wall_s=wall, note=note, versions=versions, frozen_bn=frozen)
    e, c = rows
    print(f"{name} @{resolution} {device}: activations {e['act_mb_per_img']} MB/img eager, "
          f"{c['act_mb_per_img']} MB/img converted (ratio {c['ratio']}), total {e['total_mb_per_img']} / "
          f"{c['total_mb_per_img']} MB/img at batch {args.batch}; {wall:.1f} s", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Count B0-B7 (or ``--models``), append to the CSV, write the markdown (and the README section)."""
    from . import counted_cli

    p = counted_cli.parser("python -m benchmarks.memory", __doc__.split("\n\n")[0], dtypes=DTYPES,
                           default_dtype="fp32", dtype_help="model and input dtype (no autocast; default fp32)",
                           layouts=LAYOUTS, csv=RESULTS / "memory.csv", md=RESULTS / "memory.md",
                           marks=(MARK_START, MARK_END), verb="measured")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta (default: nothing allocated) or cpu (real tensors)")
    p.add_argument("--batchnorm", choices=("training", "frozen"), default="training",
                   help="BatchNorms training (batch statistics; default) or frozen: every BatchNorm in eval mode "
                        "while the model trains, as fine-tuning leaves them")
    return counted_cli.run(p, argv, measure=_measure, columns=MEMORY_COLUMNS, table=memory_table,
                           title="### Saved for backward, per image", marks=(MARK_START, MARK_END))


if __name__ == "__main__":
    raise SystemExit(main())
