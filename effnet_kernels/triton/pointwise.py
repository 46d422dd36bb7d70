"""Triton ``pointwise_conv``: a 1x1 conv as one GEMM, with the SE gate, bias, activation, residual or pool fused.

``out[n, c, p] = act(sum_k round(x[n, k, p] * gate[n, k]) * w[c, k] + bias[c]) + residual[n, c, p]``
is a GEMM with M = pixels, N = Cout, K = input channels. A program computes a
``BLOCK_M x BLOCK_N`` tile of **one sample's** pixels x output channels, looping over K in
``BLOCK_K`` steps (``tl.dot``, float32 accumulation):

* prologue: the ``[BLOCK_M, BLOCK_K]`` A tile is read straight from x through its strides
  (channels_last: channels contiguous, NCHW: pixels contiguous; both are one kernel, other
  layouts are made dense by the launcher); with the gate, one ``[BLOCK_K]`` vector of
  ``gate[n, :]`` per K step (a tile never straddles two samples, so the gate is a per-column
  factor) multiplies the tile in float32, which is rounded to x's dtype, exactly what
  ``se_excite`` would have stored. float32 runs ``input_precision="ieee"`` (FMA, no TF32).
* epilogue on the float32 accumulator: ``+ bias``, the activation (:mod:`._activation`),
  ``+ residual`` (read in the output's layout), rounded once and stored;
* pool (a network's head): one program per (sample, Cout tile) loops over all of the
  sample's pixel tiles and keeps the per-column sums of the activated float32 tile; it stores
  ``sum / (H W)`` into ``[N, Cout]`` float32. No atomics, no second pass, a fixed order:
  bitwise reproducible, and the ``[N, Cout, H, W]`` output is never written.

Grid order: the Cout tile varies fastest, so the programs resident at once share their A rows
(the activation is read from DRAM once, the other Cout tiles' re-reads hit L2) and all read
the same weight (at most 3840 x 640 x 2 B = 4.9 MB in B0-B7: L2-resident).

Bytes and FLOPs (fp16, per image; ``s`` = 2 B): read x (``s M K``), write out (``s M Cout``),
read the weight once per launch (``s K Cout``), bias / gate ``4 Cout`` / ``4 K``; ``2 M K Cout`` FLOPs.
The ridge of an H200 is 990 TFLOP/s / 4.3 TB/s = 230 FLOP/B:

* B0 expand 24 -> 144 at 56 x 56 (M = 3136 per image): x 150.5 KB + out 903.2 KB per image, the
  weight 6.9 KB once; 21.7 MFLOP per image (20.6 FLOP/B: memory-bound 11x). Batch 256: 269.8 MB
  -> 63 us at 4.3 TB/s against 5.6 GFLOP -> 5.6 us of tensor-core time; the kernel's job is to
  stream A once and write the output with 128-bit stores, not to be a fast GEMM.
* B0 project 1152 -> 320 at 7 x 7 (M = 49), gated: x 112.9 KB + out 31.4 KB + gate 4.6 KB per
  image, the weight 737 KB once; 36.1 MFLOP per image. Batch 256: 38.8 MB -> 9.0 us and
  9.25 GFLOP -> 9.3 us: at the ridge, where the MMA tiles must stay busy. Batch 1: 0.89 MB
  (mostly the weight) -> 0.2 us and 0.04 us: launch latency (~3-5 us) dominates; the fill step
  below spreads it over 20 programs instead of 3.

(Implied by the arithmetic, not measured.)

Tiles (:func:`_candidates`; the first is the untuned default, :mod:`._tuning` times the rest on
a GPU): ``BLOCK_N`` = Cout rounded up to a power of two, at most 128 (Cout <= 128 is one tile:
A read once; wider Cout reuses A from L2), ``BLOCK_M`` 128 on large images and 64 from 16 x 16
down (a 7 x 7 sample is one 64-row tile: 77% of its rows used; smaller tiles would only re-read
the weight more often), ``BLOCK_K`` = K rounded up to a power of two, at most 64 (32 for
float32, whose FMA path holds its operands in registers, and for ungated 128 x 128 tiles, to keep
two 8-warp CTAs per SM); then BLOCK_M, and BLOCK_N, are halved
(not below 32) until the grid has 2 programs per SM (``dwconv.MIN_PROGRAMS``: batch 1, the 7 x 7
layers). The pool keeps the pixel loop's column sums live: 64 x 64 on 4 warps (64 x 128 took 255
registers), float32 64 x 64 on 8. ``num_warps`` 8 for 128 x 128 tiles,
else 4 (64 float32 accumulators per thread); ``num_stages`` 3 for 16-bit (3 x 32 KB of shared
memory at 128 x 128 x 64), 2 for float32. Tile dims are at least 16 (``tl.dot``'s minimum).
Compiled for sm_90 (tests/test_triton_pointwise_compile.py prints them): 108-208 registers and no
spills at B0's expand / project / head, 8-16 warps resident per SM; 16-bit dots are ``wgmma``
(``mma.sync`` below 64 rows), float32 is FMA.

Vector accesses: Triton's launch specialisation only marks integers divisible by 16, so the
kernel takes ``VEC_X`` / ``VEC_W`` / ``VEC_O`` (:func:`._jit.vector_width` of the contiguous
extent: K / K / Cout in channels_last, H W / K / H W in NCHW) and passes those extents and the
strides built from them through :func:`._jit.multiple_of`: K = 24, 40, 56 in fp16 still get
128-bit loads.

Offsets are 32-bit unless :func:`~effnet_kernels._launch.needs_int64` says x, the output or the
residual may pass 2^31 elements; then the program id, and every offset built from it, is 64-bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .._launch import PointwiseLaunch, prepare_pointwise
from . import _tuning
from ._activation import activate
from .dwconv import MIN_PROGRAMS
from ._jit import (SUM, device_function, device_guard, device_kernel, interpreted, loop_bound, multiple_of,
                   needs_bf16_rtne, needs_dot_upcast, next_pow2, round_bf16_rtne, vector_width)

Tensor = torch.Tensor

MIN_DOT = 16  # tl.dot's smallest M, N and K


@device_function
def _gemm_tile(
    x_ptr, w_ptr, g_ptr, n, p, c, HW, K, KW, COUT, sxn, sxc, sxp,
    HAS_GATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The float32 ``[BLOCK_M, BLOCK_N]`` product of sample ``n``'s pixels ``p`` (gated, rounded to x's
    dtype) and the weight rows ``c`` over all of K."""
    p_ok = (p < HW)[:, None]
    c_ok = (c < COUT)[None, :]
    x_rows = x_ptr + n * sxn + p[:, None] * sxp
    w_cols = w_ptr + c[None, :] * KW
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :] * sxc, mask=p_ok & k_ok[None, :], other=0.0)
        if HAS_GATE:  # se_excite's output, rounded to x's dtype as it would have stored it
            g = tl.load(g_ptr + n * K + k, mask=k_ok, other=0.0).to(tl.float32)
            a32 = a.to(tl.float32) * g[None, :]
            if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
                a = round_bf16_rtne(a32)
            else:
                a = a32.to(x_ptr.dtype.element_ty)
        b = tl.load(w_cols + k[:, None], mask=(k < KW)[:, None] & c_ok, other=0.0)  # KW: K, known VEC_W-aligned
        if UPCAST:  # interpreted bfloat16 (see _jit.needs_dot_upcast): exact products, float32 sums
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # float32: IEEE FMA, no TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@device_kernel(do_not_specialize=("HW", "TILES_M", "inv_hw"))  # pixel counts only bound masks and the grid
def _pointwise_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, o_ptr,
    HW, K, COUT, TILES_M, N_TILES,
    sxn, sxc, sxp, son, soc, sop, inv_hw,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
    POOL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC_X: tl.constexpr, VEC_W: tl.constexpr, VEC_O: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    # VEC_*: the launcher guarantees these extents (and the strides built from them) are multiples of
    # VEC_*, which Triton's specialisation only sees when they are multiples of 16 (see _jit.vector_width)
    KW = K
    if VEC_W > 1:  # the weight's row length
        KW = multiple_of(K, VEC_W)
    if CHANNELS_LAST:
        if VEC_X > 1:
            K = multiple_of(K, VEC_X)
            sxn, sxp = multiple_of(sxn, VEC_X), multiple_of(sxp, VEC_X)
        if VEC_O > 1:
            COUT = multiple_of(COUT, VEC_O)
            son, sop = multiple_of(son, VEC_O), multiple_of(sop, VEC_O)
    else:
        if VEC_X > 1:  # VEC_X = VEC_O: both divide H W
            HW = multiple_of(HW, VEC_X)
            sxn, sxc = multiple_of(sxn, VEC_X), multiple_of(sxc, VEC_X)
            son, soc = multiple_of(son, VEC_X), multiple_of(soc, VEC_X)
    pid = tl.program_id(0)
    if INT64:  # before any product: n * sxn, tile * BLOCK_M, ...
        pid = pid.to(tl.int64)
    c = (pid % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)  # the Cout tile varies fastest (A reused from L2)
    c_ok = c < COUT
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    if POOL:  # one program per (sample, Cout tile): every pixel tile of the sample, in order
        n = pid // N_TILES
        sums = tl.full([BLOCK_N], 0.0, tl.float32)
        for t in range(0, loop_bound(TILES_M)):
            p = t * BLOCK_M + tl.arange(0, BLOCK_M)
            acc = _gemm_tile(x_ptr, w_ptr, g_ptr, n, p, c, HW, K, KW, COUT, sxn, sxc, sxp, HAS_GATE, IEEE, UPCAST,
                             BF16_RTNE, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                acc += bias[None, :]
            u = activate(acc, ACT)
            sums += tl.reduce(tl.where((p < HW)[:, None], u, 0.0), 0, SUM)
        tl.store(o_ptr + n * COUT + c, sums * inv_hw, mask=c_ok)
    else:
        mt = pid // N_TILES
        n = mt // TILES_M
        p = (mt % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = _gemm_tile(x_ptr, w_ptr, g_ptr, n, p, c, HW, K, KW, COUT, sxn, sxc, sxp, HAS_GATE, IEEE, UPCAST,
                         BF16_RTNE, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += bias[None, :]
        u = activate(acc, ACT)
        ok = (p < HW)[:, None] & c_ok[None, :]
        offs = n * son + c[None, :] * soc + p[:, None] * sop
        if HAS_RES:  # residual and output are dense in the same layout: same strides
            u += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
            u = round_bf16_rtne(u)
        tl.store(o_ptr + offs, u.to(o_ptr.dtype.element_ty), mask=ok)


def block_k(lp: PointwiseLaunch, cfg: _tuning.Config) -> int:
    """``BLOCK_K``: K rounded up to a power of two, 16 to 64; 32 for float32 (FMA operands live in registers)
    and for ungated 128 x 128 tiles (sm_90, fp16, B7's 640 -> 3840 expand: 128 registers at 32, 152 at 64,
    which leaves one 8-warp CTA per SM instead of two; gated, whose A tile passes through registers, 32
    took more: 175 against 161 at 3840 -> 640)."""
    wide_tile = cfg.block_a * cfg.block_b >= 128 * 128 and lp.gate is None
    widest = 32 if lp.x.dtype == torch.float32 or wide_tile else 64
    return max(MIN_DOT, min(next_pow2(lp.k), widest))


def num_stages(lp: PointwiseLaunch) -> int:
    """Software-pipeline depth of the K loop: 3 for 16-bit (<= 3 x 32 KB shared at 128 x 128 x 64), 2 for float32."""
    return 2 if lp.x.dtype == torch.float32 else 3


def _programs(lp: PointwiseLaunch, bm: int, bn: int) -> int:
    return lp.n * triton.cdiv(lp.cout, bn) * (1 if lp.pool else triton.cdiv(lp.h * lp.w, bm))


MIN_FILL_BLOCK = 32  # smallest BLOCK_M / BLOCK_N the fill step shrinks to


def _clamp(lp: PointwiseLaunch, bm: int, bn: int, nw: int) -> _tuning.Config:
    """A candidate tile clamped to the shape (tiles no larger than H W and Cout rounded up, >= 16), shrunk
    (pixels first, not below 32) until the grid has MIN_PROGRAMS programs (batch 1: B0's gated 1152 -> 320
    projection at 7 x 7 is 3 programs of 64 x 128, 20 of 32 x 32), warps halved for tiles too small to give
    every thread 16 accumulators."""
    bm = max(MIN_DOT, min(bm, next_pow2(lp.h * lp.w)))
    bn = max(MIN_DOT, min(bn, next_pow2(lp.cout)))
    while _programs(lp, bm, bn) < MIN_PROGRAMS and ((bm > MIN_FILL_BLOCK and not lp.pool) or bn > MIN_FILL_BLOCK):
        if bm > MIN_FILL_BLOCK and not lp.pool:
            bm //= 2
        else:
            bn //= 2
    while nw > 1 and bm * bn < nw * 32 * 16:
        nw //= 2
    return _tuning.Config(bm, bn, nw)


def _candidates(lp: PointwiseLaunch) -> list[_tuning.Config]:
    """Bounded GPU config space of ``Config(BLOCK_M, BLOCK_N, warps)``; the first is the untuned default.

    See the module docstring: BLOCK_N covers Cout up to 128, BLOCK_M is 128 on large images and 64
    from 16 x 16 down; float32 (FMA, operands in registers) keeps 64 x 64 tiles by default.
    """
    hw = lp.h * lp.w
    big = hw > 256
    if lp.pool:  # the loop over a sample's pixel tiles carries the column sums: 64 x 128 on 4 warps took 255 registers
        space = [(64, 64, 8), (32, 32, 4), (64, 32, 4)] if lp.x.dtype == torch.float32 else \
            [(64, 64, 4), (64, 128, 8), (128, 64, 8)]
    elif lp.x.dtype == torch.float32:
        space = [(64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 64, 4)]
    elif big:
        space = [(128, 128, 8), (128, 64, 4), (64, 128, 4), (256, 64, 8)]
    else:
        space = [(64, 128, 4), (64, 64, 4), (32, 128, 4), (128, 128, 8)]
    out = []
    for bm, bn, nw in space:
        cfg = _clamp(lp, bm, bn, nw)
        if cfg not in out:
            out.append(cfg)
    return out


# Shape classes with fewer output elements than this are not tuned (see dwconv.TUNE_MIN_ELEMENTS).
TUNE_MIN_ELEMENTS = 1 << 20


def _space(lp: PointwiseLaunch) -> tuple[list[_tuning.Config], _tuning.Config]:
    """(GPU candidates, the config to use untuned): the interpreter runs the default too (tests shrink it)."""
    candidates = _candidates(lp)
    if interpreted(lp.x) or lp.n * lp.cout * lp.h * lp.w < TUNE_MIN_ELEMENTS:
        return candidates[:1], candidates[0]
    return candidates, candidates[0]


def vectors(lp: PointwiseLaunch) -> tuple[int, int, int]:
    """The kernel's ``(VEC_X, VEC_W, VEC_O)``: elements per aligned vector along x's, the weight's and the
    output's contiguous axis (channels_last: K, K, Cout; NCHW: H W, K, H W)."""
    es = lp.x.element_size()
    vec_w = vector_width(es, lp.k)
    if lp.layout == "nhwc":
        return vector_width(es, lp.k), vec_w, (vector_width(es, lp.cout) if not lp.pool else 1)
    v = vector_width(es, lp.h * lp.w)
    return v, vec_w, v


def _launch(lp: PointwiseLaunch, cfg: _tuning.Config) -> None:
    bm, bn = cfg.block_a, cfg.block_b
    hw = lp.h * lp.w
    tiles_m = triton.cdiv(hw, bm)
    n_tiles = triton.cdiv(lp.cout, bn)
    grid = (lp.n * n_tiles * (1 if lp.pool else tiles_m),)
    out_strides = (lp.out.stride(0), lp.out.stride(1), lp.out.stride(3)) if not lp.pool else (0, 0, 0)
    if lp.residual is not None:  # prepare_pointwise gives it the output's strides
        assert lp.residual.stride() == lp.out.stride(), "residual and output must be dense in one layout"
    vec_x, vec_w, vec_o = vectors(lp)
    sx = lp.x.stride()
    _pointwise_kernel.on(lp.x)[grid](
        lp.x, lp.weight, lp.bias if lp.bias is not None else lp.weight, lp.gate if lp.gate is not None else lp.weight,
        lp.residual if lp.residual is not None else lp.out, lp.out,
        hw, lp.k, lp.cout, tiles_m, n_tiles,
        sx[0], sx[1], sx[3], *out_strides, 1.0 / max(hw, 1),
        ACT=lp.act, HAS_BIAS=lp.bias is not None, HAS_GATE=lp.gate is not None, HAS_RES=lp.residual is not None,
        POOL=lp.pool, IEEE=lp.x.dtype == torch.float32, UPCAST=needs_dot_upcast(lp.x), INT64=lp.int64,
        BF16_RTNE=needs_bf16_rtne(lp.x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k(lp, cfg),
        VEC_X=vec_x, VEC_W=vec_w, VEC_O=vec_o, CHANNELS_LAST=lp.layout == "nhwc",
        num_warps=cfg.num_warps, num_stages=num_stages(lp),
    )


def _timed_launch(lp: PointwiseLaunch) -> Callable[[_tuning.Config], None]:
    """A launch for timing candidates: every store is a plain overwrite, so reruns are harmless."""
    return lambda cfg: _launch(lp, cfg)


def _tune_key(lp: PointwiseLaunch) -> tuple:
    return (
        "pointwise", lp.x.device.index, lp.layout, lp.x.dtype, lp.act, lp.bias is not None, lp.gate is not None,
        lp.residual is not None, lp.pool, next_pow2(lp.k), next_pow2(lp.cout), next_pow2(lp.h * lp.w),
        next_pow2(lp.n), lp.int64,
    )


def pointwise_conv(
    x: Tensor, weight: Tensor, bias, gate, residual, activation: str, pool: bool,
) -> Tensor:
    """Triton implementation of ``effnet::pointwise_conv`` (signature of the reference).

    Args:
        x: ``[N, K, H, W]`` float32/float16/bfloat16, any strides (made dense in its own memory
            format); CUDA, or CPU under ``TRITON_INTERPRET=1``.
        weight: ``[Cout, K]`` any float dtype (used in x's dtype).
        bias: ``[Cout]`` float32 or x's dtype, or None; gate: ``[N, K]`` float32 or x's dtype, or None;
        residual: ``[N, Cout, H, W]`` in x's dtype, or None (not with pool).
        activation: a name of ``ops._checks.ACTIVATIONS``; pool: return the spatial mean.

    Returns:
        ``[N, Cout, H, W]`` in x's dtype and memory format, or ``[N, Cout]`` float32 with ``pool``.
    """
    lp = prepare_pointwise(x, weight, bias, gate, residual, activation, pool)
    if lp.out.numel() == 0:
        return lp.out
    if lp.h * lp.w == 0:  # pool over no pixels: zeros, as the reference's mean of nothing
        return lp.out.zero_()
    with device_guard(lp.x):
        cfg = _tuning.choose(_tune_key(lp), lp.x, lambda: _space(lp), _timed_launch(lp))
        _launch(lp, cfg)
    return lp.out
