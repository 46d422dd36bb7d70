"""Launch geometry and shared-memory index math of the CUDA kernels (``csrc/``), in Python.

The one copy of these formulas: the kernel audit (:mod:`.cuda_audit` launches, :mod:`.banks`
simulated accesses) and the geometry tests (``tests/test_cuda_geometry.py``) both import
them; what the kernels compute is tested by running the real sources through the host shim
(``tests/test_cuda_host.py``). Each function names the C++ it mirrors; whoever changes that in ``csrc/``
changes it here.
"""

from __future__ import annotations

THREADS = 256  # effnet::kThreads (csrc/device_utils.cuh)
GRID_LIMIT = 65535  # grid.y / grid.z cap of the launches
BLOCKS_CAP = 1 << 20  # se.cu blocks_for's cap
SAMPLE_TILE = 8  # se.cu kSampleTile
HIDDEN_CHUNK = 256  # se.cu kHiddenChunk


def ceil_div(a: int, b: int) -> int:
    """device_utils.cuh ``ceil_div``."""
    return (a + b - 1) // b


def tile_w(sw: int) -> int:
    """dwconv_kernels.cuh ``tile_w<SW>``: outputs along W per thread."""
    return 4 if sw == 1 else 2


def pack_width(elem: int) -> int:
    """``PackWidth<T>``: elements of ``elem`` bytes in a 16-byte pack."""
    return 16 // elem


def nhwc_threads_c(nvec: int, v: int) -> int:
    """dwconv_kernels.cuh ``nhwc_threads_c``: the largest BX <= 128 / V in {1..8} or a multiple of 8
    whose equal channel blocks leave at most 1/8 of the lanes idle."""
    max_bx = 128 // v
    if nvec <= 8:
        return nvec
    bx = max_bx
    while bx > 1:
        if 8 * nvec >= 7 * ceil_div(nvec, bx) * bx:
            return bx
        bx -= 8 if bx > 8 else 1
    return 1


def dwconv_shape(nhwc: bool, elem: int, k: int, sw: int, squeeze: bool, n: int, c: int, ho: int, wo: int,
                 limit: int = GRID_LIMIT) -> tuple[tuple[int, int, int], tuple[int, int], int]:
    """dwconv_kernels.cuh ``dwconv_shape``: (grid, (blockDim.x, blockDim.y), dynamic smem bytes)."""
    strips = ho * ceil_div(wo, tile_w(sw))
    if nhwc:
        v = pack_width(elem)
        nvec = ceil_div(c, v)
        bx = nhwc_threads_c(nvec, v)
        by = THREADS // bx
        grid = (ceil_div(nvec, bx), min(ceil_div(strips, by), limit), min(n, limit))
        smem = 4 * ((k * k + 1) * bx * v + (by * bx * v + 32 if squeeze else 0))  # + 32: red_pad slack
    else:
        bx = min(ceil_div(strips, 32) * 32, THREADS)
        by = THREADS // bx
        grid = (ceil_div(n * c, by), min(ceil_div(strips, bx), limit), 1)
        smem = 4 * (THREADS // 32) if squeeze else 0
    return grid, (bx, by), smem


def staged_channel(off: int, bx: int, v: int) -> int:
    """``staged_channel<V>``: w_s word ``off`` within a tap -> channel within the block."""
    g, r = off // (4 * bx), off % (4 * bx)
    return (r >> 2) * v + g * 4 + (r & 3)


def w_chunk_word(tap: int, g: int, tx: int, bx: int, v: int) -> int:
    """First w_s word of thread tx's float4 chunk g of tap ``tap`` (tap = K * K: the BN shift)."""
    return ((tap * (v // 4) + g) * bx + tx) * 4


def red_pad(nthreads: int) -> int:
    """``red_pad``: float4 chunks before chunk group 1 of red_s that put it at bank 16."""
    return (12 - nthreads % 8) % 8


def red_chunk_word(g: int, tid: int, nthreads: int) -> int:
    """First red_s word of thread tid's float4 chunk g (the NHWC squeeze buffer)."""
    return (g * (nthreads + red_pad(nthreads)) + tid) * 4


def publish_word(j: int, r: int, bx: int, v: int, nthreads: int) -> int:
    """``publish_squeeze_nhwc``: the red_s word thread j reads for row r (channel j of the block)."""
    return red_chunk_word((j % v) // 4, j // v, nthreads) + (j % v) % 4 + r * bx * 4


def blocks_for(work: int, per_block: int, cap: int = BLOCKS_CAP) -> int:
    """se.cu ``blocks_for``: one block per ``per_block`` items, at most ``cap`` blocks."""
    return min(ceil_div(work, per_block), cap)


def hidden_chunks(r: int) -> list[int]:
    """se_expand_kernel: the lengths of the hidden chunks it stages (kHiddenChunk units at a time)."""
    return [min(HIDDEN_CHUNK, r - k0) for k0 in range(0, r, HIDDEN_CHUNK)]


def hidden_word(t: int, k: int) -> int:
    """se_expand_kernel ``h_s[k * kSampleTile + t]``: the word of unit ``k`` (of the staged chunk) of
    sample row ``t`` (unit-major: a unit's 8 samples are two consecutive float4)."""
    return k * SAMPLE_TILE + t


def hidden_stage_unit(e: int) -> tuple[int, int]:
    """se_expand_kernel's staging loop: element ``e`` is (t, k) = (e % kSampleTile, e / kSampleTile),
    stored at ``hidden_word(t, k)`` == e."""
    return e % SAMPLE_TILE, e // SAMPLE_TILE


def old_hidden_stage_word(e: int, length: int) -> int:
    """The staging before issue #10's se_expand fix: element e = t * len + k stored row-major at
    ``h_s[t * kHiddenChunk + k]`` (rows of R < 32 units sharing a warp land in the same banks).
    Negative control only."""
    t, k = divmod(e, length)
    return t * HIDDEN_CHUNK + k


# ------------------------------------------------------------------ the training kernels (dwconv_train.cu, se_train.cu)

MIN_PER_THREAD = 16  # train_kernels.cuh chunking's kMinPerThread
TARGET_BLOCKS = 2 * 132 * 8  # chunking's kTargetBlocks


def channel_tile(nhwc: bool) -> tuple[int, int]:
    """train_kernels.cuh ``channel_tile``: (blockDim.x, blockDim.y) of the per-channel reduction kernels."""
    return (32, 8) if nhwc else (1, THREADS)


def chunking(m: int, channel_groups: int, by: int) -> tuple[int, int]:
    """train_kernels.cuh ``chunking``: (chunk, chunks) of the position range [0, m)."""
    want = ceil_div(TARGET_BLOCKS, max(channel_groups, 1))
    want = max(1, min(want, ceil_div(m, by * MIN_PER_THREAD), GRID_LIMIT))
    chunk = max(ceil_div(m, want), 1)
    return chunk, max(ceil_div(m, chunk), 1)


def train_tile_launch(nhwc: bool, n: int, c: int, h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int], int]:
    """dwconv_train.cu ``tile_launch`` over the ``n * h * w`` positions: (grid, (blockDim.x, blockDim.y), chunk) of
    the stats and bwd_reduce kernels (over the output: h, w = Ho, Wo) and of input_grads (over the input)."""
    bx, by = channel_tile(nhwc)
    groups = ceil_div(c, bx)
    chunk, chunks = chunking(n * h * w, groups, by)
    return (groups, chunks, 1), (bx, by), chunk


def train_partials_numel(nhwc: bool, n: int, c: int, h: int, w: int, ho: int, wo: int, k: int) -> int:
    """dwconv_train.cu ``dwconv_train_partials_numel`` (valid arguments): C floats times the larger of 3 rows per
    output chunk (stats) and k * k per input chunk (input_grads)."""
    if n == 0 or c == 0:
        return 0
    out_rows = 3 * train_tile_launch(nhwc, n, c, ho, wo)[0][1]
    in_rows = k * k * train_tile_launch(nhwc, n, c, h, w)[0][1]
    return max(out_rows, in_rows) * c


def grid_1d(total: int) -> int:
    """dwconv_train.cu ``grid_1d`` / se_train.cu ``blocks_1d``: one block per THREADS items, 1 to BLOCKS_CAP."""
    return max(blocks_for(total, THREADS), 1)
