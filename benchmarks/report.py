"""Turn ``results.csv`` (and ``ops.csv``) into markdown tables and matplotlib plots.

``python -m benchmarks.report [--csv F] [--ops-csv F] [--md OUT] [--plots-dir DIR]``

Tables: one per (run, GPU, mode, precision, batch), a row per model and a column per
provider@layout, each cell ``img/s (speedup over eager channels_last, % of the
bandwidth bound)``. Numbers from different runs (``run_id``) are never divided by one
another: a speedup is only shown against the eager row of the same run, and every table
says which run its rows are from (rows written before run ids existed form a run of their
own, ``unrecorded``, and get no speedups: nothing says they were measured together). When
a configuration was measured more than once in a run, the last row wins. Runs are listed
newest first (run ids start with their UTC start time); ``--runs N`` keeps the N newest.
Plots (PNG, matplotlib imported only here): images/s per model per provider, and the
speedup over eager, one figure per (run, GPU, mode, precision, batch).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

from .records import read_rows

__all__ = ["main", "latest", "network_tables", "ops_table", "plot_network", "update_readme", "BASELINE", "runs",
           "run_of", "keep_runs", "UNRECORDED"]

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = ("eager", "channels_last")
MARK_START = "<!-- results:begin -->"
MARK_END = "<!-- results:end -->"
_KEY = ("run_id", "gpu", "model", "resolution", "batch", "dtype", "layout", "provider", "mode")
_OP_KEY = ("run_id", "gpu", "op", "shape", "dtype", "layout", "provider")
UNRECORDED = "unrecorded"


def run_of(row: dict) -> str:
    """The row's run id (:data:`UNRECORDED` for rows written before run ids existed)."""
    return row.get("run_id") or UNRECORDED


def runs(rows: Iterable[dict]) -> list[str]:
    """The run ids of ``rows``, newest first (:data:`UNRECORDED` last)."""
    ids = {run_of(r) for r in rows}
    return sorted(ids - {UNRECORDED}, reverse=True) + ([UNRECORDED] if UNRECORDED in ids else [])


def keep_runs(rows: list[dict], newest: int) -> list[dict]:
    """Only the rows of the ``newest`` most recent runs (all when ``newest`` <= 0)."""
    if newest <= 0:
        return rows
    keep = set(runs(rows)[:newest])
    return [r for r in rows if run_of(r) in keep]


def latest(rows: Iterable[dict], key: Sequence[str] = _KEY) -> list[dict]:
    """One row per configuration ``key``: the last one in file order."""
    out: "OrderedDict[tuple, dict]" = OrderedDict()
    for row in rows:
        k = tuple(row.get(c, "") for c in key)
        out.pop(k, None)
        out[k] = row
    return list(out.values())


def _float(value: str | None) -> float | None:
    try:
        v = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return v if v is None or v == v else None


def _order(values: Iterable[str]) -> list[str]:
    def key(v: str):
        m = re.fullmatch(r"b(\d)", v)
        return (0, int(m.group(1)), v) if m else (1, 0, v)

    return sorted(set(values), key=key)


def _groups(rows: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    """(run, GPU, mode, precision, batch) -> rows; runs newest first."""
    order = {run: i for i, run in enumerate(runs(rows))}
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for row in sorted(rows, key=lambda r: (order[run_of(r)], r["gpu"], r["mode"], r["dtype"], int(r["batch"] or 0))):
        groups.setdefault((run_of(row), row["gpu"], row["mode"], row["dtype"], row["batch"]), []).append(row)
    return groups


def _column(row: dict) -> str:
    return f"{row['provider']}@{row['layout']}"


def _columns(rows: list[dict]) -> list[str]:
    """provider@layout columns, eager first (the baseline), then by name."""
    return sorted({_column(r) for r in rows}, key=lambda c: (not c.startswith("eager@"), c))


def _speedups(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(model, column) -> img/s over the eager channels_last img/s of the same model in the same run.

    Rows without a run id get none: they may come from different runs."""
    base = {(run_of(r), r["model"]): _float(r["img_per_s"]) for r in rows
            if (r["provider"], r["layout"]) == BASELINE and run_of(r) != UNRECORDED}
    out = {}
    for r in rows:
        ips, b = _float(r["img_per_s"]), base.get((run_of(r), r["model"]))
        if ips is not None and b:
            out[(r["model"], _column(r))] = ips / b
    return out


def _run_line(run: str, group: list[dict]) -> str:
    if run == UNRECORDED:
        return "Run: unrecorded (rows written before run ids; no speedups: they may come from different runs)."
    first = group[0]
    src = first.get("src_hash") or "?"
    ext = first.get("cuda_ext") or "not built"
    return (f"Run `{run}`: every row of this table; python {first.get('python') or '?'}, nvcc "
            f"{first.get('nvcc') or 'none'}, sources {src}, CUDA extension {ext}, Triton tuning "
            f"{first.get('triton_tune') or '?'}.")


def _cell(row: dict | None, speedup: float | None) -> str:
    if row is None:
        return ""
    status = row.get("status", "")
    if status != "ok":
        return status.split(":")[0]  # "failed" / "skipped"; the reason is in the CSV
    ips = float(row["img_per_s"])
    text = f"{ips:,.0f}" if ips >= 100 else f"{ips:.3g}"
    extras = []
    if speedup is not None:
        extras.append(f"{speedup:.2f}x")
    frac = _float(row.get("frac_of_bound"))
    if frac is not None:
        extras.append(f"{100 * frac:.0f}%")
    return text + (f" ({', '.join(extras)})" if extras else "")


def network_tables(rows: list[dict]) -> str:
    """Markdown: a section per (GPU, mode, precision, batch) of the latest rows."""
    rows = latest(rows)
    if not rows:
        return "_no network results_\n"
    parts = []
    for (run, gpu, mode, dtype, batch), group in _groups(rows).items():
        first = group[0]
        columns = _columns(group)
        speed = _speedups(group)
        parts.append(
            f"#### {gpu} · {mode} · {dtype} · batch {batch} · run {run}\n\n"
            f"{_run_line(run, group)} "
            f"torch {first['torch']}, CUDA {first['cuda']}, cuDNN {first['cudnn']}, Triton {first['triton']}, "
            f"driver {first['driver']}, commit {first['commit']}; copy bandwidth {first['copy_gb_per_s']} GB/s. "
            "Cells: images/s (speedup over eager channels_last of the same run, % of the activation-bandwidth bound).\n"
        )
        header = ["model", "act MB/img", "bound img/s"] + columns
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in _order(r["model"] for r in group):
            by_col = {_column(r): r for r in group if r["model"] == model}
            any_row = next(iter(by_col.values()))
            mb, bound = _float(any_row.get("act_mb_per_img")), _float(any_row.get("bound_img_per_s"))
            cells = [model, f"{mb:.1f}" if mb else "", f"{bound:,.0f}" if bound else ""]
            cells += [_cell(by_col.get(c), speed.get((model, c))) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def ops_table(rows: list[dict]) -> str:
    """Markdown: per (GPU, precision, layout), the geometric-mean speedup over eager of each
    provider per op, then one row per (op, shape) with a ``µs (GB/s, % of copy, speedup)``
    cell per provider."""
    rows = latest(rows, _OP_KEY)
    if not rows:
        return "_no op results_\n"
    parts = []
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    order = {run: i for i, run in enumerate(runs(rows))}
    for r in sorted(rows, key=lambda r: order[run_of(r)]):  # stable: file order within a run
        groups.setdefault((run_of(r), r["gpu"], r["dtype"], r["layout"]), []).append(r)
    for (run, gpu, dtype, layout), group in groups.items():
        providers = sorted({r["provider"] for r in group}, key=lambda p: (p != "eager", p))
        summary = []
        for op in _order(r["op"] for r in group):
            for prov in providers:
                sp = [_float(r.get("speedup_vs_eager")) for r in group if r["op"] == op and r["provider"] == prov]
                sp = [v for v in sp if v]
                if sp and prov != "eager":
                    gmean = math.exp(sum(math.log(v) for v in sp) / len(sp))
                    summary.append(f"{op} {prov} {gmean:.2f}x ({len(sp)} shapes)")
        parts.append(f"#### {gpu} · {dtype} · {layout} · run {run}\n\n"
                     + ("Geometric-mean speedup over eager: " + "; ".join(summary) + ".\n\n" if summary else "")
                     + "Cells: µs p50 (GB/s at the minimum bytes, % of the copy bandwidth, speedup over eager).\n")
        header = ["op", "shape"] + providers
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        keys = list(OrderedDict.fromkeys((r["op"], r["shape"]) for r in group))
        for op, shape in keys:
            by = {r["provider"]: r for r in group if (r["op"], r["shape"]) == (op, shape)}
            lines.append("| " + " | ".join([op, shape] + [_op_cell(by.get(p)) for p in providers]) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _op_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row.get("status") != "ok":
        return row.get("status", "").split(":")[0]
    us, gbs = _float(row.get("us_p50")), _float(row.get("gb_per_s"))
    frac, sp = _float(row.get("frac_of_copy")), _float(row.get("speedup_vs_eager"))
    extras = [f"{gbs:.0f} GB/s" if gbs else "", f"{100 * frac:.0f}%" if frac else "", f"{sp:.2f}x" if sp else ""]
    return f"{us:.1f}" + (f" ({', '.join(e for e in extras if e)})" if any(extras) else "")


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def plot_network(rows: list[dict], out_dir: Path) -> list[Path]:
    """Bar charts of images/s and speedup over eager per model and provider; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (run, gpu, mode, dtype, batch), group in _groups(latest(rows)).items():
        ok = [r for r in group if r.get("status") == "ok"]
        if not ok:
            continue
        models = _order(r["model"] for r in ok)
        columns = _columns(ok)
        speed = _speedups(ok)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(models) + 4), 4.5))
        width = 0.8 / max(1, len(columns))
        for j, col in enumerate(columns):
            xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(models))]
            ips = [next((float(r["img_per_s"]) for r in ok if r["model"] == m and _column(r) == col), 0.0) for m in models]
            ax1.bar(xs, ips, width, label=col)
            ax2.bar(xs, [speed.get((m, col), 0.0) for m in models], width, label=col)
        for ax, title in ((ax1, "images/s"), (ax2, "speedup over eager channels_last")):
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models)
            ax.set_title(title)
        ax1.set_yscale("log")
        ax2.axhline(1.0, color="black", linewidth=0.8)
        ax2.legend(fontsize="small")
        fig.suptitle(f"{gpu} · {mode} · {dtype} · batch {batch} · run {run}")
        fig.tight_layout()
        path = out_dir / f"plot_{_slug(gpu, mode, dtype, 'bs' + str(batch), run)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Write the markdown report (stdout or ``--md``) and the plots; 0 on success."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=RESULTS / "results.csv", help="network results CSV")
    p.add_argument("--ops-csv", type=Path, default=RESULTS / "ops.csv", help="op results CSV (skipped if missing)")
    p.add_argument("--md", type=Path, default=None, help="write the markdown here instead of stdout")
    p.add_argument("--plots-dir", type=Path, default=RESULTS, help="where the PNGs go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--runs", type=int, default=0, help="only the N most recent runs (default 0: all)")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also put the markdown between {MARK_START} and {MARK_END} in this file (e.g. README.md)")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not args.csv.exists() and not args.ops_csv.exists():
        print(f"error: --csv: {args.csv} does not exist (and no --ops-csv {args.ops_csv})", file=sys.stderr)
        return 2
    net_rows = keep_runs(read_rows(args.csv), args.runs)
    op_rows = keep_runs(read_rows(args.ops_csv), args.runs)
    text = "### Network benchmarks\n\n" + network_tables(net_rows)
    if op_rows:
        text += "\n### Op benchmarks\n\n" + ops_table(op_rows)
    if not args.no_plots and net_rows:
        try:
            paths = plot_network(net_rows, args.plots_dir)
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib): no plots", file=sys.stderr)
        else:
            base = args.md.parent if args.md else Path.cwd()
            text += "\n### Plots\n\n" + "".join(f"![{p.stem}]({_rel(p, base)})\n" for p in paths)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    else:
        sys.stdout.write(text)
    if args.readme:
        try:
            update_readme(args.readme, text if args.md is None else _relink(text, args.md.parent, args.readme.parent))
        except ValueError as exc:
            print(f"error: --readme: {exc}", file=sys.stderr)
            return 2
    return 0


def _relink(text: str, old_base: Path, new_base: Path) -> str:
    """Rewrite the plots' relative links from ``old_base`` to ``new_base``."""
    def fix(m: "re.Match[str]") -> str:
        return f"]({_rel(old_base / m.group(1), new_base)})"

    return re.sub(r"\]\(([^)]+\.png)\)", fix, text)


def update_readme(path: Path, text: str, *, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace what lies between the ``start`` and ``end`` marker lines of ``path``
    (default :data:`MARK_START` / :data:`MARK_END`; :mod:`benchmarks.memory` has its own)."""
    marker_start, marker_end = start, end
    content = path.read_text() if path.exists() else ""
    start_at, end_at = content.find(marker_start), content.find(marker_end)
    if start_at < 0 or end_at < start_at:
        raise ValueError(f"{path} must contain a line {marker_start} followed by a line {marker_end}")
    path.write_text(content[: start_at + len(marker_start)] + "\n" + text.rstrip("\n") + "\n" + content[end_at:])


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
