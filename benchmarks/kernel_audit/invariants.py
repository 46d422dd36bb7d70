"""The properties the kernels must have once issue #10's fixes land, checked on audit rows.

* **no spills**: ``spill_store_B + spill_load_B == 0`` and no local loads/stores;
* **no L1-invalidating fence in a squeeze variant**: a dwconv launch (always with the squeeze
  in EfficientNet) has no ``CCTL.IV*`` and no ``MEMBAR`` (``sem="relaxed"`` atomics / ``RED``
  need neither);
* **128-bit accesses on NHWC paths where C allows** (``C * bytes % 16 == 0``): the kernel has
  16-byte global loads and stores, and in straight-line code (no loops, so static counts are
  per thread) narrower global loads do not outnumber the 16-byte ones (today the ``[C, k*k]``
  fp32 weights are 200 scalar loads against 54 vector ones at k5);
* **conflict-free staging**: every simulated shared access of the CUDA kernels at 1 way;
* **occupancy**: bandwidth kernels (dwconv, se_excite) keep at least :data:`MIN_WARPS_PER_SM`
  warps resident per SM;
* **the pointwise GEMM** (``pointwise_conv``: expand, projection and head 1x1 convs): no spills
  (as above); on NHWC, 128-bit global loads where K allows (``K * bytes % 16 == 0``: the A and
  weight tiles' ``cp.async`` / ``LDGSTS.128`` or ``LDG.128``) and 128-bit stores where Cout allows
  (not pooled); 16-bit inputs on the tensor cores (``HGMMA`` / ``HMMA`` in the SASS), float32 on
  IEEE FMA (no MMA: TF32 would break the 1e-5 rule); and at least :data:`MIN_GEMM_WARPS_PER_SM`
  warps per SM (registers and the pipeline's shared memory allowing two 4-warp CTAs): a GEMM
  covers its load latency with the ``num_stages``-deep ``cp.async`` pipeline, not with warps.
* **the stem conv** (``conv_bn_act``: the dense 3x3 stride-2 conv 3 -> Cout + folded BN + SiLU, an
  implicit GEMM): no spills (as above); 16-bit inputs on the tensor cores (``HGMMA`` / ``HMMA``), float32
  without MMA (IEEE FMA, no TF32); on NHWC, 128-bit stores of y where Cout allows (``Cout * bytes % 16
  == 0``: every B0-B7 stem, Cout 32-64) -- no rule on the loads: the im2col gather of a 3-channel
  image has no 16-byte runs (NHWC: 3 taps x 3 channels of one row are 9 contiguous elements); and at
  least :data:`MIN_CONV_WARPS_PER_SM` warps per SM (its K = 27 is one chunk: no loop to pipeline, the
  tile's 16 gathered elements per thread are what is in flight).

Why 16 warps (25% of the 64): these kernels are DRAM-bound, so an SM must keep enough
bytes in flight to cover latency (Little's law): ~4.8 TB/s x ~0.6 us ~ 2.9 MB over 132 SMs
~ 22 KB per SM. 16 warps x 32 lanes x 16 B = 8 KB per vector load each, so three independent
16-byte loads per thread (the k-tap row loads give more) keep the pipe full; below 16 warps
(e.g. 8: one 256-thread CTA, or two CTAs of 128 threads at ~230 registers) it takes 6+
outstanding loads per thread, which the unrolled tap loops do not guarantee.
"""

from __future__ import annotations

from typing import Iterable

MIN_WARPS_PER_SM = 16
MIN_GEMM_WARPS_PER_SM = 8
MIN_CONV_WARPS_PER_SM = MIN_GEMM_WARPS_PER_SM
_GEMM_OPS = ("pointwise_conv",)
_CONV_OPS = ("conv_bn_act",)
_BANDWIDTH_OPS = ("dwconv_bn_act", "se_excite")
_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _int(v) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


def _label(r: dict) -> str:
    return f"{r['backend']} {r['kernel']} [{r['shape_class']} {r['dtype']} {r['layout']}]"


def _narrow(bits: str) -> int:
    """Global loads narrower than 128 bits in a ``"128:54 32:200"`` width string."""
    total = 0
    for part in str(bits).split():
        width, n = part.split(":")
        if int(width) < 128:
            total += int(n)
    return total


def audit_invariant_violations(rows: Iterable[dict], min_warps_per_sm: int = MIN_WARPS_PER_SM) -> list[str]:
    """One line per violated invariant per row (see the module docstring); [] when the kernels keep them all."""
    out = []
    for r in rows:
        label = _label(r)
        if r.get("regs", "") == "":
            out.append(f"{label}: not compiled / resources unknown")
            continue
        spills = _int(r["spill_store_B"]) + _int(r["spill_load_B"])
        if spills or _int(r.get("local_ld_st")):
            out.append(f"{label}: spills ({r['spill_store_B']} B stored, {r['spill_load_B']} B loaded, "
                       f"{r.get('local_ld_st')} local ld/st)")
        if r["op"] == "dwconv_bn_act" and (_int(r["cctl_invalidate"]) or _int(r["membar"])):
            out.append(f"{label}: squeeze fences ({r['ordering_ops']}): L1 invalidated per program")
        if r["layout"] == "nhwc" and r["op"] in _BANDWIDTH_OPS and (_int(r["C"]) * _BYTES[r["dtype"]]) % 16 == 0:
            if not _int(r["ldg_128"]) or not _int(r["stg_128"]):
                out.append(f"{label}: NHWC without 128-bit loads and stores (ldg {r['ldg_by_bits']}, stg {r['stg_by_bits']})")
            elif _int(r["loops"]) == 0 and _narrow(r["ldg_by_bits"]) > _int(r["ldg_128"]):
                out.append(f"{label}: narrow global loads outnumber 128-bit ones ({r['ldg_by_bits']})")
        if r.get("bank_max_ways", "") != "" and float(r["bank_max_ways"]) > 1:
            out.append(f"{label}: shared-memory bank conflicts ({r['bank_conflicts']})")
        if r["op"] in _GEMM_OPS:
            out += _gemm_violations(r, label)
        if r["op"] in _CONV_OPS:
            out += _conv_violations(r, label)
        if r["op"] in _BANDWIDTH_OPS and _int(r["warps_per_sm"]) < min_warps_per_sm:
            out.append(f"{label}: {r['warps_per_sm']} warps/SM < {min_warps_per_sm} "
                       f"({r['ctas_per_sm']} CTAs of {r['threads']} threads, {r['regs']} regs, limit: {r['occupancy_limiter']})")
    return out


def _gemm_violations(r: dict, label: str) -> list[str]:
    """The pointwise GEMM's own invariants (see the module docstring)."""
    out = []
    nbytes = _BYTES[r["dtype"]]
    pooled = "pool" in r["shape_class"].split(",")
    if r["layout"] == "nhwc":
        if (_int(r["C"]) * nbytes) % 16 == 0 and not _int(r["ldg_128"]):
            out.append(f"{label}: NHWC GEMM without 128-bit tile loads (ldg {r['ldg_by_bits']})")
        if not pooled and (_int(r["Cout"]) * nbytes) % 16 == 0 and not _int(r["stg_128"]):
            out.append(f"{label}: NHWC GEMM without 128-bit output stores (stg {r['stg_by_bits']})")
    return out + _tensor_core_violations(r, label, "GEMM") + _warps_violations(r, label, MIN_GEMM_WARPS_PER_SM)


def _conv_violations(r: dict, label: str) -> list[str]:
    """The stem conv's own invariants (see the module docstring)."""
    out = []
    if r["layout"] == "nhwc" and (_int(r["Cout"]) * _BYTES[r["dtype"]]) % 16 == 0 and not _int(r["stg_128"]):
        out.append(f"{label}: NHWC conv without 128-bit output stores (stg {r['stg_by_bits']})")
    return out + _tensor_core_violations(r, label, "conv") + _warps_violations(r, label, MIN_CONV_WARPS_PER_SM)


def _tensor_core_violations(r: dict, label: str, what: str) -> list[str]:
    """16-bit inputs on the tensor cores, float32 on IEEE FMA (no MMA: TF32 would break the 1e-5 rule)."""
    mma = _int(r.get("mma"))
    if r["dtype"] == "fp32" and mma:
        return [f"{label}: fp32 {what} on the tensor cores ({mma} MMA instructions: TF32, not IEEE)"]
    if r["dtype"] != "fp32" and not mma:
        return [f"{label}: 16-bit {what} without tensor-core instructions"]
    return []


def _warps_violations(r: dict, label: str, floor: int) -> list[str]:
    if _int(r["warps_per_sm"]) < floor:
        return [f"{label}: {r['warps_per_sm']} warps/SM < {floor} ({r['ctas_per_sm']} CTAs of {r['threads']} "
                f"threads, {r['regs']} regs, limit: {r['occupancy_limiter']})"]
    return []
