"""Write ``effnet_kernels/auto_backends.json`` from measured op benchmarks.

    python -m benchmarks.auto_table [benchmarks/results/ops.csv ...] [--out PATH]

For every shape class (:func:`effnet_kernels.auto_table.shape_class`) it compares the
``triton`` and ``cuda`` rows with status ``ok`` measured in the same run (``run_id``) on
the same GPU, shape, dtype and layout (times from different runs are never compared), and
records the backend with the smaller total median time. Classes where
only one backend has measurements take that one; classes with none are left out (auto
then uses its fixed order).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from effnet_kernels.auto_table import TABLE_PATH, pointwise_class, shape_class, stored_layout

from .op_cases import parse_pointwise_shape
from .records import read_rows

BACKENDS = ("triton", "cuda")
DEFAULT_CSV = Path(__file__).with_name("results") / "ops.csv"


def _parse_shape(shape: str) -> tuple[int, int, int, int, str]:
    """``"NxCxHxW/k3s2"`` or ``"NxCxHxW/r48"`` -> (n, c, h, w, suffix) (pointwise shapes:
    :func:`benchmarks.op_cases.parse_pointwise_shape`)."""
    dims, _, suffix = shape.partition("/")
    n, c, h, w = (int(v) for v in dims.split("x"))
    return n, c, h, w, suffix


def classes_of_row(row: dict) -> list[str]:
    """The shape classes a benchmark row decides (an "se" row decides se_excite and se_gate,
    a "pointwise" row its ``pw/...`` class)."""
    if row["op"] == "pointwise":
        case = parse_pointwise_shape(row["shape"])
        layout = stored_layout(row["layout"], case.c, case.h, case.w)
        return [pointwise_class(row["dtype"], layout, case.n, case.c, case.h, case.w, case.cout,
                                case.gate, case.residual, pool=case.pool)]
    n, c, h, w, suffix = _parse_shape(row["shape"])
    layout = stored_layout(row["layout"], c, h, w)  # x's (dwconv) / y's (se) layout as the op call sees it
    if row["op"] == "dwconv":
        k, stride = (int(v) for v in suffix[1:].split("s"))
        ho = (h + 2 * (k // 2) - k) // stride + 1
        wo = (w + 2 * (k // 2) - k) // stride + 1
        return [shape_class("dwconv", row["dtype"], layout, n * c * ho * wo, k, stride)]
    if row["op"] == "se":
        return [shape_class("se", row["dtype"], layout, n * c * h * w),
                shape_class("se_gate", row["dtype"], "any", n * c)]
    return []


def build_table(rows: Iterable[dict]) -> tuple[dict[str, str], list[str]]:
    """(``{class: fastest backend}``, GPUs measured) from op-benchmark rows."""
    # (class, gpu, run, shape, dtype, layout) -> {backend: us}
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)
    gpus = set()
    for row in rows:
        if row.get("status") != "ok" or row.get("provider") not in BACKENDS:
            continue
        try:
            us = float(row["us_p50"])
            keys = classes_of_row(row)
        except (KeyError, ValueError):
            continue
        gpus.add(row.get("gpu", ""))
        for key in keys:
            cases[(key, row.get("gpu", ""), row.get("run_id", ""), row["shape"], row["dtype"], row["layout"])][row["provider"]] = us
    # Totals over the cases where both backends were measured; a class where only one
    # backend ever ran takes that one.
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    single: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (key, *_), times in cases.items():
        target = totals if all(b in times for b in BACKENDS) else single
        for backend, us in times.items():
            target[key][backend] += us
    for key, per_backend in single.items():
        if key not in totals and len(per_backend) == 1:
            totals[key] = per_backend
    table = {key: min(per_backend, key=per_backend.get) for key, per_backend in sorted(totals.items())}
    return table, sorted(g for g in gpus if g)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auto_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", default=[str(DEFAULT_CSV)], help="op benchmark CSVs")
    p.add_argument("--out", default=str(TABLE_PATH), help="where to write the table")
    args = p.parse_args(argv)
    rows = [row for path in args.csv for row in read_rows(path)]
    table, gpus = build_table(rows)
    Path(args.out).write_text(json.dumps(
        {"version": 1, "source": ", ".join(args.csv), "measured_on": gpus, "classes": table},
        indent=1, sort_keys=True) + "\n")
    print(f"{len(table)} shape classes from {len(rows)} rows ({', '.join(gpus) or 'no GPU rows'}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
