"""The sm_90 (H100 / H200) limits the audit uses, and the resident-CTAs-per-SM formula.

Occupancy follows ``cuda_occupancy.h`` (``cudaOccMaxActiveBlocksPerMultiprocessor``,
partitioned global caching off, the default since compute capability 7):

* registers: a warp is allocated ``ceil(regs * 32 / 256) * 256`` registers (granularity 256
  per warp); warps are placed per SM sub-partition (4 of them, 16384 registers each), so
  ``warps_fit = 4 * floor(16384 / regs_per_warp)`` and
  ``ctas_by_regs = floor(warps_fit / warps_per_cta)``; a CTA needing more than 65536
  registers (warps rounded up to a multiple of 4), or a thread more than 255, cannot launch;
* shared memory: a CTA is allocated ``ceil((static + dynamic + 1024 reserved) / 128) * 128``
  bytes; at most 227 KB (232448 B) per CTA, and ``ctas_by_smem = floor(233472 / that)``
  with the largest carveout (228 KB per SM);
* threads: ``ctas_by_warps = floor(64 / warps_per_cta)`` (2048 threads per SM);
* ``ctas_by_limit = 32`` CTAs per SM.

Resident CTAs per SM is the minimum of the four; the smallest term is the limiter.
"""

from __future__ import annotations

from dataclasses import dataclass

SMS = 132  # H100 SXM / H200
REGS_PER_SM = 65536
REGS_PER_CTA = 65536
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256  # registers per warp
SUB_PARTITIONS = 4
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024
SMEM_ALLOC_UNIT = 128
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
WARP = 32
#: Stated peak HBM bandwidth of an H200 (HBM3e, 4.8 TB/s): the "implied" times divide bytes by it.
H200_PEAK_TBPS = 4.8


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


@dataclass(frozen=True)
class Occupancy:
    """Resident CTAs per SM and which resource limits it."""

    ctas_per_sm: int
    limiter: str  # "registers" | "shared memory" | "threads" | "CTA limit" (several joined by "+")
    by_regs: int
    by_smem: int
    by_warps: int



def occupancy(regs: int, threads: int, smem_bytes: int) -> Occupancy:
    """Resident CTAs per SM of a kernel using ``regs`` registers/thread, ``threads``/CTA, ``smem_bytes`` shared/CTA.

    ``smem_bytes`` is static + dynamic shared memory, without the 1 KB the system reserves
    (added here). Raises ValueError for impossible inputs.
    """
    if threads < 1 or threads > 1024:
        raise ValueError(f"threads per CTA must be in 1..1024, got {threads}")
    if regs < 0 or smem_bytes < 0:
        raise ValueError(f"registers and shared memory must be >= 0, got {regs}, {smem_bytes}")
    warps = -(-threads // WARP)
    regs_per_warp = _round_up(max(regs, 1) * WARP, REG_ALLOC_UNIT)
    if regs > MAX_REGS_PER_THREAD or regs_per_warp * _round_up(warps, SUB_PARTITIONS) > REGS_PER_CTA:
        by_regs = 0
    else:
        by_regs = (SUB_PARTITIONS * ((REGS_PER_SM // SUB_PARTITIONS) // regs_per_warp)) // warps
    smem = _round_up(smem_bytes + SMEM_RESERVED_PER_CTA, SMEM_ALLOC_UNIT)
    by_smem = 0 if smem - SMEM_RESERVED_PER_CTA > SMEM_PER_CTA else SMEM_PER_SM // smem
    by_warps = MAX_WARPS_PER_SM // warps
    ctas = min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM)
    names = [("registers", by_regs), ("shared memory", by_smem), ("threads", by_warps), ("CTA limit", MAX_CTAS_PER_SM)]
    limiter = "+".join(name for name, v in names if v == ctas)
    return Occupancy(ctas, limiter, by_regs, by_smem, by_warps)


def resident_warps(occ: Occupancy, threads: int) -> int:
    """Warps resident per SM (of 64) at ``occ``."""
    return occ.ctas_per_sm * -(-threads // WARP)


def waves(ctas: int, ctas_per_sm: int, sms: int = SMS) -> float:
    """How many rounds of ``ctas_per_sm`` CTAs on every one of ``sms`` SMs the grid takes (0 when nothing fits)."""
    if ctas_per_sm <= 0:
        return float("inf")
    return ctas / (ctas_per_sm * sms)
