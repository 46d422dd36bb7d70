"""Writing the audit: the full CSV (one row per launch) and a markdown summary (one row per compiled variant)."""

from __future__ import annotations

import csv
import datetime
import io
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from . import hardware, sass
from .invariants import MIN_CONV_WARPS_PER_SM, MIN_GEMM_WARPS_PER_SM, MIN_WARPS_PER_SM, audit_invariant_violations
from .rows import COLUMNS

#: Columns that identify one compiled variant (and its static properties) in the markdown summary.
VARIANT_KEY = ("backend", "kernel", "op", "dtype", "layout", "k", "stride", "config", "regs", "spill_store_B",
               "spill_load_B", "static_smem_B", "dynamic_smem_B", "ctas_per_sm", "warps_per_sm", "ldg_by_bits",
               "stg_by_bits", "ordering_ops", "atomics", "reductions", "bank_conflicts")
MD_COLUMNS = ("backend", "kernel", "dtype", "layout", "k", "stride", "config", "launches", "regs", "spill st/ld B",
              "smem B (static+dyn)", "CTAs/SM", "warps/SM", "waves@132 (min–max)", "channel use (min)", "LDG by bits", "STG by bits",
              "LDG/out", "fences & atomics", "bank conflicts (max ways)", "implied µs (min–max)")


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """All rows, :data:`~.rows.COLUMNS` in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by :func:`write_csv` (values as strings)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root).stdout.strip()
    except OSError:
        return ""


def _git_commit() -> str:
    """HEAD, the last commit that changed the kernel sources, and whether they have uncommitted changes."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    kernels = _git("log", "-1", "--format=%h", "--", "csrc", "effnet_kernels")
    dirty = _git("status", "--porcelain", "--", "csrc", "effnet_kernels")
    return f"HEAD {head}; kernel sources (csrc/, effnet_kernels/) as of {kernels}" + (
        " plus uncommitted changes" if dirty else "")


def environment() -> dict[str, str]:
    """Versions of what produced the audit."""
    import triton

    from effnet_kernels import _build

    nvcc = _build.find_nvcc()
    return {
        "commit": _git_commit(),
        "triton": triton.__version__,
        "nvcc": _build.nvcc_version(nvcc) if nvcc else "missing",
        "cuobjdump": f"{sass.tool_version(sass.find_tool('cuobjdump'))} ({sass.find_tool('cuobjdump')})",
        "target": "sm_90 (Triton: GPUTarget('cuda', 90, 32) -> sm_90a; CUDA: -gencode arch=compute_90,code=sm_90)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _range(vals: Iterable) -> str:
    nums = [float(v) for v in vals if v not in ("", None)]
    if not nums:
        return ""
    lo, hi = min(nums), max(nums)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def variant_table(rows: Sequence[dict]) -> list[dict]:
    """Rows grouped by compiled variant and its static properties (launch counts and ranges of the rest)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(str(r.get(k, "")) for k in VARIANT_KEY)].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        r = dict(zip(VARIANT_KEY, key))
        fences = " ".join(x for x in (r["ordering_ops"], r["atomics"], r["reductions"]) if x)
        bank = max((float(x["bank_max_ways"]) for x in rs if x.get("bank_max_ways", "") != ""), default=None)
        out.append({
            "backend": r["backend"], "kernel": r["kernel"], "dtype": r["dtype"], "layout": r["layout"], "k": r["k"],
            "stride": r["stride"], "config": r["config"], "launches": len(rs), "regs": r["regs"],
            "spill st/ld B": f"{r['spill_store_B']}/{r['spill_load_B']}",
            "smem B (static+dyn)": f"{r['static_smem_B']}+{r['dynamic_smem_B']}", "CTAs/SM": r["ctas_per_sm"],
            "warps/SM": r["warps_per_sm"], "waves@132 (min–max)": _range(x["waves_132sm"] for x in rs),
            "channel use (min)": min((float(x["channel_utilization"]) for x in rs if x.get("channel_utilization", "") != ""),
                                     default=""),
            "LDG by bits": r["ldg_by_bits"], "STG by bits": r["stg_by_bits"],
            "LDG/out": _range(x["ldg_per_output"] for x in rs), "fences & atomics": fences,
            "bank conflicts (max ways)": "" if bank is None else f"{bank:g}",
            "implied µs (min–max)": _range(x["implied_us_at_4.8TBps"] for x in rs),
        })
    return out


def markdown(rows: Sequence[dict], title: str = "Kernel audit") -> str:
    """The markdown report: environment, formulas, invariant violations, one table row per compiled variant."""
    env = environment()
    violations = audit_invariant_violations(rows)
    kinds: dict[str, int] = defaultdict(int)
    for v in violations:
        kinds[v.split("]: ", 1)[-1].split(" (")[0].split(":")[0]] += 1
    buf = io.StringIO()
    buf.write(f"# {title}\n\nWritten by `python -m benchmarks.kernel_audit` without a GPU: every kernel compiled "
              f"for sm_90, nothing run. No number here is a measured time.\n\n")
    for k, v in env.items():
        buf.write(f"- {k}: {v}\n")
    buf.write(f"- launches audited: {len(rows)} (one CSV row each), compiled variants: {len(variant_table(rows))}\n\n")
    buf.write(
        "Reading the columns: registers, spills and static shared memory are `ptxas -v`'s; LDG/STG by bits count the "
        "global load/store instructions in the SASS by bits per lane (`128:54 32:200` = 54 LDG.E.128 and 200 scalar "
        "32-bit LDG.E), statically; `LDG/out` divides them by the outputs a thread computes where the code has no "
        "loops (Triton's unrolled kernels; blank for looping kernels). CTAs/SM follows `cuda_occupancy.h` "
        f"(benchmarks/kernel_audit/hardware.py: 65536 regs/SM in 4 sub-partitions, 256-register warp granularity, "
        f"228 KB smem/SM, 227 KB/CTA, 1 KB reserved per CTA, 2048 threads, 32 CTAs/SM); waves = CTAs / (CTAs/SM x "
        f"{hardware.SMS} SMs); channel use = real channels over the channels the grid's channel blocks cover. Bank conflicts are simulated (benchmarks/kernel_audit/banks.py). \"Implied µs\" is "
        f"the compulsory bytes divided by {hardware.H200_PEAK_TBPS} TB/s (H200 peak HBM3e): implied by bytes at "
        f"{hardware.H200_PEAK_TBPS} TB/s, not measured.\n\n")
    buf.write(f"## Invariant violations ({len(violations)})\n\n`audit_invariant_violations()` "
              f"(occupancy threshold {MIN_WARPS_PER_SM} warps/SM for dwconv and se_excite, "
              f"{MIN_GEMM_WARPS_PER_SM} for the pointwise GEMM (pointwise_conv), {MIN_CONV_WARPS_PER_SM} for the "
              f"stem's implicit-GEMM conv (conv_bn_act, Triton only: the cuda backend runs the stem in cuDNN)):\n\n")
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        buf.write(f"- {n} × {kind}\n")
    buf.write("\n## Compiled variants\n\n")
    table = variant_table(rows)
    buf.write("| " + " | ".join(MD_COLUMNS) + " |\n|" + "---|" * len(MD_COLUMNS) + "\n")
    for r in table:
        buf.write("| " + " | ".join(str(r[c]).replace("|", "/") for c in MD_COLUMNS) + " |\n")
    return buf.getvalue()


def write_markdown(rows: Sequence[dict], path: Path, title: str = "Kernel audit") -> None:
    """:func:`markdown` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(rows, title))
