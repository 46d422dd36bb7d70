"""The command line both CPU-counted tables share (``benchmarks.memory``, ``benchmarks.traffic``).

Each counts B0-B7 (or ``--models``) eager vs converted, appends two CSV rows per model, and
writes the whole CSV's markdown table (and, with ``--readme``, the same text between the
table's markers in the README). :func:`parser` holds the common flags, :func:`run` the loop
and the writing; a tool supplies its per-model measurement and its table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["parser", "run"]


def parser(prog: str, description: str, *, dtypes: Sequence[str], default_dtype: str, dtype_help: str,
           layouts: Sequence[str], csv: Path, md: Path, marks: tuple[str, str], verb: str) -> argparse.ArgumentParser:
    """The flags every counted table takes: ``--models --batch --dtype --memory-format --csv --md
    --readme --report-only`` (``verb``: "measured" or "counted", for the help texts)."""
    from .models import default_models

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--models", default=",".join(m.split("_")[-1] for m in default_models()) or "b0",
                   help="comma-separated benchmark model names (default b0..b7)")
    p.add_argument("--batch", type=int, default=8, help=f"N: {verb} at N and 2N (default 8)")
    p.add_argument("--dtype", choices=sorted(dtypes), default=default_dtype, help=dtype_help)
    p.add_argument("--memory-format", choices=sorted(layouts), default="channels_last", dest="layout")
    p.add_argument("--csv", type=Path, default=csv, help="CSV to append to")
    p.add_argument("--md", type=Path, default=md, help="markdown table (whole CSV)")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also put the markdown between {marks[0]} and {marks[1]} in this file (e.g. README.md)")
    p.add_argument("--report-only", action="store_true", help=f"{'measure' if verb == 'measured' else 'count'} "
                   "nothing: markdown from the CSV")
    return p


def run(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], *,
        measure: Callable[[argparse.Namespace, str, dict], list[dict]], columns: Sequence[str],
        table: Callable[[list[dict]], str], title: str, marks: tuple[str, str]) -> int:
    """Parse ``argv``; unless ``--report-only``, ``measure(args, model, versions)`` each model (its CSV
    rows, having printed its one-line summary; a ValueError names a bad ``--models`` entry) and
    append the rows; then write ``title`` +
    ``table(all rows)`` to ``--md`` (and ``--readme``). Returns the exit status."""
    from .env import collect_versions
    from .records import append_rows, read_rows
    from .report import update_readme

    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if not args.report_only:
        versions = collect_versions("cpu")
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            try:
                rows = measure(args, name, versions)
            except ValueError as exc:
                print(f"error: --models: {exc}", file=sys.stderr)
                return 2
            append_rows(args.csv, rows, columns)
    text = title + "\n\n" + table(read_rows(args.csv))
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text)
    if args.readme:
        try:
            update_readme(args.readme, text, start=marks[0], end=marks[1])
        except ValueError as exc:
            print(f"error: --readme: {exc}", file=sys.stderr)
            return 2
    return 0
