"""Pre-tune the Triton launch configs a benchmark will use: ``python -m benchmarks.tune``.

Runs every Triton kernel with tuned launch configs that a converted network launches in eval
(:data:`OPS`, ``--ops`` chooses) once on every distinct shape the models launch at the
batches, precisions and layouts given, called as the converted networks call them
(:mod:`benchmarks.op_cases`):

* ``dwconv``: ``dwconv_bn_act`` with SiLU and the squeeze, every MBConv block;
* ``pointwise``: ``pointwise_conv``, each variant the blocks launch: the expand conv (bias +
  SiLU), the projection (bias, the SE gate on load, the residual where the block has one) and
  the head (bias + SiLU + the global average pool, ``pool=True``);
* ``conv``: the stem's ``conv_bn_act`` (3x3 stride 2, bias + SiLU) on the ``3 x R x R`` input.

The SE ops (``se_gate``, ``se_excite``) pick their tiles from the shape, without the tuner:
there is nothing to pre-tune.
Tuning is on and the per-process tuning budget lifted, so each new shape class has its
candidates compiled and timed once and the winner written to the tuning store
(:mod:`effnet_kernels.triton._tuning_store`); classes too small to tune
(``TUNE_MIN_ELEMENTS`` of each kernel) only get their one config compiled. The benchmark
that runs next reads the store instead of tuning within its own 30 s budget; its rows'
``triton_tune`` column says how many classes came from the store.

Order (:func:`plan`): batches as given (``scripts/gpu_session.sh`` puts the headline's 256
first), then precisions, layouts and models (B0 first); within a model, the shapes no
earlier model launched, by the bytes they move per forward -- a shape's minimum bytes
(:meth:`~benchmarks.op_cases.OpCase.min_bytes`) times its launches in one forward --
largest first, whatever their op (B0 at 256: the 112 x 112 depthwise conv and the 56 x 56
expand first, the head last), so a short budget tunes the kernels that weigh most in the
headline first; ``--ops`` keeps that order for the ops it keeps. A time budget
(``--time-budget``) stops starting new shapes. ``--jobs N`` first compiles every candidate
in N worker processes (into Triton's on-disk cache; nothing timed there, at most half the
budget), so the timing pass loads kernels instead of compiling them one after another;
shapes are timed in this one process only, so no two timings share the GPU.

``--promote STORE_JSON...`` instead merges the measured entries of store files a GPU run
returned (``$OUT/tuning_store.json`` of ``scripts/gpu_session.sh``) into the table shipped
with the package (``effnet_kernels/triton/tuned_configs.json``), keeping only entries whose
kernel version matches the sources here; commit the table with the run's CSVs.

Exit codes: 0 done (shapes left by the time budget are listed); **69** nothing can be tuned
here (no CUDA GPU, Triton missing, or ``TRITON_INTERPRET=1``); **78** tuning could not be
kept (``EFFNET_KERNELS_TRITON_TUNE=0``, or the store is ``ro``/``off``). Neither writes
anything: configs in the store are always measured ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .cli import csv_list, positive_int
from .op_cases import DTYPES, OpCase, layer_cases, make_call, make_inputs, stem_case

__all__ = ["main", "plan", "forward_cases", "label", "refusal", "tune_case", "run_plan", "compile_in_workers",
           "EXIT_NO_GPU", "EXIT_NOT_KEPT", "LAYOUTS", "OPS"]

EXIT_NO_GPU = 69
EXIT_NOT_KEPT = 78
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
#: The ops whose Triton kernels choose tuned launch configs (``OpCase.op``; ``conv`` is the stem).
OPS = ("dwconv", "pointwise", "conv")
TuneCase = tuple[OpCase, str, str]  # (case, dtype name, layout name)


def forward_cases(name: str, batch: int, ops: Sequence[str] = OPS, resolution: Optional[int] = None) -> list[OpCase]:
    """The cases of ``ops`` one forward of EfficientNet-``name`` launches, in order, repeats included."""
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops must be among {OPS}, got {op!r}")
    stem = [stem_case(name, batch, resolution)] if "conv" in ops else []
    return stem + layer_cases(name, batch, [op for op in ops if op != "conv"], resolution)


def plan(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], layouts: Sequence[str],
         resolution: Optional[int] = None, ops: Sequence[str] = OPS) -> list[TuneCase]:
    """Every distinct shape of ``ops`` the benchmark will launch, in tuning order (see the module docstring)."""
    out: list[TuneCase] = []
    for batch in batches:
        launched = {name: Counter(forward_cases(name, batch, ops, resolution)) for name in models}
        for dtype in dtypes:
            size = DTYPES[dtype].itemsize
            ordered: list[OpCase] = []
            seen: set[OpCase] = set()
            for name in models:
                counts = launched[name]
                new = [case for case in counts if case.anonymous not in seen]  # network order, first launch
                seen.update(case.anonymous for case in new)
                ordered += sorted(new, key=lambda case: -counts[case] * case.min_bytes(size))
            out.extend((case, dtype, layout) for layout in layouts for case in ordered)
    return out


def label(tc: TuneCase) -> str:
    """``op model shape dtype layout`` (the shape as :attr:`~benchmarks.op_cases.OpCase.shape` writes it)."""
    case, dtype, layout = tc
    return f"{case.op} {case.model} {case.shape} {dtype} {layout}"


def refusal(device: torch.device) -> tuple[int, str]:
    """``(0, "")`` when tuned configs can be measured and kept here, else (exit code, reason)."""
    from effnet_kernels.triton import _tuning, _tuning_store, interpreter_enabled

    if device.type != "cuda" or not torch.cuda.is_available():
        return EXIT_NO_GPU, "no CUDA GPU is visible: nothing was tuned and nothing was written"
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return EXIT_NO_GPU, f"Triton cannot be imported ({exc}): nothing was tuned"
    if interpreter_enabled():
        return EXIT_NO_GPU, "TRITON_INTERPRET=1: kernels run in Triton's interpreter, there is nothing to tune"
    if os.environ.get(_tuning.TUNE_ENV_VAR, "1") in ("0", "", "false", "False"):
        return EXIT_NOT_KEPT, f"{_tuning.TUNE_ENV_VAR}=0 turns tuning off: nothing was tuned"
    mode = _tuning_store.mode()
    if mode != "rw":
        return EXIT_NOT_KEPT, (f"the tuning store is {mode!r} ({_tuning_store.MODE_ENV_VAR}): "
                               "tuned configs would not be kept, nothing was tuned")
    return 0, ""


def tune_case(tc: TuneCase, device: torch.device) -> str:
    """Launch ``tc``'s Triton kernel once on random inputs; the config source of its class."""
    from effnet_kernels.triton import _tuning

    case, dtype, layout = tc
    gen = torch.Generator(device).manual_seed(0)
    inputs = make_inputs(case, DTYPES[dtype], LAYOUTS[layout], device, gen)
    _tuning.start_usage_log()
    try:
        make_call(case, "triton", inputs)()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        counts = _tuning.usage_counts()
    del inputs
    return ",".join(counts) or "none"


def run_plan(cases: Sequence[TuneCase], tune_one: Callable[[TuneCase], str], time_budget: float,
             log: Callable[[str], None] = print) -> Counter:
    """Tune ``cases`` in order until ``time_budget`` seconds (0: no limit) have passed.

    Returns the count of cases per config source, ``not run`` for those the budget left,
    ``failed`` for those that raised (said in the log; the others still run).
    """
    counts: Counter = Counter()
    started = time.perf_counter()
    for i, tc in enumerate(cases):
        elapsed = time.perf_counter() - started
        if time_budget > 0 and elapsed > time_budget:
            counts["not run"] += len(cases) - i
            log(f"time budget of {time_budget:g} s used up: {len(cases) - i} shapes not tuned, first "
                f"{label(tc)}")
            break
        t0 = time.perf_counter()
        try:
            source = tune_one(tc)
        except Exception as exc:
            source = "failed"
            log(f"[{i + 1}/{len(cases)} {elapsed:5.0f}s] {label(tc)}: failed: {str(exc).splitlines()[0][:200]}")
        else:
            log(f"[{i + 1}/{len(cases)} {elapsed:5.0f}s] {label(tc)}: {source} ({time.perf_counter() - t0:.1f} s)")
        counts[source] += 1
    return counts


def compile_in_workers(cmd: Sequence[str], jobs: int, seconds: float, log: Callable[[str], None],
                       report: bool = False) -> None:
    """Run ``jobs`` workers ``cmd + ["--worker", "i/jobs"]`` at once; kill those still running after
    ``seconds`` (0: wait for all). A worker's failure is logged (with its last stderr line), never raised;
    with ``report``, so is the last stderr line of every worker that ended by itself."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        errs = [open(Path(tmp) / f"worker{i}.err", "w+") for i in range(jobs)]
        procs = [subprocess.Popen([*cmd, "--worker", f"{i}/{jobs}"], stdout=subprocess.DEVNULL, stderr=errs[i])
                 for i in range(jobs)]
        deadline = time.monotonic() + seconds
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1) if seconds > 0 else None)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                log(f"compile worker {i}: stopped after {seconds:.0f} s (its shapes compile in the timing pass)")
                continue
            if p.returncode or report:
                errs[i].seek(0)
                last = (errs[i].read().strip().splitlines() or [""])[-1]
                log(f"compile worker {i}: exit {p.returncode}: {last[:300]}")
        for f in errs:
            f.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from effnet_kernels.models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=csv_list("models", choices=MODEL_NAMES), default=list(MODEL_NAMES))
    p.add_argument("--batches", type=csv_list("batches", positive_int), default=[256, 1, 32],
                   help="comma list (default 256,1,32: the network headline, batch 1, the op benchmark)")
    p.add_argument("--dtypes", type=csv_list("dtypes", choices=tuple(DTYPES)), default=["fp16"])
    p.add_argument("--layouts", type=csv_list("layouts", choices=tuple(LAYOUTS)), default=["channels_last"])
    p.add_argument("--ops", type=csv_list("ops", choices=OPS), default=list(OPS),
                   help=f"comma list of {', '.join(OPS)} (default: all; conv is the stem)")
    p.add_argument("--resolution", type=positive_int, default=None, help="override the native resolutions")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N shapes of the plan")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; stop starting new shapes (0 = no limit)")
    p.add_argument("--jobs", type=int, default=0, help="compile in this many worker processes first (0 = none)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the store's path; tune nothing")
    p.add_argument("--promote", nargs="+", default=None, metavar="STORE_JSON",
                   help="instead of tuning: merge these store files' measured entries whose kernel version "
                   "matches the sources here into the shipped table (--table), to be committed")
    p.add_argument("--table", default=None, help="the table --promote writes (default: the package's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/n": compile share i of n
    args = p.parse_args(list(argv))
    if args.jobs < 0:
        p.error(f"--jobs must be >= 0, got {args.jobs}")
    if args.time_budget < 0 or args.time_budget != args.time_budget:
        p.error(f"--time-budget must be >= 0, got {args.time_budget}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring for the exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from effnet_kernels.triton import _tuning, _tuning_store

    if args.promote:
        table = args.table or _tuning_store.SHIPPED_TABLE
        try:
            counts = _tuning_store.promote(args.promote, table)
        except ValueError as exc:
            print(f"benchmarks.tune: {exc}", file=sys.stderr)
            return 2
        print(f"benchmarks.tune: {table}: {counts['kept']} entries kept, {counts['stale']} stale (kernel sources "
              f"changed since), {counts['unmeasured']} without timings")
        return 0
    cases = plan(args.models, args.batches, args.dtypes, args.layouts, args.resolution, args.ops)[: args.limit]
    if args.dry_run:
        for tc in cases:
            print(label(tc))
        per_op = Counter(case.op for case, _, _ in cases)
        print(f"{len(cases)} shapes ({', '.join(f'{op} {per_op[op]}' for op in OPS if op in args.ops)}); "
              f"store: {_tuning_store.directory()} (mode {_tuning_store.mode()})")
        return 0
    device = torch.device(args.device)
    code, reason = refusal(device)
    if code:
        print(f"benchmarks.tune: {reason}", file=sys.stderr)
        return code
    os.environ[_tuning.BUDGET_ENV_VAR] = "inf"  # this command's budget is --time-budget
    if args.worker is not None:
        i, n = (int(v) for v in args.worker.split("/"))
        _tuning.set_compile_only(True)
        run_plan(cases[i::n], lambda tc: tune_case(tc, device), 0.0, log=lambda s: None)
        return 0
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.jobs:
        compile_in_workers([sys.executable, "-m", "benchmarks.tune", *argv], args.jobs, args.time_budget / 2, log)
        log(f"compiled in {args.jobs} workers: {time.perf_counter() - started:.0f} s")
    left = max(args.time_budget - (time.perf_counter() - started), 1e-9) if args.time_budget else 0.0
    counts = run_plan(cases, lambda tc: tune_case(tc, device), left, log)
    summary = ", ".join(f"{n} {s}" for s, n in counts.most_common())
    log(f"benchmarks.tune: {len(cases)} shapes on {torch.cuda.get_device_name(device)}: {summary}; "
        f"store {_tuning_store.directory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
