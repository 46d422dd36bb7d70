"""Launch geometry, shared-memory banks and channel blocks of the CUDA kernels (CPU only).

The formulas are :mod:`benchmarks.kernel_audit.cuda_geometry` (the one Python copy of ``csrc/``'s
launch and shared-memory index math, also used by the kernel audit) and the bank model is
:mod:`benchmarks.kernel_audit.banks`. Checked here: that copy agrees with the sources (the host
build's ``dwconv_partials_numel`` reports the grid.y it computes; the constants and grid-stride
loops are the sources'), every B0-B7 launch is legal, every simulated shared access of the
kernels is conflict-free (with negative controls: the old staging patterns conflict), and the
NHWC channel blocks keep the lanes busy.

What the kernels compute is checked by running the real sources on the CPU through the host
shim against the torch reference (tests/test_cuda_host.py): every kernel, both layouts, k 3/5/7,
stride 1/2, each activation and gate, both squeeze reductions, odd shapes, misaligned pointers,
the grid-stride loops beyond the grid limits (ekshim::set_grid_cap).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.kernel_audit import banks
from benchmarks.kernel_audit.cuda_geometry import (  # the launch and shared-memory formulas, shared with the audit
    GRID_LIMIT, HIDDEN_CHUNK, SAMPLE_TILE, ceil_div, nhwc_threads_c, pack_width, red_pad, w_chunk_word)
from benchmarks.kernel_audit.cuda_geometry import THREADS as K_THREADS
from benchmarks.kernel_audit.cuda_geometry import dwconv_shape as _dwconv_shape

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def dwconv_shape(nhwc, elem, K, SW, squeeze, n, c, ho, wo, limit=GRID_LIMIT):
    """dwconv_shape (benchmarks/kernel_audit/cuda_geometry.py), checked: block <= 256 threads, smem <= 48 KiB."""
    grid, (bx, by), smem = _dwconv_shape(nhwc, elem, K, SW, squeeze, n, c, ho, wo, limit)
    assert bx * by <= K_THREADS and all(g >= 1 for g in grid), (grid, bx, by)
    assert smem <= 48 * 1024, "more than 48 KiB of dynamic shared memory needs an opt-in"
    return grid, (bx, by), smem


# ------------------------------------------------------------------ launch shapes
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("dtype_code,elem", [(0, 4), (1, 2), (2, 2)])
def test_launch_shape_matches_the_sources(dtype_code, elem, nhwc):
    """grid.y of cuda_geometry.dwconv_shape == the partial rows csrc/'s dwconv_shape gives (the host
    build of the real sources, so no GPU or in-place build is needed)."""
    from effnet_kernels import cuda_host

    C = cuda_host.load().C
    for (n, c, ho, wo) in ((2, 13, 7, 9), (1, 1, 1, 1), (3, 1152, 7, 7), (2, 32, 112, 112), (1, 8, 3000, 3000),
                           (300, 1, 1, 1), (70000, 16, 1, 1)):
        for k in (3, 5, 7):
            for sw in (1, 2):
                rows = C.dwconv_partials_numel(dtype_code, nhwc, n, c, ho, wo, k, sw, True, True) // (n * c)
                grid, _, _ = dwconv_shape(nhwc, elem, k, sw, True, n, c, ho, wo)
                assert rows == grid[1], (n, c, ho, wo, k, sw)


@pytest.mark.parametrize("nhwc", [False, True])
def test_training_chunking_matches_the_sources(nhwc):
    """cuda_geometry.train_partials_numel (the training kernels' tile_launch and chunking over the output and the
    input positions, which the audit's CUDA training rows use) == csrc/dwconv_train.cu's dwconv_train_partials_numel in the host build, over
    shapes that reach each bound of chunking (the GPU-filling target of 2 x 132 x 8 blocks, >= 16 positions per
    thread, one chunk) and empty work; and the training launches of every B0-B7 block at batch 128 stay within the grid limits."""
    from effnet_kernels import cuda_host
    from effnet_kernels.models import MODEL_NAMES, layer_shapes

    from benchmarks.kernel_audit.cuda_geometry import train_partials_numel, train_tile_launch

    C = cuda_host.load().C
    base = dict(x=16, weight=16, dtype=1, nhwc=nhwc, stride_h=1, stride_w=1, pad_top=1, pad_left=1, act=1)
    shapes = [(2, 40, 7, 9), (1, 1, 1, 1), (64, 40, 56, 56), (128, 96, 112, 112), (3, 1152, 7, 7), (1, 8, 3000, 3000),
              (70000, 16, 1, 1), (0, 8, 4, 4), (2, 0, 4, 4)]
    for n, c, h, w in shapes:
        for k in (3, 5, 7):
            for s in (1, 2):  # the input chunks (input_grads) outnumber the output chunks at stride 2
                ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
                want = C.dwconv_train_partials_numel({**base, "n": n, "c": c, "h": h, "w": w, "ho": ho, "wo": wo,
                                                      "k": k, "stride_h": s, "stride_w": s})
                assert train_partials_numel(nhwc, n, c, h, w, ho, wo, k) == want, (n, c, h, w, k, s)
    for name in MODEL_NAMES:
        for layer in layer_shapes(name, batch=128):
            for h, w in ((layer.Ho, layer.Wo), (layer.H, layer.W)):
                grid, (bx, by), chunk = train_tile_launch(nhwc, 128, layer.mid_channels, h, w)
                assert bx * by == K_THREADS and grid[1] <= GRID_LIMIT and chunk * grid[1] >= 128 * h * w


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("elem", [4, 2])
def test_dwconv_launch_shapes_of_efficientnet_are_legal(nhwc, elem):
    """Every B0-B7 depthwise layer (batch 256): block <= 256 threads, grid within limits, smem <= 48 KiB."""
    from effnet_kernels.models import MODEL_NAMES, layer_shapes

    for name in MODEL_NAMES:
        for layer in layer_shapes(name, batch=256):
            grid, block, smem = dwconv_shape(nhwc, elem, layer.kernel, layer.stride, True, 256, layer.mid_channels,
                                             layer.Ho, layer.Wo)
            assert grid[0] < 2**31 and grid[1] <= GRID_LIMIT and grid[2] <= GRID_LIMIT


def test_geometry_constants_and_loops_are_the_sources():
    """cuda_geometry's constants are csrc/'s, and the kernels keep the grid-stride loops that make the
    clamped grids (65535 along y / z, blocks_for's 2^20) correct; tests/test_cuda_host.py runs them
    with fewer blocks served (ekshim::set_grid_cap)."""
    se = (CSRC / "se.cu").read_text()
    dw = (CSRC / "dwconv_kernels.cuh").read_text()
    utils = (CSRC / "device_utils.cuh").read_text()
    assert f"constexpr int kSampleTile = {SAMPLE_TILE};" in se and f"constexpr int kHiddenChunk = {HIDDEN_CHUNK};" in se
    assert re.search(rf"constexpr int kThreads = {K_THREADS};", utils)
    assert "b < (1 << 20) ? b : (1 << 20)" in se
    assert se.count("warp += static_cast<int64_t>(gridDim.x) * kWarps") == 1, "se_reduce_kernel loops over warps"
    assert "for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y)" in se, "se_expand_kernel loops over tiles"
    assert "h_s[e] = " in se and "load_shared_f4(h_s + k * kSampleTile)" in se, "the staging cuda_geometry.hidden_word models"
    assert "for (int64_t n = blockIdx.z; n < p.n; n += gridDim.z)" in dw, "NHWC dwconv loops over the batch"
    assert dw.count("gridDim.y) * blockDim") == 2, "both dwconv kernels loop over strips"
    assert dw.count(f"< {GRID_LIMIT} ? ") >= 3


# ------------------------------------------------------------------ shared-memory bank conflicts (NHWC staging)
def wavefronts(words, width):
    """banks.wavefronts (the audit's bank model) of one warp access given as the first 4-byte word per lane
    (None: inactive) and `width` words per lane (1: 32-bit, 4: 128-bit)."""
    return banks.wavefronts([None if w is None else 4 * w for w in words], 4 * width)


def test_old_weight_staging_had_the_bank_conflicts_of_the_issue():
    """Negative control: the simulation reports the 9-, 22- and 27-way conflicts (mean over warps;
    worst 9, 25, 32) of the staging pattern issue #10 measured (w_s[(i % K²) * CB + i / K²], CB = 128)."""
    got = {}
    for K in (3, 5, 7):
        r = banks.simulate(banks.OLD_NHWC_STAGE_STORE, dict(k=K, bx=16, by=16, v=8, cb=128, threads=K_THREADS))
        got[K] = (r.max_ways, r.mean_ways)
    assert got[3] == (9, 9.0)
    assert got[5][0] == 25 and round(got[5][1]) == 22
    assert got[7][0] == 32 and round(got[7][1]) == 27


def _nhwc_blocks_of_efficientnet():
    from effnet_kernels.models import MODEL_NAMES, layer_shapes

    chans = {layer.mid_channels for name in MODEL_NAMES for layer in layer_shapes(name, batch=1)}
    for elem in (4, 2):
        V = pack_width(elem)
        for c in sorted(chans | {1, 13, 24, 136, 144}):
            bx = nhwc_threads_c(ceil_div(c, V), V)
            yield c, elem, V, bx, K_THREADS // bx


@pytest.mark.parametrize("K", [3, 5, 7])
def test_nhwc_shared_memory_is_bank_conflict_free(K):
    """Staging writes, per-tap weight and shift reads (LDS.128), the squeeze writes (STS.128) and the
    publish reads (banks.CUDA_SHARED_ACCESSES) of every B0-B7 channel count's NHWC block (fp32 and 16-bit)
    need only the minimum wavefronts."""
    names = set()
    for c, elem, V, bx, by in _nhwc_blocks_of_efficientnet():
        geo = dict(k=K, bx=bx, by=by, v=V, cb=bx * V, threads=bx * by)
        for r in banks.cuda_conflicts("dwconv_nhwc", geo, squeeze=True):
            assert r.max_ways == 1, f"{r.access.name}: {r.max_ways:g}-way conflict at C={c}, elem={elem}, bx={bx}, K={K}"
            names.add(r.access.name)
    assert names == {"weight staging store", "weight read", "shift read", "squeeze store", "publish read"}


def test_bank_model_sees_a_strided_128bit_read():
    """Negative controls: chunks 32 bytes apart (the old tx * V float reads of a 16-bit pack, two
    LDS.128 in the old SASS) are a 2-way conflict; BX = 9 threads along C (not <= 8, not a multiple
    of 8) conflicts; so does the squeeze buffer without its pad."""
    assert wavefronts([8 * t for t in range(32)], 4) == (8, 4)
    addrs = [w_chunk_word(0, 0, t % 9, 9, 8) for t in range(32)]
    total, ideal = wavefronts(addrs, 4)
    assert total > ideal
    # the squeeze buffer without red_pad: 16-bit publish reads of a 256-thread block are 2-way
    unpadded = [((t % 8) // 4 * 256 + t // 8) * 4 + t % 4 for t in range(32)]
    assert wavefronts(unpadded, 1) == (2, 1)
    assert red_pad(256) == 4 and red_pad(252) == 0


def test_channel_blocks_keep_the_lanes_busy():
    """Every B0-B7 channel count: equal channel blocks with at most 1/8 of the lanes idle. C = 144 in
    16-bit runs 3 blocks of 6 threads (48 channels); the old rule (min(packs, 16) threads) ran a second
    block with 2 of 16 threads per row busy: 4 of 32 lanes of each warp."""
    for c, elem, V, bx, by in _nhwc_blocks_of_efficientnet():
        nvec = ceil_div(c, V)
        assert 8 * nvec >= 7 * ceil_div(nvec, bx) * bx, (c, elem, bx)
        assert bx <= 8 or bx % 8 == 0
    assert nhwc_threads_c(18, 8) == 6
    old_bx = min(18, 16)
    second_block_threads = 18 - old_bx  # busy threads per row in the second block
    assert second_block_threads * (32 // old_bx) == 4, "the negative control: 4 busy lanes of 32"


def test_se_expand_staging_is_conflict_free_for_efficientnet_widths():
    """se_expand's hidden staging store and float4 broadcast reads at every B0-B7 SE width R (2..160,
    one chunk) and past a chunk: 1-way; the old row-major staging (negative control) conflicts at R < 32."""
    from benchmarks.kernel_audit.cuda_geometry import hidden_chunks
    from effnet_kernels.models import MODEL_NAMES, layer_shapes

    widths = {layer.se_reduced for name in MODEL_NAMES for layer in layer_shapes(name, batch=1) if layer.se_reduced}
    assert min(widths) < 32 < max(widths)
    for r in sorted(widths | {257, 600}):
        for res in banks.cuda_conflicts("se_expand", dict(threads=K_THREADS, chunks=hidden_chunks(r)), squeeze=True):
            assert res.max_ways == 1, (r, res.access.name, res.max_ways)
    old = [banks.simulate(banks.OLD_SE_EXPAND_STAGE_STORE, dict(threads=K_THREADS, chunks=[r])).max_ways
           for r in sorted(widths) if r < 32]
    assert old and min(old) >= 2
