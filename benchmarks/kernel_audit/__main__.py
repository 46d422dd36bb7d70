"""``python -m benchmarks.kernel_audit [--train] [--quick] [--ops OPS] [--out-dir DIR] [--csv FILE] [--md FILE]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import cache as cache_mod
from .audit import BACKENDS, run_audit
from .invariants import audit_invariant_violations
from .report import read_csv, write_csv, write_markdown
from .train_workloads import TRAIN_OPS, quick_training_workloads, training_workloads
from .triton_train_audit import capture_training
from .triton_audit import capture
from .workloads import OPS, network_workloads, quick_workloads

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Audit every Triton and CUDA launch of EfficientNet B0-B7 for sm_90 and write the CSV and markdown."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_audit", description=main.__doc__)
    p.add_argument("--train", action="store_true",
                   help="the training kernels instead (B0-B7 at batch 128, fp16/bf16, NHWC: the training "
                        "target; default files kernel_audit_train.csv/.md)")
    p.add_argument("--quick", action="store_true", help="a small subset (B0, fp16, 2 layers): for tests")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where kernel_audit.csv/.md go (default %(default)s)")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default OUT_DIR/kernel_audit.csv)")
    p.add_argument("--md", type=Path, default=None, help="markdown path (default OUT_DIR/kernel_audit.md)")
    p.add_argument("--title", default="Kernel audit")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of %(default)s")
    p.add_argument("--cache-dir", type=Path, default=cache_mod.default_dir(),
                   help="compile cache (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything afresh, cache nothing")
    p.add_argument("--jobs", type=int, default=2, help="nvcc jobs at once (default %(default)s)")
    p.add_argument("--ops", default="", help="comma-separated subset of the ops to audit (e.g. pointwise_conv or "
                   f"conv_bn_act); default all of {', '.join(OPS)}")
    p.add_argument("--check", action="store_true", help="exit 1 when audit_invariant_violations() finds any")
    p.add_argument("--md-from", type=Path, default=None, metavar="CSV",
                   help="compile nothing: write the markdown (--md) from an existing audit CSV")
    a = p.parse_args(argv)
    if a.md_from is not None:
        rows = read_csv(a.md_from)
        write_markdown(rows, a.md or a.out_dir / "kernel_audit.md", a.title)
        return 1 if a.check and audit_invariant_violations(rows) else 0
    backends = [b for b in a.backends.split(",") if b]
    t0 = time.perf_counter()
    known = TRAIN_OPS if a.train else OPS
    if a.train:
        wls = quick_training_workloads() if a.quick else training_workloads()
    else:
        wls = quick_workloads() if a.quick else network_workloads()
    if a.ops:
        ops = {o for o in a.ops.split(",") if o}
        unknown = sorted(ops - set(known))
        if unknown:
            p.error(f"unknown ops {unknown}; choose from {', '.join(known)}")
        wls = [wl for wl in wls if wl.op in ops]
    rows = run_audit(wls, backends, None if a.no_cache else a.cache_dir, cuda_dtypes=("fp16",) if a.quick else None,
                     jobs=a.jobs, capture=capture_training if a.train else capture)
    stem = "kernel_audit_train" if a.train else "kernel_audit"
    csv_path = a.csv or a.out_dir / f"{stem}.csv"
    md_path = a.md or a.out_dir / f"{stem}.md"
    write_csv(rows, csv_path)
    write_markdown(rows, md_path, a.title)
    violations = audit_invariant_violations(rows)
    print(f"kernel_audit: {len(rows)} rows -> {csv_path}, {md_path}; {len(violations)} invariant violations; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if a.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
