"""Shared-memory bank conflicts of the CUDA kernels' staging loops, simulated per warp.

Model (sm_90): 32 banks of 4 bytes. A warp's shared access of ``w`` bytes per lane is
served in phases of ``128 / w`` lanes: 4-byte accesses in one phase of 32 lanes, 8-byte
in 2 phases of 16, 16-byte in 4 phases of 8. In a phase every distinct
4-byte word costs one pass of its bank; lanes reading the same word are served together
(broadcast). A phase takes as many wavefronts as its busiest bank has distinct words.
"Ways" is the wavefronts an access takes over the fewest it could take (1 = conflict-free).

**The simulated expressions** are in :data:`CUDA_SHARED_ACCESSES`, one entry per shared
access of ``csrc/`` kernels, each a Python copy of the index expression in the kernel
(labelled with the source line it mirrors). They are not read from the sources: whoever
changes a staging loop in ``csrc/`` updates its entry here, and the audit's invariant
(conflict-free) checks the new expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

BANKS = 32
BANK_BYTES = 4
WARP = 32


def wavefronts(byte_addrs: Iterable[Optional[int]], width: int) -> tuple[int, int]:
    """(wavefronts taken, fewest possible) for one warp access; ``byte_addrs`` per lane (None = inactive).

    ``width`` is the bytes per lane (4, 8 or 16); addresses must be ``width``-aligned.
    """
    if width not in (4, 8, 16):
        raise ValueError(f"shared access width must be 4, 8 or 16 bytes, got {width}")
    addrs = list(byte_addrs)
    if len(addrs) > WARP:
        raise ValueError(f"a warp has {WARP} lanes, got {len(addrs)} addresses")
    lanes_per_phase = WARP * BANK_BYTES // width
    taken = ideal = 0
    for p in range(0, WARP, lanes_per_phase):
        words: set[int] = set()
        for a in addrs[p:p + lanes_per_phase]:
            if a is None:
                continue
            if a % width:
                raise ValueError(f"address {a} is not {width}-byte aligned")
            words.update(range(a // BANK_BYTES, (a + width) // BANK_BYTES))
        if not words:
            continue
        per_bank: dict[int, int] = {}
        for w in words:
            per_bank[w % BANKS] = per_bank.get(w % BANKS, 0) + 1
        taken += max(per_bank.values())
        ideal += -(-len(words) // BANKS)
    return taken, ideal


def ways(byte_addrs: Iterable[Optional[int]], width: int) -> float:
    """Conflict degree of one warp access (1.0 = conflict-free; 32.0 = every lane serialised)."""
    taken, ideal = wavefronts(byte_addrs, width)
    return taken / ideal if ideal else 1.0


@dataclass(frozen=True)
class SharedAccess:
    """One shared-memory access of a CUDA kernel, as the kernel computes its index.

    ``index(tid, it, g)`` returns the float index lane ``tid`` (thread index in the CTA)
    touches in iteration ``it`` of its loop (None when the lane is idle), with ``g`` the
    launch geometry: ``k``, ``bx``, ``by``, ``v`` (channels per thread), ``cb``
    (``bx * v``), ``threads``; ``iterations(g)`` how many loop iterations there are.
    """

    kernel: str  # "dwconv_nhwc" | "dwconv_nchw"
    name: str
    source: str  # the csrc line it mirrors
    width: int  # bytes per lane of the instruction (4 = scalar float)
    index: Callable[[int, int, dict], Optional[int]]
    iterations: Callable[[dict], int]
    squeeze_only: bool = False


def _nhwc_stage_store(tid: int, it: int, g: dict) -> Optional[int]:
    i = tid + it * g["threads"]
    if i >= g["k"] * g["k"] * g["cb"]:
        return None
    ch, tap = i // (g["k"] * g["k"]), i % (g["k"] * g["k"])
    return tap * g["cb"] + ch


def _nhwc_weight_read(tid: int, it: int, g: dict) -> Optional[int]:
    tx = tid % g["bx"]
    return it * g["cb"] + tx * g["v"]  # it = tap (kh * K + kw); the first 16-byte quad of wt[0..V-1]


def _nhwc_red_store(tid: int, it: int, g: dict) -> Optional[int]:
    tx, ty = tid % g["bx"], tid // g["bx"]
    return ty * g["cb"] + tx * g["v"] + 4 * it  # it = quad of sq[0..V-1]


def _nchw_red_sum(tid: int, it: int, g: dict) -> Optional[int]:
    return tid * g["bx"] + it if tid < g["by"] else None  # it = r (serial loop of thread tid)


#: Every simulated shared access of ``csrc/`` (keep in step with the kernels).
CUDA_SHARED_ACCESSES: tuple[SharedAccess, ...] = (
    SharedAccess("dwconv_nhwc", "weight staging store", "dwconv_kernels.cuh: w_s[tap * CB + ch] = ... (i = tid + it*threads)",
                 4, _nhwc_stage_store, lambda g: -(-g["k"] * g["k"] * g["cb"] // g["threads"])),
    # ptxas merges wv[0..V-1] into 16-byte LDS.128 (seen in the SASS): simulated as such
    SharedAccess("dwconv_nhwc", "weight read", "dwconv_kernels.cuh: wv[v] = wt[v], wt = w_s + (kh*K+kw)*CB + tx*V",
                 16, _nhwc_weight_read, lambda g: g["k"] * g["k"]),
    # likewise red_s[...] = sq[v] becomes STS.128 per 4 floats
    SharedAccess("dwconv_nhwc", "squeeze store", "dwconv_kernels.cuh: red_s[ty * CB + tx * V + v] = sq[v]",
                 16, _nhwc_red_store, lambda g: g["v"] // 4, squeeze_only=True),
    SharedAccess("dwconv_nchw", "squeeze serial sum", "dwconv_kernels.cuh: s += red_s[tid * blockDim.x + r] (tid < blockDim.y)",
                 4, _nchw_red_sum, lambda g: g["bx"], squeeze_only=True),
)


@dataclass(frozen=True)
class ConflictResult:
    """Worst and mean conflict degree of one access over every warp and iteration of a CTA."""

    access: SharedAccess
    max_ways: float
    mean_ways: float


def simulate(access: SharedAccess, geometry: dict) -> ConflictResult:
    """Run ``access`` for every warp of one CTA and every loop iteration."""
    threads = geometry["threads"]
    results = []
    for it in range(access.iterations(geometry)):
        for w0 in range(0, threads, WARP):
            idx = [access.index(t, it, geometry) for t in range(w0, min(w0 + WARP, threads))]
            if all(i is None for i in idx):
                continue
            results.append(ways([None if i is None else i * BANK_BYTES for i in idx], access.width))
    if not results:
        return ConflictResult(access, 1.0, 1.0)
    return ConflictResult(access, max(results), sum(results) / len(results))


def cuda_conflicts(kernel: str, geometry: dict, squeeze: bool) -> list[ConflictResult]:
    """Simulated conflicts of every shared access of ``kernel`` at ``geometry``."""
    return [simulate(a, geometry) for a in CUDA_SHARED_ACCESSES
            if a.kernel == kernel and (squeeze or not a.squeeze_only)]
