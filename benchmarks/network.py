"""Whole-network benchmark: ``python -m effnet_kernels bench [args]`` calls :func:`main`.

For each model x batch x precision x provider (x layout) it checks the provider's
output against eager PyTorch (:mod:`benchmarks.jobs`), then times inference (and, at
batch 1, CUDA-graph replay; and the training step when asked), appending one row per
measurement to ``benchmarks/results/results.csv`` as soon as it is taken. Run ``--help``
for the flags; ``--dry-run`` prints the plan without running anything.

Exit codes: 0 all rows ok or skipped; 1 some row failed; **75** a CUDA error poisoned the
context (illegal address, launch failure, device-side assert, ...): the failing job's rows
were recorded as ``failed: ...``, the jobs not yet run were not recorded at all, and the
same command with ``--resume`` (same ``EFFNET_RUN_ID``) continues with them in a fresh
process. ``--resume`` re-reads ``--out`` and skips every (model, resolution, batch, dtype,
layout, provider, mode) that already has a row of this run id (rows ``skipped`` for the
time budget do not count). The run id is ``$EFFNET_RUN_ID`` when set, else, with
``--resume``, the run id of the last row in ``--out``, else a fresh one per invocation.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import models
from .cli import csv_list, positive_int
from .env import (RUN_ID_ENV, collect_versions, cuda_extension_hash, measure_copy_bandwidth, new_run_id,
                  start_triton_usage, triton_tuning_state, triton_usage)
from .jobs import Case, StickyCudaError, first_line, free_memory, is_sticky_cuda_error, prepare_checks, run_provider
from .precision import DTYPES, element_size, precision
from .providers import DEFAULT_PROVIDERS, PROVIDERS
from .records import NETWORK_COLUMNS, append_rows, read_rows
from .roofline import Roofline, measure as measure_roofline
from .timing import TimingConfig

__all__ = ["main", "parse_args", "parse_provider_spec", "plan_size", "DEFAULT_OUT", "EXIT_CUDA_CONTEXT_LOST",
           "resolve_run_id", "done_keys"]

#: Exit code when a CUDA error poisoned the context: rerun with ``--resume`` to continue.
EXIT_CUDA_CONTEXT_LOST = 75

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "results.csv"
_LAYOUT_ALIASES = {"cl": "channels_last", "nhwc": "channels_last", "channels_last": "channels_last", "nchw": "nchw"}


def parse_provider_spec(spec: str) -> tuple[str, str]:
    """``"eager@nchw"`` -> ``("eager", "nchw")``; no ``@layout`` means channels_last."""
    name, _, layout = spec.partition("@")
    layout = layout or "channels_last"
    if layout not in _LAYOUT_ALIASES:
        raise ValueError(f"provider {spec!r}: layout must be one of {sorted(_LAYOUT_ALIASES)}")
    if name not in PROVIDERS:
        raise ValueError(f"provider {spec!r}: name must be one of {sorted(PROVIDERS)}")
    return name, _LAYOUT_ALIASES[layout]


def _provider_spec(text: str) -> tuple[str, str]:
    try:
        return parse_provider_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the benchmark's command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m effnet_kernels bench",
        description="Time EfficientNet B0-B7 inference (and training steps) per provider; "
        "append rows to a CSV. Every provider's output is checked against eager first.",
    )
    p.add_argument("--models", type=csv_list("models"), default=None,
                   help="comma list: b0..b7, timm-b0, torchvision-b0, lukemelas-b0, tiny "
                   "(default: B0-B7 of effnet_kernels.models, timm-b0, torchvision-b0)")
    p.add_argument("--batches", type=csv_list("batches", positive_int), default=[1, 32, 256],
                   help="comma list of batch sizes (default 1,32,256); too large ones shrink to what fits")
    p.add_argument("--dtypes", type=csv_list("dtypes", choices=DTYPES), default=list(DTYPES),
                   help="comma list of fp16, bf16 (autocast), fp32 (TF32 off), tf32 (default: all)")
    p.add_argument("--providers", type=csv_list("providers", _provider_spec),
                   default=[parse_provider_spec(s) for s in DEFAULT_PROVIDERS],
                   help="comma list of provider[@layout] with layout channels_last (default) or nchw; "
                   f"providers: {', '.join(sorted(PROVIDERS))} (default: {','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--skip-max-autotune", action="store_true", help="drop compile-max-autotune (slow to compile)")
    p.add_argument("--skip-compile", action="store_true", help="drop every provider that compiles (torch.compile)")
    p.add_argument("--modes", type=csv_list("modes", choices=("infer", "train")), default=["infer"],
                   help="comma list of infer, train (default infer)")
    p.add_argument("--no-graphs", action="store_true", help="do not also time batch 1 with CUDA graphs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=positive_int, default=None, help="override every model's resolution")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to append to (default {DEFAULT_OUT})")
    p.add_argument("--buffers", type=positive_int, default=4, help="input buffers rotated while timing (default 4)")
    p.add_argument("--warmup-iters", type=positive_int, default=3)
    p.add_argument("--warmup-s", type=float, default=0.5)
    p.add_argument("--min-time-s", type=float, default=1.0, help="time each measurement for about this long")
    p.add_argument("--min-iters", type=positive_int, default=20)
    p.add_argument("--max-iters", type=positive_int, default=500)
    p.add_argument("--copy-mb", type=positive_int, default=1024, help="size of the bandwidth-probe copy in MB")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; once used up, remaining jobs are recorded as skipped (0 = no limit)")
    p.add_argument("--no-fit", action="store_true", help="fail instead of shrinking a batch that does not fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help=f"skip every configuration --out already has a row for in this run (${RUN_ID_ENV}, else "
                   "the last run in --out); after exit code 75 (CUDA context lost) this continues the run")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(list(argv))
    if args.models is None:
        args.models = models.default_models() + ["timm-b0", "torchvision-b0"]
    if args.skip_max_autotune:
        args.providers = [(n, l) for n, l in args.providers if n != "compile-max-autotune"]
    if args.skip_compile:
        args.providers = [(n, l) for n, l in args.providers if not PROVIDERS[n].compiles]
    if not args.providers:
        p.error("--providers: nothing left to run")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    try:
        args.timing = TimingConfig(args.warmup_iters, args.warmup_s, args.min_time_s, args.min_iters, args.max_iters)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _modes_for(args: argparse.Namespace, batch: int) -> list[str]:
    modes = []
    if "infer" in args.modes:
        modes.append("infer")
        if batch == 1 and not args.no_graphs:
            modes.append("infer-graph")
    if "train" in args.modes:
        modes.append("train")
    return modes


def plan_size(args: argparse.Namespace) -> int:
    """How many (model, batch, dtype, provider) jobs the arguments ask for."""
    return len(args.models) * len(args.batches) * len(args.dtypes) * len(args.providers)


_REF_CHUNK = 32


def _leanest(dtypes: Sequence[str]) -> str:
    return min(dtypes, key=lambda d: (element_size(d), d))


def _make_case(name, model, resolution, batch, args, rooflines, copy_bw) -> Case:
    """Inputs, fp32 reference and check data at ``batch``, halving it on out-of-memory unless ``--no-fit``.

    The batch must fit an eager inference forward in the leanest of ``args.dtypes``; a
    provider or precision that needs more memory gets a ``failed: out of memory`` row.
    """
    requested = batch
    while True:
        try:
            # generated on the device (fast at batch 256), once per case: every provider sees the same data
            gen = torch.Generator(args.device).manual_seed(args.seed + batch)
            inputs = [torch.randn(batch, 3, resolution, resolution, generator=gen, device=args.device)
                      for _ in range(args.buffers)]
            with torch.no_grad():
                # does the batch fit? probed in the leanest requested precision
                with precision(_leanest(args.dtypes), args.device):
                    model(inputs[0])
                # the fp32 reference in chunks, so it never decides what fits
                with precision("fp32", args.device):
                    ref = torch.cat([model(x).float() for x in inputs[0].split(_REF_CHUNK)])
            note = "" if batch == requested else f"batch {requested} did not fit (out of memory)"
            case = Case(name, model, resolution, batch, inputs, ref, args.device, rooflines, copy_bw, note)
            return prepare_checks(case, args.seed)
        except torch.cuda.OutOfMemoryError:
            if args.no_fit or batch == 1:
                raise
        # outside the except block, so the traceback no longer pins the activations
        inputs = ref = None
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2


def resolve_run_id(args: argparse.Namespace) -> str:
    """``$EFFNET_RUN_ID``; else, with ``--resume``, the run id of the last row in ``--out``; else a new one."""
    env = os.environ.get(RUN_ID_ENV, "").strip()
    if env:
        return env
    if getattr(args, "resume", False):
        for row in reversed(read_rows(args.out)):
            if row.get("run_id"):
                return row["run_id"]
    return new_run_id()


def _key(model, resolution, batch, dtype, layout, provider, mode) -> tuple:
    return (str(model), "" if resolution is None else str(resolution), str(batch), dtype, layout, provider, mode)


def done_keys(path: Path, run_id: str) -> set[tuple]:
    """(model, resolution, requested batch, dtype, layout, provider, mode) of every row of ``run_id`` in
    ``path``, but rows skipped for the time budget (they were not measured)."""
    keys = set()
    for r in read_rows(path):
        if r.get("run_id") != run_id or r.get("status", "").startswith("skipped: time budget"):
            continue
        batch = r.get("requested_batch") or r.get("batch", "")
        keys.add(_key(r.get("model", ""), r.get("resolution", ""), batch, r.get("dtype", ""), r.get("layout", ""),
                      r.get("provider", ""), r.get("mode", "")))
    return keys


def _progress(args, done: int, total: int, started: float, text: str) -> None:
    if not args.quiet:
        elapsed = time.perf_counter() - started
        print(f"[{done}/{total} {elapsed:6.0f}s] {text}", file=sys.stderr, flush=True)


def _summary_line(row: dict) -> str:
    ips = row.get("img_per_s")
    speed = f"{ips:10.1f} img/s" if isinstance(ips, float) else " " * 16
    return (f"{row['model']:>16} bs={row['batch']:<4} {row['dtype']:<5} {row['layout']:<13} "
            f"{row['provider']:<22} {row['mode']:<11} {speed}  {row['status']}")


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Run the jobs ``args`` describe, appending rows to ``args.out``.

    Returns ``(rows, lost)``: ``lost`` is ``""``, or the error that poisoned the CUDA context
    (the failing job's rows are recorded; the jobs after it are not run and not recorded).
    """
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run_id = args.run_id
    done = done_keys(args.out, run_id) if args.resume else set()
    done_any_res = {k[:1] + k[2:] for k in done}
    versions = collect_versions(device, run_id)
    copy_bw = measure_copy_bandwidth(device, args.copy_mb * 2**20)
    total, count, started = plan_size(args), 0, time.perf_counter()
    _progress(args, 0, total, started,
              f"{versions['gpu']}: copy bandwidth {copy_bw:.0f} GB/s (read + write); run {run_id}"
              + (f"; resuming, {len(done)} rows of this run already in {args.out}" if args.resume else ""))
    all_rows: list[dict] = []

    def emit(rows: list[dict], requested: int, usage: Optional[dict] = None) -> None:
        versions["cuda_ext"] = cuda_extension_hash()  # a fused-cuda job may have just built it
        tune = triton_tuning_state(usage)  # with the config sources of the job's Triton shape classes
        rows = [{**versions, "triton_tune": tune, "requested_batch": requested, **r} for r in rows]
        append_rows(args.out, rows, NETWORK_COLUMNS)
        all_rows.extend(rows)

    def job_done(name, resolution, batch, dtype, prov, layout) -> bool:
        modes = _modes_for(args, batch)
        if resolution is None:
            return all((name, str(batch), dtype, layout, prov, m) in done_any_res for m in modes)
        return all(_key(name, resolution, batch, dtype, layout, prov, m) in done for m in modes)

    def jobs_left(name, resolution, batch) -> list[tuple[str, str, str]]:
        return [(d, p, l) for d in args.dtypes for p, l in args.providers
                if not job_done(name, resolution, batch, d, p, l)]

    def stub_rows(name, resolution, batch, status, jobs) -> list[dict]:
        """Rows without measurements (skipped or failed before any provider ran)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return [{"model": name, "resolution": resolution if resolution is not None else "", "batch": batch,
                 "dtype": dtype, "layout": layout, "provider": prov, "mode": mode, "status": status, "timestamp": stamp}
                for dtype, prov, layout in jobs for mode in _modes_for(args, batch)]

    def out_of_time() -> bool:
        return args.time_budget > 0 and time.perf_counter() - started > args.time_budget

    budget_note = f"skipped: time budget of {args.time_budget:.0f} s used up"
    per_batch = len(args.dtypes) * len(args.providers)
    for name in args.models:
        known_res = args.resolution or models.native_resolution(name)
        if args.resume and not any(jobs_left(name, known_res, b) for b in args.batches):
            count += per_batch * len(args.batches)
            _progress(args, count, total, started, f"{name}: done in this run already (--resume)")
            continue
        if out_of_time():  # not even built: B7's build and calibration take seconds
            for batch in args.batches:
                emit(stub_rows(name, known_res, batch, budget_note, jobs_left(name, known_res, batch)), batch)
            count += per_batch * len(args.batches)
            continue
        try:
            model, resolution = models.build_model(name, seed=args.seed, device=device, resolution=args.resolution)
            resolution = args.resolution or resolution
            # one counting pass on the meta device: bytes scale with the element size
            per_elem = measure_roofline(model, resolution, 1)
            rooflines = {size: Roofline(per_elem.bytes_per_image * size, per_elem.flops_per_image) for size in (2, 4)}
        except Exception as exc:
            model = None
            reason = f"skipped: {exc}" if isinstance(exc, models.ModelUnavailable) else f"failed: build: {first_line(exc)}"
            for batch in args.batches:
                emit(stub_rows(name, known_res, batch, reason, jobs_left(name, known_res, batch)), batch)
            count += per_batch * len(args.batches)
            _progress(args, count, total, started, f"{name}: {reason}")
            if is_sticky_cuda_error(exc, device):
                return all_rows, first_line(exc)
            continue
        for batch in args.batches:
            jobs = jobs_left(name, resolution, batch)
            if not jobs:
                count += per_batch
                continue
            count += per_batch - len(jobs)
            if out_of_time():
                emit(stub_rows(name, resolution, batch, budget_note, jobs), batch)
                count += len(jobs)
                continue
            try:
                case = _make_case(name, model, resolution, batch, args, rooflines, copy_bw)
            except Exception as exc:
                emit(stub_rows(name, resolution, batch, f"failed: reference: {first_line(exc)}", jobs), batch)
                count += len(jobs)
                if is_sticky_cuda_error(exc, device):
                    return all_rows, first_line(exc)
                continue
            for dtype, prov, layout in jobs:
                usage = None
                if out_of_time():
                    rows = stub_rows(name, resolution, case.batch, budget_note, [(dtype, prov, layout)])
                else:
                    start_triton_usage()
                    try:
                        rows = run_provider(case, dtype, prov, layout, _modes_for(args, case.batch), args.timing)
                    except StickyCudaError as exc:
                        emit(exc.rows, batch, triton_usage())
                        count += 1
                        for r in exc.rows:
                            _progress(args, count, total, started, _summary_line(r))
                        return all_rows, str(exc)
                    usage = triton_usage()
                emit(rows, batch, usage)
                count += 1
                for r in rows:
                    _progress(args, count, total, started, _summary_line(r))
            del case
            free_memory(device)
        del model
        free_memory(device)
    return all_rows, ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m effnet_kernels bench``: 0 when no row failed, 1 when some did,
    :data:`EXIT_CUDA_CONTEXT_LOST` (75) when a CUDA error poisoned the context (rerun with ``--resume``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.run_id = resolve_run_id(args)
    if args.dry_run:
        done = len(done_keys(args.out, args.run_id)) if args.resume else 0
        print(f"{plan_size(args)} jobs: models={args.models} batches={args.batches} dtypes={args.dtypes} "
              f"providers={['@'.join(p) for p in args.providers]} modes={args.modes} device={args.device} -> {args.out}"
              f" (run {args.run_id}" + (f", resume: {done} rows of this run already there)" if args.resume else ")"))
        return 0
    rows, lost = run(args)
    print("\n".join(_summary_line(r) for r in rows))
    failed = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    print(f"{len(rows)} rows appended to {args.out} (run {args.run_id}); {len(failed)} failed", file=sys.stderr)
    if lost:
        print(f"CUDA context lost ({lost}): the failing job is recorded, the jobs after it are not; rerun the same "
              f"command with --resume and {RUN_ID_ENV}={args.run_id} to continue (exit {EXIT_CUDA_CONTEXT_LOST})",
              file=sys.stderr)
        return EXIT_CUDA_CONTEXT_LOST
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
