"""Run the audit: workloads -> launches -> compiled variants (deduplicated, cached) -> rows."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import banks, cuda_audit, triton_audit
from .cache import DiskCache
from .rows import make_row, se_gate_share
from .workloads import Workload

BACKENDS = ("triton", "cuda")


def _say(msg: str) -> None:
    print(f"kernel_audit: {msg}", file=sys.stderr, flush=True)


def triton_rows(workloads: Sequence[Workload], cache: DiskCache, say: Callable[[str], None] = _say,
                capture: Callable[[Workload], list] = triton_audit.capture) -> list[dict]:
    """Rows of every Triton launch of ``workloads`` (each distinct variant compiled once); ``capture``
    records a workload's launches (the training ops': :func:`.triton_train_audit.capture_training`)."""
    captured = [(wl, capture(wl)) for wl in workloads]
    variants = {l.key: l for _, ls in captured for l in ls}
    say(f"triton: {sum(len(ls) for _, ls in captured)} launches, {len(variants)} distinct compiled variants")
    compiled = {}
    t0 = time.perf_counter()
    for i, (key, launch) in enumerate(variants.items(), 1):
        try:
            compiled[key] = triton_audit.compile_launch(launch, cache)
        except Exception as exc:  # a variant that does not compile is a finding, not a crash
            compiled[key] = None
            say(f"triton: {launch.kernel} {triton_audit.config_of(launch)} failed to compile: {exc}")
        if i % 20 == 0:
            say(f"triton: {i}/{len(variants)} variants ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for wl, launches in captured:
        for l in launches:
            rec = compiled.get(l.key)
            rows.append(make_row(
                wl, "triton", l.kernel, triton_audit.config_of(l), "untuned default (EFFNET_KERNELS_TRITON_TUNE=0)",
                32 * l.num_warps, l.grid, rec, rec["dynamic_smem"] if rec else 0, triton_audit.outputs_per_thread(l), [],
                [] if rec else ["failed to compile for sm_90"], channel_slots=triton_audit.channel_slots(l)))
    return rows


def cuda_rows(workloads: Sequence[Workload], cache: DiskCache, dtypes: Optional[Sequence[str]] = None,
              jobs: int = 2, say: Callable[[str], None] = _say,
              sources: Optional[Sequence[str]] = None) -> list[dict]:
    """Rows of every CUDA launch of ``workloads``; ``dtypes`` limits which per-dtype sources compile, ``sources``
    which files (by name; a launch whose kernel is in none of them gets a "kernel not found" row)."""
    t0 = time.perf_counter()
    records = cuda_audit.compile_kernels(cache, dtypes, jobs=jobs, names=sources)
    say(f"cuda: {len(records)} kernels in the sm_90 build ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for wl in workloads:
        for l in cuda_audit.launches(wl):
            rec = cuda_audit.find_kernel(records, l.kernel)
            conflicts = banks.cuda_conflicts(l.bank_kernel, l.geometry, squeeze=True) if l.bank_kernel else []
            threads = l.block[0] * l.block[1] * l.block[2]
            share = se_gate_share(wl, l.kernel) if wl.op == "se_gate" else 1.0
            rows.append(make_row(wl, "cuda", l.kernel.split("::")[-1], l.config, "fixed (csrc launch code)", threads,
                                 l.grid, rec, l.dynamic_smem, l.outputs_per_thread, conflicts, [l.note], share,
                                 l.channel_slots))
    return rows


def run_audit(workloads: Sequence[Workload], backends: Sequence[str] = BACKENDS, cache_dir: Optional[Path] = None,
              cuda_dtypes: Optional[Sequence[str]] = None, jobs: int = 2,
              say: Callable[[str], None] = _say,
              capture: Callable[[Workload], list] = triton_audit.capture) -> list[dict]:
    """Audit rows of ``workloads`` for ``backends``; a backend whose tools are missing yields a note, not a crash.
    ``capture``: how the Triton launches of a workload are recorded (see :func:`triton_rows`)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    cache = DiskCache(cache_dir)
    rows: list[dict] = []
    if "triton" in backends:
        rows += triton_rows(workloads, cache, say, capture)
    if "cuda" in backends:
        try:
            rows += cuda_rows(workloads, cache, cuda_dtypes, jobs, say)
        except (FileNotFoundError, RuntimeError) as exc:
            say(f"cuda: not audited: {exc}")
    say(f"compile cache: {cache.hits} hits, {cache.misses} compiled")
    return rows
