"""CSV result files: fixed leading columns, appended to across runs.

Both files start with the version and provenance columns of :data:`benchmarks.env.VERSION_COLUMNS`
(versions, commit, source hash, CUDA-extension build, Triton tuning state, ``run_id``).

Appending to a file written with the same header adds rows. When the existing header
differs (an older or newer column set), the file is rewritten with the union of the
columns, old rows keeping their values and new columns left empty, so no run is lost.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .env import VERSION_COLUMNS

__all__ = ["NETWORK_COLUMNS", "OPS_COLUMNS", "append_rows", "read_rows", "format_value"]

NETWORK_COLUMNS: tuple[str, ...] = VERSION_COLUMNS + (
    "model", "resolution", "batch", "requested_batch", "dtype", "layout", "provider", "mode",
    "img_per_s", "ms_p20", "ms_p50", "ms_p80", "peak_mem_mb", "status",
    "max_rel_err", "sensitivity", "checks", "act_mb_per_img", "gflops_per_img", "copy_gb_per_s",
    "bound_img_per_s", "frac_of_bound", "iters", "note", "timestamp",
)

OPS_COLUMNS: tuple[str, ...] = VERSION_COLUMNS + (
    "op", "model", "shape", "dtype", "layout", "provider", "us_p20", "us_p50", "us_p80",
    "min_bytes", "gb_per_s", "copy_gb_per_s", "frac_of_copy", "speedup_vs_eager",
    "max_rel_err", "status", "iters", "timestamp",
)


def format_value(value: object) -> str:
    """CSV text for a value: floats with 6 significant digits, ``None`` as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"  # NaN -> empty
    return str(value)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a CSV file as dicts (``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (created with ``columns`` as header if new).

    Keys of a row that are not in the header raise ``ValueError``; missing keys are
    written empty.
    """
    path = Path(path)
    rows = list(rows)
    existing = _header(path)
    header = list(columns) if existing is None else existing
    if existing is not None and existing != list(columns):
        header = existing + [c for c in columns if c not in existing]
    for row in rows:
        unknown = set(row) - set(header)
        if unknown:
            raise ValueError(f"rows has keys that are not CSV columns: {sorted(unknown)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if existing is not None and header != existing:
        old = read_rows(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(old)
            writer.writerows({k: format_value(v) for k, v in row.items()} for row in rows)
        os.replace(tmp, path)
        return
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if existing is None:
            writer.writeheader()
        writer.writerows({k: format_value(v) for k, v in row.items()} for row in rows)


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.records SRC.csv... [--into DIR]``: append each file's rows to
    ``DIR/<same name>`` (default ``benchmarks/results/``), e.g. the CSVs a GPU session returned."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m benchmarks.records", description=main.__doc__)
    p.add_argument("sources", nargs="+", type=Path, help="CSV files to append")
    p.add_argument("--into", type=Path, default=RESULTS_DIR, help=f"target folder (default {RESULTS_DIR})")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    for src in args.sources:
        if not src.is_file():
            print(f"error: sources: {src} is not a file", file=sys.stderr)
            return 2
    for src in args.sources:
        rows = read_rows(src)
        header = _header(src) or []
        dst = args.into / src.name
        if dst.resolve() == src.resolve():
            print(f"error: sources: {src} is its own target", file=sys.stderr)
            return 2
        append_rows(dst, rows, header)
        print(f"{len(rows)} rows of {src} appended to {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
