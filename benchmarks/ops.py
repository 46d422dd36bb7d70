"""Op benchmark runner: ``python -m benchmarks.ops [args]`` appends rows to ``ops.csv``.

For every distinct B0-B7 layer shape (see :mod:`benchmarks.op_cases`), precision,
layout and provider it checks the output against a float64 reference (the gate of
:mod:`benchmarks.gate`: at most ``max(floor, 3 x eager's error)``), then times the op
with CUDA events over rotated input buffers and records µs, GB/s against the minimum
bytes, the fraction of the measured copy bandwidth and the speedup over the eager chain.

``--order classes`` runs first one shape of every auto-table shape class
(:func:`effnet_kernels.auto_table.shape_class`, the first shape of each in block order), then
the rest in block order: a ``--time-budget`` too short for every shape still measures every
class :mod:`benchmarks.auto_table` decides (B0-B7 at batch 32 in fp16 channels_last: 34
classes, decided by 36 of the 377 shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from effnet_kernels import BackendUnavailableError

from . import gate
from .env import collect_versions, measure_copy_bandwidth, start_triton_usage, triton_tuning_state, triton_usage
from .jobs import LAYOUTS, first_line
from .cli import csv_list, positive_int
from .op_cases import DTYPES, OP_PROVIDERS, OPS, OpCase, cases_for_models, make_call, make_inputs, reference
from .records import OPS_COLUMNS, append_rows
from .timing import TimingConfig, time_calls

__all__ = ["main", "run_case", "check_output", "main_output", "configure_device", "classes_first", "DEFAULT_OUT"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ops.csv"
_MIN_ROTATED_BYTES = 256 * 2**20  # well past an H100/H200's 50-60 MB L2
_MAX_BUFFERS = 32


def _buffers_for(case: OpCase, element_size: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    per = max(1, case.min_bytes(element_size))
    return max(2, min(_MAX_BUFFERS, -(-_MIN_ROTATED_BYTES // per)))


def classes_first(cases: Sequence[OpCase], dtype: str = "fp16", layout: str = "channels_last") -> list[OpCase]:
    """``cases`` with the first case of each auto-table shape class moved to the front (both
    parts keep their order); cases whose rows decide no class stay in the rest."""
    from .auto_table import classes_of_row

    seen, first, rest = set(), [], []
    for case in cases:
        keys = set(classes_of_row({"op": case.op, "shape": case.shape, "dtype": dtype, "layout": layout}))
        if keys - seen:
            seen |= keys
            first.append(case)
        else:
            rest.append(case)
    return first + rest


def configure_device(device: torch.device) -> None:
    """Backend settings of the run, as in the network benchmark: ``cudnn.benchmark=True`` on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def main_output(out) -> torch.Tensor:
    """The op's main tensor (dwconv returns ``(y, mean)``)."""
    return out[0] if isinstance(out, tuple) else out


def check_output(case: OpCase, out, ref: torch.Tensor, dtype: str, eager_err: float) -> gate.GateResult:
    """Gate an op's output (and, for dwconv, its means) against the float64 reference."""
    result = gate.check(main_output(out), ref, dtype, eager_err)
    if result.ok and case.op == "dwconv":
        # fused: fp32 [N, C]; eager: [N, C, 1, 1] in y's dtype (what the eager SE consumes)
        means = out[1]
        if isinstance(means, torch.Tensor) and means.dim() == 4 and tuple(means.shape[2:]) == (1, 1):
            means = means[:, :, 0, 0]
        mean = gate.check(means, ref.mean((2, 3)), dtype, eager_err)
        if not mean.ok:
            return gate.GateResult(False, mean.err, mean.limit)
    return result


def run_case(case: OpCase, dtype: str, layout: str, providers: Sequence[str], device: torch.device,
             cfg: TimingConfig, copy_gb_per_s: float, seed: int = 0) -> list[dict]:
    """Rows (one per provider) for ``case`` in precision ``dtype`` and ``layout``."""
    tdtype = DTYPES[dtype]
    es = torch.tensor([], dtype=tdtype).element_size()
    gen = torch.Generator(device).manual_seed(seed)
    n_buf = _buffers_for(case, es, device)
    inputs = [make_inputs(case, tdtype, LAYOUTS[layout], device, gen) for _ in range(n_buf)]
    ref = reference(case, inputs[0])
    min_bytes = case.min_bytes(es)
    eager_err = gate.rel_err(main_output(make_call(case, "eager", inputs[0])()), ref)
    rows, eager_us = [], None
    for provider in ["eager"] + [p for p in providers if p != "eager"]:
        row = {"op": case.op, "model": case.model, "shape": case.shape, "dtype": dtype, "layout": layout,
               "provider": provider, "min_bytes": min_bytes, "copy_gb_per_s": copy_gb_per_s,
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            calls = [make_call(case, provider, inp) for inp in inputs]
            result = check_output(case, calls[0](), ref, dtype, eager_err)
            row["max_rel_err"] = result.err
            if not result.ok:
                row["status"] = f"failed: {result.reason}"
            else:
                timing = time_calls(lambda i: calls[i](), n_buf, device, cfg)
                us = timing.ms_p50 * 1e3
                gbs = min_bytes / (us * 1e-6) / 1e9
                eager_us = us if provider == "eager" else eager_us
                row.update(us_p20=timing.ms_p20 * 1e3, us_p50=us, us_p80=timing.ms_p80 * 1e3, iters=timing.iters,
                           gb_per_s=gbs, frac_of_copy=gbs / copy_gb_per_s if copy_gb_per_s > 0 else None,
                           speedup_vs_eager=eager_us / us if eager_us else None, status="ok")
        except BackendUnavailableError as exc:
            row["status"] = f"skipped: {str(exc).splitlines()[0][:300]}"
        except Exception as exc:
            row["status"] = f"failed: {first_line(exc)}"
        if provider == "eager" and "eager" not in providers:
            continue  # timed only as the speedup baseline
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the op benchmarks the arguments select; 0 when no row failed."""
    from effnet_kernels.models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=csv_list("models", choices=MODEL_NAMES), default=list(MODEL_NAMES))
    p.add_argument("--ops", type=csv_list("ops", choices=OPS), default=list(OPS))
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--resolution", type=positive_int, default=None, help="override the native resolutions")
    p.add_argument("--dtypes", type=csv_list("dtypes", choices=tuple(DTYPES)), default=["fp16"])
    p.add_argument("--layouts", type=csv_list("layouts", choices=tuple(LAYOUTS)), default=["channels_last"])
    p.add_argument("--providers", type=csv_list("providers", choices=OP_PROVIDERS), default=["eager", "triton", "cuda"])
    p.add_argument("--order", choices=("blocks", "classes"), default="blocks",
                   help="blocks: model by model, block by block; classes: one shape per auto-table class first")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N shapes (after --order)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--warmup-s", type=float, default=0.05)
    p.add_argument("--min-time-s", type=float, default=0.1)
    p.add_argument("--min-iters", type=positive_int, default=10)
    p.add_argument("--max-iters", type=positive_int, default=200)
    p.add_argument("--copy-mb", type=positive_int, default=1024)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; stop starting new cases after this (0 = no limit)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    device = torch.device(args.device)
    configure_device(device)
    cfg = TimingConfig(3, args.warmup_s, args.min_time_s, args.min_iters, args.max_iters)
    cases = cases_for_models(args.models, args.batch, args.ops, args.resolution)
    if args.order == "classes":
        cases = classes_first(cases, args.dtypes[0], args.layouts[0])
    cases = cases[: args.limit]
    versions = collect_versions(device)
    copy_bw = measure_copy_bandwidth(device, args.copy_mb * 2**20)
    total, failed, started = len(cases) * len(args.dtypes) * len(args.layouts), 0, time.perf_counter()
    done = 0
    for case in cases:
        for dtype in args.dtypes:
            for layout in args.layouts:
                if args.time_budget > 0 and time.perf_counter() - started > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s used up: {total - done} cases not run", file=sys.stderr)
                    print(f"{done} cases appended to {args.out}; {failed} rows failed", file=sys.stderr)
                    return 1 if failed else 0
                start_triton_usage()
                rows = [{**versions, **r} for r in run_case(case, dtype, layout, args.providers, device, cfg, copy_bw)]
                tune = triton_tuning_state(triton_usage())  # only the triton row launched Triton kernels
                rows = [{**r, "triton_tune": tune} if r["provider"] == "triton" else r for r in rows]
                append_rows(args.out, rows, OPS_COLUMNS)
                done += 1
                failed += sum(r["status"].startswith("failed") for r in rows)
                if not args.quiet:
                    cells = "  ".join(
                        f"{r['provider']}: " + (f"{r['us_p50']:.1f}us {r['gb_per_s']:.0f}GB/s" if r["status"] == "ok" else r["status"][:60])
                        for r in rows)
                    print(f"[{done}/{total} {time.perf_counter() - started:5.0f}s] {case.op} {case.shape} {dtype} {layout}: {cells}",
                          file=sys.stderr, flush=True)
    print(f"{done} cases appended to {args.out}; {failed} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
