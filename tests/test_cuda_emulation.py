"""A line-by-line Python emulation of the CUDA kernels' thread -> element mapping (CPU only).

No GPU is needed: each kernel of ``csrc/`` is re-enacted block by block and thread by
thread (threads of a block run one after the other between ``__syncthreads``), with the
launch shapes ported from ``dwconv_shape`` / ``blocks_for`` and every global access
bounds-checked. For awkward shapes (C = 1, C not a multiple of the 16-byte pack, H = W = 1,
asymmetric padding, stride 2, more strips/batches than the grid holds) it checks that

* every output element is written exactly once and nothing outside is touched;
* 16-byte accesses are used only at 16-byte aligned addresses;
* the values (conv + BN + each activation of ``activate<ACT>``, the squeeze mean from either
  reduction, the SE gate with each inner activation and gate function, the excitation)
  equal an fp64 reference;
* the grid's y (the deterministic partial rows) equals what the built module reports.

The grid limit (65535, or ``blocks_for``'s cap) is a parameter, so the loops that take
over beyond it run here with small shapes. Keep this file in step with ``csrc/``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernel_audit import banks
from benchmarks.kernel_audit.cuda_geometry import (  # the launch and shared-memory formulas, shared with the audit
    GRID_LIMIT, HIDDEN_CHUNK, SAMPLE_TILE, blocks_for, ceil_div, hidden_stage_unit, hidden_word, nhwc_threads_c,
    pack_width, red_chunk_word, red_pad, staged_channel, tile_w, w_chunk_word)
from benchmarks.kernel_audit.cuda_geometry import THREADS as K_THREADS
from benchmarks.kernel_audit.cuda_geometry import dwconv_shape as _dwconv_shape


# ------------------------------------------------------------------ memory with checks
class Buf:
    """A flat device buffer: bounds-checked reads/writes, write counts, 16-byte alignment checks."""

    def __init__(self, data: np.ndarray, elem: int, base_bytes: int = 0, name: str = "buf"):
        self.a = np.array(data, dtype=np.float64).reshape(-1)
        self.writes = np.zeros(self.a.size, dtype=np.int64)
        self.elem, self.base, self.name = elem, base_bytes, name

    def _check(self, i: int, count: int = 1) -> None:
        assert 0 <= i and i + count <= self.a.size, f"{self.name}: access [{i}, {i + count}) outside [0, {self.a.size})"

    def _aligned(self, i: int) -> None:
        assert (self.base + i * self.elem) % 16 == 0, f"{self.name}: 16-byte access at misaligned element {i}"

    def ld(self, i: int) -> float:
        self._check(i)
        return float(self.a[i])

    def st(self, i: int, v: float) -> None:
        self._check(i)
        self.a[i] = v
        self.writes[i] += 1

    def atomic_add(self, i: int, v: float) -> None:
        self._check(i)
        self.a[i] += v

    # load_pack / store_pack of device_utils.cuh
    def load_pack(self, i: int, V: int, vec: bool, valid: int) -> np.ndarray:
        out = np.zeros(V)
        if vec:
            self._check(i, V)
            self._aligned(i)
            return self.a[i:i + V].copy()
        for j in range(V):
            if j < valid:
                out[j] = self.ld(i + j)
        return out

    def store_pack(self, i: int, v: np.ndarray, V: int, vec: bool, valid: int) -> None:
        if vec:
            self._check(i, V)
            self._aligned(i)
            self.a[i:i + V] = v
            self.writes[i:i + V] += 1
            return
        for j in range(V):
            if j < valid:
                self.st(i + j, v[j])


def relu6(u):
    return np.where(u < 0.0, 0.0, np.where(u > 6.0, 6.0, u))


# activate<ACT> of device_utils.cuh, by effnet::Act code (= ops._checks.ACT_CODES)
ACTIVATE = {
    0: lambda u: u,                                  # kIdentity
    1: lambda u: u / (1.0 + np.exp(-u)),             # kSiLU
    2: lambda u: np.where(u < 0.0, 0.0, u),          # kReLU
    3: relu6,                                        # kReLU6
    4: lambda u: u * relu6(u + 3.0) / 6.0,           # kHardSwish
    5: lambda u: 1.0 / (1.0 + np.exp(-u)),           # kSigmoid
    6: lambda u: relu6(u + 3.0) / 6.0,               # kHardSigmoid
}


# ------------------------------------------------------------------ dwconv launch shape (dwconv_kernels.cuh)
def dwconv_shape(nhwc, elem, K, SW, squeeze, n, c, ho, wo, limit=GRID_LIMIT):
    """dwconv_shape (benchmarks/kernel_audit/cuda_geometry.py), checked: block <= 256 threads, smem <= 48 KiB."""
    grid, (bx, by), smem = _dwconv_shape(nhwc, elem, K, SW, squeeze, n, c, ho, wo, limit)
    assert bx * by <= K_THREADS and all(g >= 1 for g in grid), (grid, bx, by)
    assert smem <= 48 * 1024, "more than 48 KiB of dynamic shared memory needs an opt-in"
    return grid, (bx, by), smem


class P:
    """DWConvParams."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def publish_squeeze_nhwc(red, bx, rows, V, first_index, index_limit, p, partial_row):
    nc = p.n * p.c
    nthreads = bx * rows
    for tid in range(nthreads):
        for j in range(tid, bx * V, nthreads):
            idx = first_index + j
            if idx >= index_limit:
                continue
            tx, v = j // V, j % V
            col = red_chunk_word(v // 4, tx, nthreads) + v % 4
            s = sum(red[col + r * bx * 4] for r in range(rows))
            if p.partials is not None:
                p.partials.st(partial_row * nc + idx, s)
            else:
                p.mean.atomic_add(idx, s * p.inv_hw)


def dwconv_nhwc(p, K, SW, squeeze, grid, block, V, smem_bytes):
    TW = tile_w(SW)
    SEG = (TW - 1) * SW + K
    G = V // 4
    bxd, byd = block
    nthreads = bxd * byd
    CB = bxd * V
    strips_per_row = ceil_div(p.wo, TW)
    strips = p.ho * strips_per_row
    for bz in range(grid[2]):
        for byi in range(grid[1]):
            for bxi in range(grid[0]):
                cb0 = bxi * CB
                w_s = np.full((K * K + 1) * CB, np.nan)
                for i in range((K * K + 1) * CB):  # all threads' strided loop, merged: word i of w_s
                    tap = i // CB
                    cg = cb0 + staged_channel(i - tap * CB, bxd, V)
                    w_s[i] = 0.0 if cg >= p.c else (p.weight.ld(tap * p.c + cg) if tap < K * K else p.shift.ld(cg))
                assert not np.isnan(w_s).any(), "the staging loop fills every word"

                def chunks(tap, tx):  # the thread's V values of one staged row (G LDS.128)
                    return np.concatenate([w_s[w_chunk_word(tap, g, tx, bxd, V):][:4] for g in range(G)])

                n = bz
                while n < p.n:
                    red = np.full(G * nthreads * 4 + 32, np.nan)
                    assert not squeeze or red.size * 4 <= smem_bytes - (K * K + 1) * CB * 4, "red_s fits in smem"
                    for ty in range(byd):
                        for tx in range(bxd):
                            tid = ty * bxd + tx
                            c0 = cb0 + tx * V
                            valid = p.c - c0
                            sq = np.zeros(V)
                            s = byi * byd + ty
                            while valid > 0 and s < strips:
                                ho = s // strips_per_row
                                wo0 = (s % strips_per_row) * TW
                                hi0 = ho * p.stride_h - p.pad_top
                                wi0 = wo0 * SW - p.pad_left
                                acc = np.zeros((TW, V))
                                for kh in range(K):
                                    hi = hi0 + kh
                                    if hi < 0 or hi >= p.h:
                                        continue
                                    xrow = ((n * p.h + hi) * p.w) * p.c + c0
                                    seg = [p.x.load_pack(xrow + (wi0 + j) * p.c, V, p.vec, valid)
                                           if 0 <= wi0 + j < p.w else np.zeros(V) for j in range(SEG)]
                                    for kw in range(K):
                                        wv = chunks(kh * K + kw, tx)
                                        for t in range(TW):
                                            acc[t] += seg[t * SW + kw] * wv
                                sh = chunks(K * K, tx)
                                for t in range(TW):
                                    wo = wo0 + t
                                    if wo >= p.wo:
                                        break
                                    out = ACTIVATE[p.act](acc[t] + sh)
                                    if squeeze:
                                        sq += out
                                    p.y.store_pack(((n * p.ho + ho) * p.wo + wo) * p.c + c0, out, V, p.vec, valid)
                                s += grid[1] * byd
                            for g in range(G):
                                w0 = red_chunk_word(g, tid, nthreads)
                                red[w0:w0 + 4] = sq[4 * g:4 * g + 4]
                    if squeeze:
                        publish_squeeze_nhwc(red, bxd, byd, V, n * p.c + cb0, n * p.c + p.c, p, byi)
                    n += grid[2]


def dwconv_nchw(p, K, SW, squeeze, grid, block):
    TW = tile_w(SW)
    SEG = (TW - 1) * SW + K
    bxd, byd = block
    assert bxd % 32 == 0, "each warp serves one plane"
    wpp = bxd // 32
    nc = p.n * p.c
    strips_per_row = ceil_div(p.wo, TW)
    strips = p.ho * strips_per_row
    for byi in range(grid[1]):
        for bxi in range(grid[0]):
            red = np.full(K_THREADS // 32, np.nan)
            for ty in range(byd):
                plane = bxi * byd + ty
                valid = plane < nc
                c = plane % p.c if valid else 0
                xb, yb = plane * p.h * p.w, plane * p.ho * p.wo
                lane_sums = np.zeros(bxd)
                for tx in range(bxd):
                    sq = 0.0
                    if valid:
                        sh = p.shift.ld(c)
                        s = byi * bxd + tx
                        while s < strips:
                            ho = s // strips_per_row
                            wo0 = (s % strips_per_row) * TW
                            hi0 = ho * p.stride_h - p.pad_top
                            wi0 = wo0 * SW - p.pad_left
                            acc = np.zeros(TW)
                            for kh in range(K):  # every row, the ones outside predicated to zeros
                                hi = hi0 + kh
                                row_ok = 0 <= hi < p.h
                                seg = [p.x.ld(xb + hi * p.w + wi0 + j) if row_ok and 0 <= wi0 + j < p.w else 0.0
                                       for j in range(SEG)]
                                for kw in range(K):
                                    wv = p.weight.ld((kh * K + kw) * p.c + c)
                                    for t in range(TW):
                                        acc[t] += seg[t * SW + kw] * wv
                            for t in range(TW):
                                wo = wo0 + t
                                if wo >= p.wo:
                                    break
                                out = ACTIVATE[p.act](acc[t] + sh)
                                sq += out
                                p.y.st(yb + ho * p.wo + wo, out)
                            s += grid[1] * bxd
                    lane_sums[tx] = sq
                for wi in range(wpp):  # warp_sum, then lane 0 writes red_s[ty * wpp + tx / 32]
                    red[ty * wpp + wi] = warp_sum(lane_sums[32 * wi:32 * wi + 32])
            if squeeze:
                for tid in range(byd):
                    pl = bxi * byd + tid
                    if pl < nc:
                        s = sum(red[tid * wpp + r] for r in range(wpp))
                        if p.partials is not None:
                            p.partials.st(byi * nc + pl, s)
                        else:
                            p.mean.atomic_add(pl, s * p.inv_hw)


def warp_sum(lanes):
    """warp_sum of device_utils.cuh: the __shfl_xor_sync butterfly over 32 lanes (lane 0's result)."""
    v = np.array(lanes, dtype=np.float64)
    assert v.size == 32
    for off in (16, 8, 4, 2, 1):
        v = v + v[np.arange(32) ^ off]
    assert np.all(v == v[0]) or np.allclose(v, v[0], rtol=1e-15, atol=0), "every lane holds the sum"
    return float(v[0])


def emulate_dwconv(x, weight, scale, shift, stride, pad4, act, squeeze, deterministic, nhwc, elem,
                   limit=GRID_LIMIT, x_base_bytes=0):
    """Run the emulated kernels on float64 numpy copies; returns (y NCHW, mean, partial rows)."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    left, right, top, bottom = pad4
    ho = (h + top + bottom - k) // stride[0] + 1
    wo = (w + left + right - k) // stride[1] + 1
    xd = x.permute(0, 2, 3, 1) if nhwc else x
    y = Buf(np.full(n * c * ho * wo, np.nan), elem, name="y")
    xb = Buf(xd.contiguous().numpy(), elem, base_bytes=x_base_bytes, name="x")
    V = pack_width(elem)
    vec = nhwc and (c * elem) % 16 == 0 and xb.base % 16 == 0 and y.base % 16 == 0
    grid, block, smem = dwconv_shape(nhwc, elem, k, stride[1], squeeze, n, c, ho, wo, limit)
    mean = Buf(np.zeros(n * c), 4, name="mean")
    partials = Buf(np.full(grid[1] * n * c, np.nan), 4, name="partials") if (squeeze and deterministic) else None
    from effnet_kernels.cuda import fold_tap_major

    folded = fold_tap_major(weight, scale, dtype=torch.float64)  # what cuda.py hands the kernels, in float64
    p = P(x=xb, y=y, weight=Buf(folded.numpy(), 4, name="weight"), shift=Buf(shift.numpy(), 4, name="shift"), mean=mean, partials=partials, n=n, c=c, h=h, w=w, ho=ho, wo=wo,
          stride_h=stride[0], pad_top=top, pad_left=left, inv_hw=1.0 / (ho * wo), act=act, vec=vec)
    if nhwc:
        dwconv_nhwc(p, k, stride[1], squeeze, grid, block, V, smem)
    else:
        dwconv_nchw(p, k, stride[1], squeeze, grid, block)
    if partials is not None:  # reduce_partials_kernel
        assert (partials.writes == 1).all(), "every partial row is written exactly once before the reduction"
        nc = n * c
        blocks = min(ceil_div(nc, K_THREADS), limit)
        for b in range(blocks):
            for t in range(K_THREADS):
                i = b * K_THREADS + t
                while i < nc:
                    mean.st(i, sum(partials.ld(r * nc + i) for r in range(grid[1])) / (ho * wo))
                    i += blocks * K_THREADS
        assert (mean.writes == 1).all()
    assert (y.writes == 1).all(), f"output elements written {sorted(set(y.writes.tolist()))} times"
    yt = torch.from_numpy(y.a.reshape((n, ho, wo, c) if nhwc else (n, c, ho, wo)))
    if nhwc:
        yt = yt.permute(0, 3, 1, 2)
    return yt, torch.from_numpy(mean.a.reshape(n, c)), grid[1], vec


TORCH_ACT = {0: lambda u: u, 1: F.silu, 2: F.relu, 3: F.relu6, 4: F.hardswish, 5: torch.sigmoid, 6: F.hardsigmoid}


def dwconv_truth(x, weight, scale, shift, stride, pad4, act):
    z = F.conv2d(F.pad(x, pad4), weight, stride=stride, groups=x.shape[1])
    u = z * scale[None, :, None, None] + shift[None, :, None, None]
    y = TORCH_ACT[act](u)
    return y, y.mean(dim=(2, 3))


def test_activation_codes_are_the_packages():
    from effnet_kernels.ops._checks import ACT_CODES

    assert sorted(ACT_CODES.values()) == sorted(ACTIVATE) == sorted(TORCH_ACT)
    u = torch.linspace(-9, 9, 361, dtype=torch.float64)
    for name, code in ACT_CODES.items():
        torch.testing.assert_close(torch.from_numpy(ACTIVATE[code](u.numpy())), TORCH_ACT[code](u), msg=name)


DWCONV_CASES = [
    # (n, c, h, w), k, stride, (left, right, top, bottom)
    ((2, 13, 7, 9), 3, (1, 1), (1, 1, 1, 1)),     # C not a multiple of any pack, Wo % 4 != 0
    ((1, 1, 5, 6), 5, (2, 2), (2, 2, 2, 2)),      # C = 1
    ((2, 16, 1, 1), 3, (1, 1), (1, 1, 1, 1)),     # H = W = 1
    ((1, 24, 9, 8), 5, (2, 2), (1, 2, 1, 2)),     # TF-same asymmetric padding, stride 2
    ((1, 8, 6, 11), 7, (1, 2), (2, 1, 0, 3)),     # unequal strides, 4-sided padding, right halo
    ((1, 8, 4, 4), 3, (2, 1), (0, 0, 0, 0)),      # no padding at all
    ((1, 136, 3, 5), 3, (1, 1), (1, 1, 1, 1)),    # two channel blocks (fp16: 128 + 8)
    ((1, 4, 2, 3), 3, (1, 1), (3, 0, 0, 4)),      # outputs entirely inside the padding
    ((2, 5, 0, 3), 3, (1, 1), (1, 1, 2, 1)),      # H = 0: padding alone covers the kernel
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("elem", [4, 2], ids=["fp32", "16bit"])
@pytest.mark.parametrize("case", DWCONV_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}s{c[2][0]}{c[2][1]}")
def test_dwconv_emulation_writes_each_output_once_with_the_right_value(case, elem, layout, deterministic):
    shape, k, stride, pad4 = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64)
    y, mean, _, _ = emulate_dwconv(x, weight, scale, shift, stride, pad4, 1, True, deterministic,
                                   layout == "nhwc", elem)
    y_ref, mean_ref = dwconv_truth(x, weight, scale, shift, stride, pad4, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", [0, 2, 3, 4], ids=["identity", "relu", "relu6", "hardswish"])
def test_dwconv_emulation_epilogue_of_each_activation(act, layout):
    """The activation epilogue (activate<ACT>) over all its regions: BN output spread over about [-9, 9]."""
    shape, k, stride, pad4 = (1, 13, 6, 7), 3, (1, 2), (1, 1, 0, 2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 1, k, k, generator=g, dtype=torch.float64)
    scale = torch.rand(13, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(13, generator=g, dtype=torch.float64) * 2
    y, mean, _, _ = emulate_dwconv(x, weight, scale, shift, stride, pad4, act, True, False, layout == "nhwc", 2)
    y_ref, mean_ref = dwconv_truth(x, weight, scale, shift, stride, pad4, act)
    u = dwconv_truth(x, weight, scale, shift, stride, pad4, 0)[0]
    assert u.min() < -3 and u.max() > 6, "the input must reach every region of the activation"
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_dwconv_emulation_loops_beyond_the_grid_limit(layout):
    """Grid limit 1 or 2: grid.y (strip groups) and grid.z (batch) are clamped and the kernels loop.

    (3, 12, 30, 40) at stride 1 has 300 strips: NCHW needs 2 blocks of 256 along them,
    fp32 NHWC (3 threads along C, 85 strips per block) needs 4, and 3 samples > 2.
    """
    shape, k, stride, pad4 = (3, 12, 30, 40), 3, (1, 1), (1, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.randn(12, 1, k, k, generator=g, dtype=torch.float64)
    scale, shift = torch.rand(12, generator=g, dtype=torch.float64) + 0.5, torch.randn(12, generator=g, dtype=torch.float64)
    y_ref, mean_ref = dwconv_truth(x, weight, scale, shift, stride, pad4, 0)
    for det, limit in ((False, 1), (True, 2)):
        y, mean, rows, _ = emulate_dwconv(x, weight, scale, shift, stride, pad4, 0, True, det,
                                          layout == "nhwc", 4, limit=limit)
        assert rows == limit, "the shape must need more blocks along the strips than the limit"
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)


def test_dwconv_emulation_vector_path_only_when_aligned():
    """A pointer 4 bytes off a 16-byte boundary must take the scalar path (an aligned access would assert)."""
    shape = (1, 16, 4, 5)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(16, 1, 3, 3, dtype=torch.float64)
    s, b = torch.ones(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    _, _, _, vec = emulate_dwconv(x, w, s, b, (1, 1), (1, 1, 1, 1), 1, False, False, True, 2, x_base_bytes=0)
    assert vec
    y, _, _, vec = emulate_dwconv(x, w, s, b, (1, 1), (1, 1, 1, 1), 1, False, False, True, 2, x_base_bytes=4)
    assert not vec
    torch.testing.assert_close(y, dwconv_truth(x, w, s, b, (1, 1), (1, 1, 1, 1), 1)[0])


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("dtype_code,elem", [(0, 4), (1, 2), (2, 2)])
def test_emulated_launch_shape_matches_the_module(dtype_code, elem, nhwc):
    """grid.y of the port of dwconv_shape == the partial rows the compiled module reports."""
    try:
        import effnet_kernels._C as C
    except ImportError as exc:
        pytest.skip(f"effnet_kernels._C is not built in place: {exc}")
    for (n, c, ho, wo) in ((2, 13, 7, 9), (1, 1, 1, 1), (3, 1152, 7, 7), (2, 32, 112, 112), (1, 8, 3000, 3000)):
        for k in (3, 5, 7):
            for sw in (1, 2):
                rows = C.dwconv_partials_numel(dtype_code, nhwc, n, c, ho, wo, k, sw, True, True) // (n * c)
                grid, _, _ = dwconv_shape(nhwc, elem, k, sw, True, n, c, ho, wo)
                assert rows == grid[1], (n, c, ho, wo, k, sw)


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


# ------------------------------------------------------------------ se_gate (se.cu)
def emulate_se_gate(pooled, wr, br, we, be, cap=1 << 20, act=1, gate_act=5, grid_y_limit=65535, counts=None):
    """se_reduce_kernel + se_expand_kernel; `counts` (a dict) receives how often each weight element is read."""
    n, c = pooled.shape
    r = wr.shape[0]
    warps_per_block = K_THREADS // 32
    hidden = Buf(np.full(n * r, np.nan), 4, name="hidden")
    gate = Buf(np.full(n * c, np.nan), 4, name="gate")
    P_, WR, BR, WE, BE = (Buf(t.numpy(), 4) for t in (pooled, wr, br, we, be))
    reads = {"w_reduce": np.zeros(r * c, dtype=np.int64), "w_expand": np.zeros(c * r, dtype=np.int64)}
    tiles = ceil_div(n, SAMPLE_TILE)
    # se_reduce_kernel: grid-stride over warps, one warp per (sample tile, r); lanes stride over C
    blocks = blocks_for(tiles * r, warps_per_block, cap)
    for b in range(blocks):
        for wi in range(warps_per_block):
            warp = b * warps_per_block + wi
            while warp < tiles * r:
                i0, j = (warp // r) * SAMPLE_TILE, warp % r
                rows = [min(i0 + t, n - 1) for t in range(SAMPLE_TILE)]
                s = np.zeros((32, SAMPLE_TILE))
                for lane in range(32):
                    for kk in range(lane, c, 32):
                        wv = WR.ld(j * c + kk)
                        reads["w_reduce"][j * c + kk] += 1
                        s[lane] += np.array([P_.ld(rows[t] * c + kk) for t in range(SAMPLE_TILE)]) * wv
                for t in range(SAMPLE_TILE):
                    total = warp_sum(s[:, t])
                    if i0 + t < n:
                        hidden.st((i0 + t) * r + j, float(ACTIVATE[act](total + BR.ld(j))))
                warp += blocks * warps_per_block
    # se_expand_kernel: grid (ceil(C / 256), min(tiles, limit)); thread per (tile, c); hidden tile staged
    gx, gy = ceil_div(c, K_THREADS), min(tiles, grid_y_limit)
    for bxi in range(gx):
        for byi in range(gy):
            tile = byi
            while tile < tiles:
                i0 = tile * SAMPLE_TILE
                s = np.zeros((K_THREADS, SAMPLE_TILE))
                for k0 in range(0, r, HIDDEN_CHUNK):
                    ln = min(r - k0, HIDDEN_CHUNK)
                    h_s = np.full(SAMPLE_TILE * HIDDEN_CHUNK, np.nan)
                    for e in range(SAMPLE_TILE * ln):  # unit-major: element e = (t, k) = (e % 8, e / 8) at word e
                        t, k = hidden_stage_unit(e)
                        h_s[hidden_word(t, k)] = hidden.ld((i0 + t) * r + k0 + k) if i0 + t < n else 0.0
                    for tx in range(K_THREADS):
                        j = bxi * K_THREADS + tx
                        jr = j if j < c else 0
                        for k in range(ln):
                            wv = WE.ld(jr * r + k0 + k)
                            if j < c:
                                reads["w_expand"][jr * r + k0 + k] += 1
                            s[tx] += np.array([h_s[hidden_word(t, k)] for t in range(SAMPLE_TILE)]) * wv
                for tx in range(K_THREADS):
                    j = bxi * K_THREADS + tx
                    if j < c:
                        for t in range(SAMPLE_TILE):
                            if i0 + t < n:
                                gate.st((i0 + t) * c + j, float(ACTIVATE[gate_act](s[tx, t] + BE.ld(j))))
                tile += gy
    assert (hidden.writes == 1).all() and (gate.writes == 1).all(), "every hidden/gate element written once"
    if counts is not None:
        counts.update(reads)
    return torch.from_numpy(gate.a.reshape(n, c))


@pytest.mark.parametrize("cap,act,gate_act,ylimit", [(1 << 20, 1, 5, 65535), (1, 2, 6, 1), (3, 1, 6, 2), (1 << 20, 2, 5, 65535)],
                         ids=["silu-sigmoid", "relu-hardsigmoid-cap1", "silu-hardsigmoid-cap3", "relu-sigmoid"])
@pytest.mark.parametrize("n,c,r", [(5, 37, 6), (17, 300, 3), (1, 9, 260)], ids=["n5", "n17-c300", "n1-r260"])
def test_se_gate_emulation_covers_every_output(cap, act, gate_act, ylimit, n, c, r):
    """cap = blocks_for's limit and ylimit se_expand's grid.y limit; small values stand for grids
    beyond the hardware limits. N = 17 leaves a partial sample tile, C = 300 two channel blocks,
    R = 260 two hidden chunks. Each (activation, gate) of se_reduce_kernel / se_expand_kernel."""
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(n, c, generator=g, dtype=torch.float64)
    wr, br = torch.randn(r, c, generator=g, dtype=torch.float64), torch.randn(r, generator=g, dtype=torch.float64)
    we, be = torch.randn(c, r, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    counts = {}
    gate = emulate_se_gate(pooled, wr, br, we, be, cap, act, gate_act, ylimit, counts)
    truth = TORCH_ACT[gate_act](TORCH_ACT[act](pooled @ wr.T + br) @ we.T + be)
    torch.testing.assert_close(gate, truth, rtol=1e-12, atol=1e-12)
    # each weight element is read once per tile of SAMPLE_TILE samples (was: once per sample)
    tiles = ceil_div(n, SAMPLE_TILE)
    assert (counts["w_reduce"] == tiles).all() and (counts["w_expand"] == tiles).all()


def test_se_gate_kernels_loop_over_warps():
    """The source keeps the grid-stride loops the emulation above relies on (blocks_for caps the grid)."""
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "csrc" / "se.cu").read_text()
    assert src.count("warp += static_cast<int64_t>(gridDim.x) * kWarps") == 1, \
        "se_reduce_kernel must loop over warps: blocks_for caps the grid at 2**20 blocks"
    assert "for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y)" in src, "se_expand_kernel loops over tiles"
    assert "constexpr int kSampleTile = 8;" in src and "constexpr int kHiddenChunk = 256;" in src


# ------------------------------------------------------------------ se_excite (se.cu)
def gate_index(e, c, hw, nhwc):
    return (e // (hw * c)) * c + e % c if nhwc else e // hw


def emulate_se_excite(y, gate, nhwc, elem, y_base=0, out_base=0, cap=1 << 20):
    """se_excite_kernel; returns (out NCHW, vec, packs stored with 16-byte accesses)."""
    n, c, h, w = y.shape
    hw = h * w
    total = n * c * hw
    V = pack_width(elem)
    vec = total >= V and y_base % 16 == 0 and out_base % 16 == 0
    uniform = (c if nhwc else hw) % V == 0
    yd = (y.permute(0, 2, 3, 1) if nhwc else y).contiguous().numpy()
    Y = Buf(yd, elem, base_bytes=y_base, name="y")
    G = Buf(gate.numpy(), 4, name="gate")
    O = Buf(np.full(total, np.nan), elem, base_bytes=out_base, name="out")
    blocks = blocks_for(ceil_div(total, V) if vec else total, K_THREADS, cap)
    step = blocks * K_THREADS
    packs = total // V if vec else 0
    for first in range(step):
        i = first
        while i < packs:
            e = i * V
            pk = Y.load_pack(e, V, True, V)
            if nhwc and uniform:
                g0 = gate_index(e, c, hw, True)
                o = pk * np.array([G.ld(g0 + v) for v in range(V)])
            elif nhwc:
                o = pk * np.array([G.ld(gate_index(e + v, c, hw, True)) for v in range(V)])
            elif uniform:
                o = pk * G.ld(e // hw)
            else:  # incremental plane index: a pack may cross planes
                g, rem, o = e // hw, e % hw, np.zeros(V)
                for v in range(V):
                    o[v] = pk[v] * G.ld(g)
                    rem += 1
                    if rem == hw:
                        rem, g = 0, g + 1
            O.store_pack(e, o, V, True, V)
            i += step
        e = packs * V + first
        while e < total:
            O.st(e, Y.ld(e) * G.ld(gate_index(e, c, hw, nhwc)))
            e += step
    assert (O.writes == 1).all()
    out = torch.from_numpy(O.a.reshape((n, h, w, c) if nhwc else (n, c, h, w)))
    return (out.permute(0, 3, 1, 2) if nhwc else out), vec, packs


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("elem", [4, 2])
@pytest.mark.parametrize("shape", [(3, 24, 4, 4), (3, 24, 3, 5), (2, 1, 1, 1), (1, 13, 2, 8), (2, 16, 1, 1),
                                   (2, 16, 7, 7), (1, 8, 14, 14), (1, 3, 3, 3)])
@pytest.mark.parametrize("bases", [(0, 0), (4, 0), (0, 8)])
def test_se_excite_emulation(shape, elem, nhwc, bases):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    gate = torch.rand(shape[:2], generator=g, dtype=torch.float64)
    out, vec, packs = emulate_se_excite(y, gate, nhwc, elem, *bases, cap=2)
    assert vec == (bases == (0, 0) and y.numel() >= pack_width(elem))
    assert packs == (y.numel() // pack_width(elem) if vec else 0), "aligned: 16-byte packs whatever H * W and C are"
    torch.testing.assert_close(out, y * gate[:, :, None, None], rtol=1e-12, atol=1e-12)


def test_the_ported_epilogues_are_the_sources():
    """ACTIVATE above ports activate<ACT> of device_utils.cuh; every kernel epilogue calls it."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    utils = (csrc / "device_utils.cuh").read_text()
    for line in ("if constexpr (ACT == kSiLU) return u / (1.0f + expf(-u));",
                 "if constexpr (ACT == kReLU) return u < 0.0f ? 0.0f : u;",
                 "if constexpr (ACT == kReLU6) return relu6(u);",
                 "if constexpr (ACT == kHardSwish) return u * relu6(u + 3.0f) / 6.0f;",
                 "if constexpr (ACT == kSigmoid) return 1.0f / (1.0f + expf(-u));",
                 "if constexpr (ACT == kHardSigmoid) return relu6(u + 3.0f) / 6.0f;",
                 "return u < 0.0f ? 0.0f : (u > 6.0f ? 6.0f : u);"):
        assert line in utils, line
    dw = (csrc / "dwconv_kernels.cuh").read_text()
    assert dw.count("activate<ACT>(u)") == 2
    # BN scale folded into the weights: the epilogues add only the shift
    assert "const float u = acc[t][v] + sh[v];" in dw and "const float u = acc[t] + sh;" in dw
    se = (csrc / "se.cu").read_text()
    assert "activate<ACT>(sum + bj)" in se and "activate<GATE>(s[t] + bj)" in se


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
