"""Compile the Triton kernels the benchmarks will launch, in parallel, before they run: ``python -m benchmarks.precompile``.

A benchmark process compiles each Triton kernel it launches the first time it launches it,
one after another on one host core (1-9 s each), inside its own time slot. This command
does that work first, in ``--jobs`` worker processes at once, into Triton's on-disk cache,
so the benchmarks (and ``python -m benchmarks.tune``) load the kernels instead of compiling
them. Nothing is timed and nothing is kept but Triton's cache.

What it compiles: the workloads of ``--plan``, a space-separated list of
``MODELS:PROVIDERS:BATCHES:MODES`` groups (comma lists; default :data:`DEFAULT_PLAN`, the
network steps of ``scripts/gpu_session.sh``: B0-B7 at 256 and 1, the training step of B0
and B4 at 128), for each ``--dtypes`` and ``--layouts``. Each workload calls the model as
``benchmarks.network`` does: the gate's forwards (the batch in the precision, then
:data:`~benchmarks.jobs.SUB_BATCH` images in fp32 and in the precision, as the fp32 and
block-wise checks run them), and for ``train`` one training step
(:func:`benchmarks.jobs._train_step`: forward, backward, SGD). Providers that compile with
``torch.compile`` are left to Inductor (it has its own compile workers); providers without
Triton kernels just run.

How a worker divides the work (``--worker i/n``, what :func:`main` starts ``--jobs`` of):
every worker runs every workload, but with :func:`sharded_warmups` in force: a Triton
launch compiles (``JITFunction.warmup``: no launch) only when the worker owns the launch's
:func:`launch_key` (``crc32 % n == i``), and launches nothing otherwise, so each distinct
kernel compiles in one worker, and no worker waits on the GPU. The Triton tuner runs in
compile-only mode (:func:`effnet_kernels.triton._tuning.set_compile_only`): every
candidate config of a new shape class goes through the same launch path, so the timing
pass of the benchmark or of ``benchmarks.tune`` finds them all compiled. Kernel outputs are
therefore left unwritten in workers: the numbers they compute are garbage, which nothing
there reads. The workloads run in plan order in every worker, so a ``--time-budget`` that
stops the workers (killed when it is spent) leaves the first groups compiled.

Exit codes: 0 done (workers stopped by the budget are logged); **69** nothing to compile
here (no CUDA GPU, Triton missing, or ``TRITON_INTERPRET=1``), as ``benchmarks.tune``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .cli import csv_list, positive_int
from .precision import DTYPES, precision

__all__ = ["DEFAULT_PLAN", "Group", "Workload", "parse_plan", "workloads", "launch_key", "owner",
           "sharded_warmups", "run_workloads", "main"]

#: The network steps of ``scripts/gpu_session.sh`` (net256 + net1, train), in the order they run.
DEFAULT_PLAN = "b0,b1,b2,b3,b4,b5,b6,b7:fused-triton:256,1:infer b0,b4:fused-triton:128:train"
MODES = ("infer", "train")


@dataclass(frozen=True)
class Group:
    """One ``MODELS:PROVIDERS:BATCHES:MODES`` group of a plan."""

    models: tuple[str, ...]
    providers: tuple[str, ...]
    batches: tuple[int, ...]
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    """One model called one way: the gate's forwards at ``batch``, then a training step if ``mode == "train"``."""

    model: str
    provider: str
    batch: int
    mode: str
    dtype: str
    layout: str


def parse_plan(text: str) -> list[Group]:
    """``"b0,b4:fused-triton:256,1:infer b0:fused-triton:128:train"`` -> groups; ``ValueError`` naming the bad part."""
    from .providers import PROVIDERS

    groups = []
    for part in text.split():
        fields = part.split(":")
        if len(fields) != 4:
            raise ValueError(f"--plan: group {part!r} must be MODELS:PROVIDERS:BATCHES:MODES (comma lists)")
        models, providers, batches, modes = ([v for v in f.split(",") if v] for f in fields)
        for what, values in (("models", models), ("providers", providers), ("batches", batches), ("modes", modes)):
            if not values:
                raise ValueError(f"--plan: group {part!r} has no {what}")
        bad = [p for p in providers if p not in PROVIDERS]
        if bad:
            raise ValueError(f"--plan: group {part!r}: provider {bad[0]!r} is not one of {', '.join(sorted(PROVIDERS))}")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"--plan: group {part!r}: mode {bad[0]!r} is not one of {', '.join(MODES)}")
        try:
            sizes = tuple(positive_int(b) for b in batches)
        except ValueError:
            raise ValueError(f"--plan: group {part!r}: batches must be integers >= 1, got {batches}") from None
        groups.append(Group(tuple(models), tuple(providers), sizes, tuple(modes)))
    if not groups:
        raise ValueError("--plan needs at least one MODELS:PROVIDERS:BATCHES:MODES group")
    return groups


def workloads(groups: Sequence[Group], dtypes: Sequence[str], layouts: Sequence[str]) -> list[Workload]:
    """The plan's workloads in order (groups, models, providers, dtypes, layouts, batches, modes), each once."""
    out: list[Workload] = []
    seen: set[Workload] = set()
    for g in groups:
        for model in g.models:
            for provider in g.providers:
                for dtype in dtypes:
                    for layout in layouts:
                        for batch in g.batches:
                            for mode in g.modes:
                                w = Workload(model, provider, batch, mode, dtype, layout)
                                if w not in seen:
                                    seen.add(w)
                                    out.append(w)
    return out


def _arg_class(value: Any, constexpr: bool, unspecialized: bool) -> Any:
    """What of one launch argument decides which binary Triton compiles (as far as a key needs it)."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if constexpr or value is None or isinstance(value, (bool, str)):
        return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    if isinstance(value, int):
        return "int" if unspecialized else (value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "float"
    return repr(value)


def launch_key(jit: Any, args: Sequence[Any], kwargs: dict) -> str:
    """A key, the same in every process, of what a launch of ``jit`` (a ``JITFunction``) compiles.

    Tensors count by dtype and 16-byte alignment, constexprs by value, other integers by the
    ``== 1`` and ``% 16 == 0`` classes Triton specialises on (none for ``do_not_specialize``),
    launch options (``num_warps``, ``num_stages``) by value. Launches that compile the same
    binary get the same key (non-constexpr ``bool`` arguments, keyed by value, are the exception:
    at worst one binary compiles in two workers); keys that coincide for different binaries only
    put both compiles in one worker.
    """
    fn = jit.fn
    params = list(jit.params)
    bound = dict(zip((p.name for p in params), args))
    bound.update(kwargs)
    parts: list[Any] = [f"{fn.__module__}.{fn.__qualname__}"]
    for p in params:
        parts.append(_arg_class(bound.get(p.name), bool(getattr(p, "is_constexpr", False)),
                                bool(getattr(p, "do_not_specialize", False))))
    names = {p.name for p in params}
    parts.extend((k, _arg_class(v, True, False)) for k, v in sorted(kwargs.items()) if k not in names)
    return repr(parts)


def owner(key: str, n: int) -> int:
    """The worker (of ``n``) that compiles the kernels with this :func:`launch_key`."""
    return zlib.crc32(key.encode()) % n


class _ShardedLaunch:
    """``kernel.on(t)`` of a worker: ``[grid](*args, **kw)`` compiles the launch if this worker owns it, never runs it."""

    def __init__(self, jit: Any, shard: tuple[int, int], warm: Callable, counts: dict) -> None:
        self.jit, self.shard, self.warm, self.counts = jit, shard, warm, counts

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            key = launch_key(self.jit, args, kwargs)
            if owner(key, self.shard[1]) == self.shard[0]:
                self.warm(self.jit, grid, args, kwargs)
                self.counts["compiled"].add(key)
            else:
                self.counts["skipped"].add(key)

        return launch


def _warmup(jit: Any, grid: Any, args: Sequence[Any], kwargs: dict) -> None:
    jit.warmup(*args, grid=grid, **kwargs)


@contextlib.contextmanager
def sharded_warmups(shard: tuple[int, int], warm: Callable = _warmup) -> Iterator[dict]:
    """In this block, compiled Triton launches of effnet_kernels compile or do nothing, as worker ``shard = (i, n)``.

    Yields ``{"compiled": keys, "skipped": keys}`` (sets of :func:`launch_key`). Launches that
    run in Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``) are left as they are.
    ``warm(jit, grid, args, kwargs)`` compiles one launch (default: ``JITFunction.warmup``).
    """
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    from effnet_kernels.triton._jit import DeviceKernel, interpreted

    counts: dict = {"compiled": set(), "skipped": set()}
    original = DeviceKernel.on

    def on(self: DeviceKernel, t: torch.Tensor):
        variant = original(self, t)
        return variant if interpreted(t) else _ShardedLaunch(variant, shard, warm, counts)

    DeviceKernel.on = on
    try:
        yield counts
    finally:
        DeviceKernel.on = original


def _calls(w: Workload, model: torch.nn.Module, device: torch.device, resolution: int) -> list[tuple[str, Callable]]:
    """``(what, call)`` for one workload, as ``benchmarks.network`` makes them (see the module docstring)."""
    from .jobs import LAYOUTS, SUB_BATCH, _forward_fn, _train_step

    fmt = LAYOUTS[w.layout]

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=fmt)

    classes: list[int] = []  # the model's output width, from the first forward (the training step's labels)

    def forward(dtype: str, batch: int) -> Callable[[], None]:
        def call() -> None:
            classes.append(_forward_fn(model, dtype, device)(images(batch)).shape[-1])

        return call

    calls = [(f"forward {w.dtype} x{w.batch}", forward(w.dtype, w.batch)),
             (f"forward fp32 x{SUB_BATCH}", forward("fp32", SUB_BATCH)),
             (f"forward {w.dtype} x{SUB_BATCH}", forward(w.dtype, SUB_BATCH))]
    if w.mode == "train":
        def train() -> None:
            _train_step(model, w.dtype, device, classes[0], w.batch)(images(w.batch))
            model.eval()

        calls.append((f"train step {w.dtype} x{w.batch}", train))
    return calls


def run_workloads(loads: Sequence[Workload], device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Run each workload's calls once, in order; a failing workload is logged and the rest still run.

    Returns ``{"done": n, "failed": n, "skipped": n}`` (skipped: providers that compile with
    ``torch.compile``, or cannot be built here). The model of a (model, provider, layout) is
    built once, uncalibrated (values do not matter here), and reused for its batches and modes.
    """
    from .jobs import LAYOUTS, first_line, free_memory
    from .models import build_model
    from .providers import ProviderSkipped, get_provider

    counts = {"done": 0, "failed": 0, "skipped": 0}
    built: dict[tuple, Optional[tuple[torch.nn.Module, int]]] = {}
    for w in loads:
        provider = get_provider(w.provider)
        if provider.compiles:
            counts["skipped"] += 1
            continue
        key = (w.model, w.provider, w.layout)
        if key not in built:
            built.clear()  # one model on the device at a time
            free_memory(device)
            try:
                base, resolution = build_model(w.model, device=device, calibrated=False)
                model = copy.deepcopy(base).to(memory_format=LAYOUTS[w.layout])
                if provider.needs_example:
                    example = torch.randn(1, 3, resolution, resolution, device=device)
                    model = provider.prepare(model, device, example.contiguous(memory_format=LAYOUTS[w.layout]))
                else:
                    model = provider.prepare(model, device)
                built[key] = (model, resolution)
            except ProviderSkipped as exc:
                log(f"{w}: skipped: {exc}")
                built[key] = None
            except Exception as exc:
                log(f"{w}: failed to build: {first_line(exc)}")
                built[key] = None
        if built[key] is None:
            counts["skipped"] += 1
            continue
        model, resolution = built[key]
        t0 = time.perf_counter()
        what = "building the calls"
        try:
            for what, call in _calls(w, model, device, resolution):
                call()
        except Exception as exc:
            counts["failed"] += 1
            log(f"{w}: {what}: failed: {first_line(exc)}")
        else:
            counts["done"] += 1
            log(f"{w}: done in {time.perf_counter() - t0:.1f} s")
    built.clear()
    free_memory(device)
    return counts


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from .jobs import LAYOUTS

    p = argparse.ArgumentParser(prog="python -m benchmarks.precompile", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default=DEFAULT_PLAN,
                   help=f"space-separated MODELS:PROVIDERS:BATCHES:MODES groups (default {DEFAULT_PLAN!r})")
    p.add_argument("--dtypes", type=csv_list("dtypes", choices=DTYPES), default=["fp16"])
    p.add_argument("--layouts", type=csv_list("layouts", choices=tuple(LAYOUTS)), default=["channels_last"])
    p.add_argument("--jobs", type=positive_int, default=8, help="worker processes (default 8)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; workers still running then are stopped (0 = no limit)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="print the workloads; compile nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/n"
    args = p.parse_args(list(argv))
    try:
        args.groups = parse_plan(args.plan)
    except ValueError as exc:
        p.error(str(exc))
    if args.time_budget < 0 or args.time_budget != args.time_budget:
        p.error(f"--time-budget must be >= 0, got {args.time_budget}")
    if args.worker is not None:
        try:
            i, n = (int(v) for v in args.worker.split("/"))
            if not 0 <= i < n:
                raise ValueError
        except ValueError:
            p.error(f"--worker must be i/n with 0 <= i < n, got {args.worker!r}")
        args.shard = (i, n)
    return args


def _worker(args: argparse.Namespace, loads: Sequence[Workload], device: torch.device) -> int:
    import os

    from effnet_kernels.triton import _tuning

    os.environ[_tuning.BUDGET_ENV_VAR] = "inf"
    _tuning.set_compile_only(True)
    log = lambda s: print(f"worker {args.worker}: {s}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    with sharded_warmups(args.shard) as launched:
        counts = run_workloads(loads, device, log)
    log(f"{counts['done']} workloads done, {counts['failed']} failed, {counts['skipped']} skipped; "
        f"{len(launched['compiled'])} kernels compiled here, {len(launched['skipped'])} left to other workers; "
        f"{time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring for the exit codes)."""
    from .tune import EXIT_NO_GPU, compile_in_workers, refusal

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    loads = workloads(args.groups, args.dtypes, args.layouts)
    if args.dry_run:
        for w in loads:
            print(f"{w.model} {w.provider} batch {w.batch} {w.mode} {w.dtype} {w.layout}")
        print(f"{len(loads)} workloads")
        return 0
    device = torch.device(args.device)
    code, reason = refusal(device)
    if code == EXIT_NO_GPU:
        print(f"benchmarks.precompile: {reason.split(': nothing')[0]}: nothing was compiled", file=sys.stderr)
        return code
    if args.worker is not None:
        return _worker(args, loads, device)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    compile_in_workers([sys.executable, "-m", "benchmarks.precompile", *argv], args.jobs, args.time_budget, log,
                       report=True)
    log(f"benchmarks.precompile: {len(loads)} workloads in {args.jobs} workers: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
