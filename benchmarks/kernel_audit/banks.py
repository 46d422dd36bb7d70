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

from . import cuda_geometry as cg

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
    (``bx * v``), ``threads`` (se_expand: ``threads`` and ``chunks``, the staged hidden
    chunk lengths); ``iterations(g)`` how many loop iterations there are.
    """

    kernel: str  # "dwconv_nhwc" | "dwconv_nchw" | "se_expand"
    name: str
    source: str  # the csrc line it mirrors
    width: int  # bytes per lane of the instruction (4 = scalar float)
    index: Callable[[int, int, dict], Optional[int]]
    iterations: Callable[[dict], int]
    squeeze_only: bool = False


def _nhwc_stage_store(tid: int, it: int, g: dict) -> Optional[int]:
    i = tid + it * g["threads"]
    return i if i < (g["k"] * g["k"] + 1) * g["cb"] else None  # thread i writes word i


def _nhwc_chunk_read(tap_of: Callable[[int, dict], int]) -> Callable[[int, int, dict], Optional[int]]:
    def index(tid: int, it: int, g: dict) -> Optional[int]:  # it = tap * G + chunk
        chunks = g["v"] // 4
        return cg.w_chunk_word(tap_of(it // chunks, g), it % chunks, tid % g["bx"], g["bx"], g["v"])
    return index


def _nhwc_red_store(tid: int, it: int, g: dict) -> Optional[int]:
    return cg.red_chunk_word(it, tid, g["threads"])  # it = chunk g of sq[0..V-1]


def _nhwc_publish_read(tid: int, it: int, g: dict) -> Optional[int]:
    # j = tid (bx * V <= 128 < threads: one j per thread); it = row r of the serial sum
    return cg.publish_word(tid, it, g["bx"], g["v"], g["threads"]) if tid < g["cb"] else None


def _nchw_red_store(tid: int, it: int, g: dict) -> Optional[int]:
    tx, ty = tid % g["bx"], tid // g["bx"]
    return ty * (g["bx"] // 32) + tx // 32 if tx % 32 == 0 else None  # lane 0 of each warp


def _nchw_red_sum(tid: int, it: int, g: dict) -> Optional[int]:
    return tid * (g["bx"] // 32) + it if tid < g["by"] else None  # it = r (serial loop of thread tid)


def _se_stage_iterations(g: dict) -> int:
    return sum(cg.ceil_div(cg.SAMPLE_TILE * n, g["threads"]) for n in g["chunks"])


def _se_expand_stage_store(word: Callable[[int, int], int]) -> Callable[[int, int, dict], Optional[int]]:
    """Staging loop ``for (e = tid; e < 8 * len; e += blockDim.x)`` storing element e of a chunk of len units at ``word(e, len)``."""
    def index(tid: int, it: int, g: dict) -> Optional[int]:
        for n in g["chunks"]:  # it runs over the iterations of every hidden chunk in turn
            per = cg.ceil_div(cg.SAMPLE_TILE * n, g["threads"])
            if it < per:
                e = tid + it * g["threads"]
                return word(e, n) if e < cg.SAMPLE_TILE * n else None
            it -= per
        return None
    return index


def _se_expand_hidden_read(tid: int, it: int, g: dict) -> Optional[int]:
    """Inner loop: unit k's samples 0-3 then 4-7 (load_shared_f4(h_s + k * 8 + 4 * half)), the same
    address in every lane; it = 2 * (unit, counted over every chunk in turn) + half."""
    half, unit = it % 2, it // 2
    for n in g["chunks"]:
        if unit < n:
            return cg.hidden_word(4 * half, unit)
        unit -= n
    return None


#: Every simulated shared access of ``csrc/`` (keep in step with the kernels).
CUDA_SHARED_ACCESSES: tuple[SharedAccess, ...] = (
    SharedAccess("dwconv_nhwc", "weight staging store", "dwconv_kernels.cuh: w_s[i] = ... (i = tid; i < (K*K+1)*CB; i += NT)",
                 4, _nhwc_stage_store, lambda g: cg.ceil_div((g["k"] * g["k"] + 1) * g["cb"], g["threads"])),
    SharedAccess("dwconv_nhwc", "weight read", "dwconv_kernels.cuh: load_shared_f4(w_s + (((kh*K+kw)*G + g)*bx + tx)*4)",
                 16, _nhwc_chunk_read(lambda tap, g: tap), lambda g: g["k"] * g["k"] * (g["v"] // 4)),
    SharedAccess("dwconv_nhwc", "shift read", "dwconv_kernels.cuh: load_shared_f4(w_s + ((K*K*G + g)*bx + tx)*4)",
                 16, _nhwc_chunk_read(lambda tap, g: g["k"] * g["k"]), lambda g: g["v"] // 4),
    SharedAccess("dwconv_nhwc", "squeeze store", "dwconv_kernels.cuh: store_shared_f4(red_s + (g*(NT + red_pad(NT)) + tid)*4, ...)",
                 16, _nhwc_red_store, lambda g: g["v"] // 4, squeeze_only=True),
    SharedAccess("dwconv_nhwc", "publish read", "dwconv_kernels.cuh publish_squeeze_nhwc: s += col[r * bx * 4]",
                 4, _nhwc_publish_read, lambda g: g["by"], squeeze_only=True),
    SharedAccess("dwconv_nchw", "squeeze warp-sum store", "dwconv_kernels.cuh: if (tx % 32 == 0) red_s[ty * warps_per_plane + tx / 32] = sq",
                 4, _nchw_red_store, lambda g: 1, squeeze_only=True),
    SharedAccess("dwconv_nchw", "squeeze plane sum", "dwconv_kernels.cuh: s += red_s[tid * warps_per_plane + r] (tid < blockDim.y)",
                 4, _nchw_red_sum, lambda g: g["bx"] // 32, squeeze_only=True),
    SharedAccess("se_expand", "hidden staging store", "se.cu se_expand_kernel: h_s[e] = ... (e = tid; e < 8*len; e == k*8 + t)",
                 4, _se_expand_stage_store(lambda e, n: cg.hidden_word(*cg.hidden_stage_unit(e))), _se_stage_iterations),
    SharedAccess("se_expand", "hidden read", "se.cu se_expand_kernel: load_shared_f4(h_s + k * kSampleTile [+ 4]) (one address, every lane)",
                 16, _se_expand_hidden_read, lambda g: 2 * sum(g["chunks"])),
)


def _old_nhwc_stage_store(tid: int, it: int, g: dict) -> Optional[int]:
    i = tid + it * g["threads"]
    if i >= g["k"] * g["k"] * g["cb"]:
        return None
    ch, tap = i // (g["k"] * g["k"]), i % (g["k"] * g["k"])
    return tap * g["cb"] + ch


#: Negative control, not a current access: the NHWC weight staging before d772819, thread i
#: writing w_s[(i % K²) * CB + i / K²] (issue #10's 9/22/27-way conflicts).
OLD_NHWC_STAGE_STORE = SharedAccess(
    "dwconv_nhwc", "weight staging store (before d772819)", "dwconv_kernels.cuh@37ea15f: w_s[tap * CB + ch] = ...",
    4, _old_nhwc_stage_store, lambda g: cg.ceil_div(g["k"] * g["k"] * g["cb"], g["threads"]))


#: Negative control, not a current access: se_expand's hidden staging before issue #10's fix,
#: h_s[t * kHiddenChunk + k] (2-8 way when R < 32 puts several sample rows in one warp).
OLD_SE_EXPAND_STAGE_STORE = SharedAccess(
    "se_expand", "hidden staging store (fixed 256-word row pitch)", "se.cu@4e0e4f4: h_s[t * kHiddenChunk + k] = ...",
    4, _se_expand_stage_store(cg.old_hidden_stage_word), _se_stage_iterations)


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
