"""One audit row per kernel launch: workload, config, compiled resources, occupancy, memory instructions, bytes."""

from __future__ import annotations

from typing import Optional

from . import banks, hardware
from .compiled import stats_from_json
from .workloads import ELEMENT_BYTES, Workload

#: CSV columns, in order.
COLUMNS = (
    "backend", "kernel", "op", "shape_class", "N", "C", "Cout", "H", "W", "Ho", "Wo", "k", "stride", "R", "dtype", "layout",
    "used_by", "config", "config_source", "threads", "grid", "ctas", "regs", "spill_store_B", "spill_load_B",
    "stack_B", "local_ld_st", "static_smem_B", "dynamic_smem_B", "ctas_per_sm", "warps_per_sm", "occupancy_limiter",
    "waves_132sm", "channel_utilization", "code_source", "loops", "ldg_by_bits", "stg_by_bits", "ldg", "stg", "ldg_128", "stg_128",
    "outputs_per_thread", "ldg_per_output", "stg_per_output", "lds_by_bits", "sts_by_bits", "membar", "cctl_invalidate",
    "mma", "atomics", "reductions", "ordering_ops", "bank_conflicts", "bank_max_ways", "compulsory_bytes",
    "implied_us_at_4.8TBps", "notes",
)


# ops whose output size differs from the input's
_STRIDED_OPS = ("dwconv_bn_act", "conv_bn_act", "dwconv_bn_act_train", "dwconv_bn_act_train_backward")


def _base(wl: Workload, backend: str, kernel: str) -> dict:
    return {
        "backend": backend, "kernel": kernel, "op": wl.op, "shape_class": wl.shape_class, "N": wl.n, "C": wl.c,
        "Cout": wl.cout or "",
        "H": wl.h if not wl.op.startswith("se_gate") else "", "W": wl.w if not wl.op.startswith("se_gate") else "",
        "Ho": wl.ho if wl.op in _STRIDED_OPS else "", "Wo": wl.wo if wl.op in _STRIDED_OPS else "",
        "k": wl.k or "", "stride": wl.stride if wl.op in _STRIDED_OPS else "", "R": wl.r or "",
        "dtype": wl.dtype, "layout": wl.layout, "used_by": " ".join(wl.used_by),
    }


def _fmt(x: Optional[float], digits: int = 2) -> object:
    return "" if x is None else round(x, digits)


def make_row(wl: Workload, backend: str, kernel: str, config: str, config_source: str, threads: int,
             grid: tuple[int, int, int], record: Optional[dict], dynamic_smem: int,
             outputs_per_thread: Optional[float], conflicts: list[banks.ConflictResult], notes: list[str],
             bytes_share: float = 1.0, channel_slots: Optional[int] = None) -> dict:
    """The audit row of one launch; ``record`` is the compiled kernel's (None: not found/compiled).

    ``bytes_share``: the fraction of the workload's compulsory bytes attributed to this launch
    (an op of two kernels, the CUDA se_gate, splits them by what each reads and writes; 1 otherwise).
    ``channel_slots``: channels (NCHW CUDA: planes; conv_bn_act: output channels) the grid's channel blocks
    cover; the row's ``channel_utilization`` is the real ones over that (1 = no lanes idle for want of channels).
    """
    row = _base(wl, backend, kernel)
    ctas = grid[0] * grid[1] * grid[2]
    row.update(config=config, config_source=config_source, threads=threads, grid="x".join(map(str, grid)), ctas=ctas,
               dynamic_smem_B=dynamic_smem)
    if channel_slots:
        real = wl.n * wl.c if wl.layout == "nchw" and backend == "cuda" else (
            wl.cout if wl.op == "conv_bn_act" else wl.c)
        row["channel_utilization"] = round(real / channel_slots, 3)
    notes = list(notes)
    res = record.get("resources") if record else None
    st = stats_from_json(record.get("stats")) if record else None
    if record:
        notes += record.get("notes", [])
    if res:
        static = res["static_smem_bytes"]
        occ = hardware.occupancy(res["regs"], threads, static + dynamic_smem)
        row.update(regs=res["regs"], spill_store_B=res["spill_store_bytes"], spill_load_B=res["spill_load_bytes"],
                   stack_B=res["stack_bytes"], static_smem_B=static, ctas_per_sm=occ.ctas_per_sm,
                   warps_per_sm=hardware.resident_warps(occ, threads), occupancy_limiter=occ.limiter,
                   waves_132sm=_fmt(hardware.waves(ctas, occ.ctas_per_sm), 3))
    if st:
        ldg, stg = sum(st.ldg.values()), sum(st.stg.values())
        per = outputs_per_thread if (outputs_per_thread and st.loops == 0) else None
        row.update(code_source=st.source, loops=st.loops, ldg_by_bits=st.widths(st.ldg), stg_by_bits=st.widths(st.stg),
                   ldg=ldg, stg=stg, ldg_128=st.ldg.get(128, 0), stg_128=st.stg.get(128, 0),
                   local_ld_st=st.local_loads + st.local_stores,
                   lds_by_bits=st.widths(st.lds), sts_by_bits=st.widths(st.sts), membar=st.membars,
                   cctl_invalidate=st.l1_invalidations, mma=st.mma, atomics=" ".join(f"{k}:{v}" for k, v in st.atom.items()),
                   reductions=" ".join(f"{k}:{v}" for k, v in st.red.items()),
                   ordering_ops=" ".join(f"{k}:{v}" for k, v in st.ordering.items()),
                   outputs_per_thread=_fmt(outputs_per_thread), ldg_per_output=_fmt(per and ldg / per, 3),
                   stg_per_output=_fmt(per and stg / per, 3))
        if st.loops and outputs_per_thread:
            notes.append("loops: static instruction counts, not per output element")
    if conflicts:
        row["bank_conflicts"] = "; ".join(f"{c.access.name}: max {c.max_ways:g} mean {c.mean_ways:.1f}" for c in conflicts)
        row["bank_max_ways"] = max(c.max_ways for c in conflicts)
    nbytes = int(wl.compulsory_bytes() * bytes_share)
    row["compulsory_bytes"] = nbytes
    row["implied_us_at_4.8TBps"] = round(nbytes / (hardware.H200_PEAK_TBPS * 1e12) * 1e6, 3)
    if record is None:
        notes.append("kernel not found in the compiled build (csrc/ changed? update benchmarks/kernel_audit/cuda_audit.py)"
                     if backend == "cuda" else "not compiled")
    row["notes"] = "; ".join(dict.fromkeys(n for n in notes if n))
    return {c: row.get(c, "") for c in COLUMNS}


def se_gate_share(wl: Workload, kernel: str) -> float:
    """Compulsory-bytes share of the CUDA se_gate's two kernels (reduce: pooled + W_r, b_r; expand: W_e, b_e + gate)."""
    s = ELEMENT_BYTES[wl.dtype]
    reduce_b = 4 * wl.n * wl.c + s * (wl.c * wl.r + wl.r)
    total = wl.compulsory_bytes()
    return reduce_b / total if "se_reduce" in kernel else 1.0 - reduce_b / total
