"""Triton ``pointwise_conv_backward`` for a 1x1 conv without activation: two GEMMs with the SE gate fused.

The projection conv of an MBConv in training (:mod:`effnet_kernels._train_block`) is
``q = conv1x1(round(y * gate), W)``, the excited tensor ``y * gate`` never written. Its gradients,
for ``g`` the gradient at q (``[M, Cout]``, M = N H W pixels, K = y's channels):

* **dgrad** (:func:`_dgrad_kernel`): ``e = g W`` (``[M, K]``, float32 accumulators over Cout), and in
  the epilogue ``grad_y = round(e * gate)`` and the gate's gradient ``sum over pixels of e * y``,
  one ``[BLOCK_K]`` partial per (sample, pixel tile) program: a tile never straddles two samples.
  The partials are summed in a fixed order (:func:`._partials.sum_rows`).
* **wgrad** (:func:`_wgrad_kernel`): ``grad_W = g^T round(y * gate)`` (``[Cout, K]``), a GEMM whose
  reduction runs over the M pixels: the gated A tile is formed on load, as the forward's prologue
  forms it (rounded to y's dtype: the values the forward multiplied), so neither the excited tensor
  nor its gradient is written. ``Cout x K`` is a few output tiles, so the pixel tiles are split
  over ``SPLITS`` programs per output tile (split-K), each storing a float32 ``[Cout, K]`` partial,
  summed in a fixed order.

No atomics: both are bitwise reproducible run to run (``torch.use_deterministic_algorithms`` holds).
Without a gate, the same two kernels without the gate's loads. The bias's gradient is ``sum(g)``
(float32, one aten reduction over the small ``[M, Cout]`` tensor) and the residual's ``g`` itself.
With an activation or the pool the op keeps the cuDNN path
(:func:`effnet_kernels._aten_convs.pointwise_conv_backward`): the activation's derivative needs
the conv output recomputed.

Bytes (``s`` = 2 B for fp16; per image): dgrad reads g (``s M Cout``) and, gated, y (``s M K``),
writes grad_y (``s M K``); wgrad reads g and y again. The cuDNN path with the excite kernels moves
about seven passes of ``s M K`` (excite: read y, write ``y * gate``; dgrad: write its gradient;
excite backward: read it and y, write grad_y; wgrad: read ``y * gate``) against these three. B0's
gated 1152 -> 320 projection at 7 x 7: 56 KB x 3 against 7 per image. FLOPs: ``2 M K Cout`` each,
as the forward; memory-bound at the expand ratio's K / Cout (H200 ridge 230 FLOP/B: B0's
projections run at 2 Cout K / (s (K + Cout)) <= 250 FLOP/B, at the ridge at most).
(Implied by the arithmetic, not measured.)

Tiles (untuned defaults; :mod:`._tuning` times the candidates on a GPU): dgrad ``BLOCK_M`` = 128
pixels (64 from 16 x 16 down) x ``BLOCK_K`` = K up to 128, Cout in steps of 64 (32 for float32);
wgrad ``BLOCK_C`` = Cout up to 128 x ``BLOCK_K`` = K up to 128 (64 x 64 for float32), pixels in
steps of 64 (32 for float32), and ``SPLITS`` so the grid has ``2 MIN_PROGRAMS`` programs (at most
one pixel tile per split). Offsets are 64-bit when g, y or grad_y may pass 2^31 elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .._launch import as_layout, empty_in_layout, layout_of, needs_int64
from . import _tuning
from ._jit import (SUM, device_function, device_guard, device_kernel, interpreted, loop_bound, multiple_of, needs_bf16_rtne,
                   needs_dot_upcast, next_pow2, round_bf16_rtne, vector_width)
from ._partials import sum_rows
from .dwconv import MIN_PROGRAMS
from .pointwise import MIN_DOT

Tensor = torch.Tensor


@device_function
def gemm_dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (float32): interpreted bfloat16 upcast first (see _jit.needs_dot_upcast), float32 on IEEE FMA
    (no TF32)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@device_function
def round_like(v, ptr, BF16_RTNE: tl.constexpr):
    """float32 ``v`` rounded to ``ptr``'s element dtype (to nearest even by hand where the interpreter would
    truncate bfloat16: see _jit.needs_bf16_rtne)."""
    if BF16_RTNE:
        out = round_bf16_rtne(v)
    else:
        out = v.to(ptr.dtype.element_ty)
    return out


@device_function
def vector_hints(K, C, HW, sxn, sxc, sxp, son, soc, sop, CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr,
                 VEC_O: tl.constexpr):
    """x's (K channels) and a second tensor's (C channels) extents and strides, both dense in one layout, with the
    divisibility the launcher guarantees (:func:`pair_vectors`; see pointwise._pointwise_kernel): along the
    channels on channels_last, along the pixels (``VEC_X = VEC_O`` divides H W) on NCHW."""
    if CHANNELS_LAST:
        if VEC_X > 1:
            K = multiple_of(K, VEC_X)
            sxn, sxp = multiple_of(sxn, VEC_X), multiple_of(sxp, VEC_X)
        if VEC_O > 1:
            C = multiple_of(C, VEC_O)
            son, sop = multiple_of(son, VEC_O), multiple_of(sop, VEC_O)
    elif VEC_X > 1:
        HW = multiple_of(HW, VEC_X)
        sxn, sxc = multiple_of(sxn, VEC_X), multiple_of(sxc, VEC_X)
        son, soc = multiple_of(son, VEC_X), multiple_of(soc, VEC_X)
    return K, C, HW, sxn, sxc, sxp, son, soc, sop


def pair_vectors(layout: str, x: Tensor, k: int, other: Tensor, c: int, hw: int) -> tuple[int, int]:
    """``(VEC_X, VEC_O)`` of :func:`vector_hints`: elements per aligned vector along x's (K channels) and
    ``other``'s (C channels) contiguous axis: K and C on channels_last, H W for both on NCHW."""
    if layout == "nhwc":
        return vector_width(x.element_size(), k), vector_width(other.element_size(), c)
    v = vector_width(max(x.element_size(), other.element_size()), hw)
    return v, v


@device_kernel(do_not_specialize=("HW", "TILES_M"))
def _dgrad_kernel(
    g_ptr, w_ptr, gate_ptr, x_ptr, gx_ptr, part_ptr,
    HW, K, COUT, TILES_M, K_TILES,
    sgn, sgc, sgp, sxn, sxc, sxp,
    HAS_GATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr,
    BF16_RTNE: tl.constexpr, CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr, VEC_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x tile ``[BLOCK_M pixels of one sample, BLOCK_K channels]`` = ``(g W) * gate``, and the gate's
    gradient partial ``sum_p (g W)[p, k] x[p, k]`` of this tile into ``part[n * TILES_M + tile, k]``."""
    K, COUT, HW, sxn, sxc, sxp, sgn, sgc, sgp = vector_hints(K, COUT, HW, sxn, sxc, sxp, sgn, sgc, sgp,
                                                             CHANNELS_LAST, VEC_X, VEC_G)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    k = (pid % K_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)  # the K tile varies fastest: g's rows reused from L2
    mt = pid // K_TILES
    n = mt // TILES_M
    p = (mt % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = p < HW
    k_ok = k < K
    g_rows = g_ptr + n * sgn + p[:, None] * sgp
    acc = tl.full([BLOCK_M, BLOCK_K], 0.0, tl.float32)
    for c0 in range(0, loop_bound(COUT), BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < COUT
        a = tl.load(g_rows + c[None, :] * sgc, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = gemm_dot(a, b, acc, IEEE, UPCAST)
    ok = p_ok[:, None] & k_ok[None, :]
    offs = n * sxn + k[None, :] * sxc + p[:, None] * sxp  # grad_x is dense in x's layout: x's strides
    out = acc
    if HAS_GATE:
        gate = tl.load(gate_ptr + n * K + k, mask=k_ok, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(part_ptr + mt * K + k, tl.reduce(acc * xv, 0, SUM), mask=k_ok)
        out = acc * gate[None, :]
    tl.store(gx_ptr + offs, round_like(out, gx_ptr, BF16_RTNE), mask=ok)


@device_kernel(do_not_specialize=("HW", "TILES_M", "TILES", "CHUNK"))
def _wgrad_kernel(
    g_ptr, x_ptr, gate_ptr, part_ptr,
    HW, K, COUT, TILES_M, TILES, CHUNK, C_TILES, K_TILES,
    sgn, sgc, sgp, sxn, sxc, sxp,
    HAS_GATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr,
    BF16_RTNE: tl.constexpr, CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr, VEC_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``part[split, c, k] = sum over this split's CHUNK pixel tiles of g[p, c] round(x[p, k] gate[n, k])``:
    (sample, pixel tile) pairs ``t`` in ``[split CHUNK, (split + 1) CHUNK)`` of the ``TILES`` in all."""
    K, COUT, HW, sxn, sxc, sxp, sgn, sgc, sgp = vector_hints(K, COUT, HW, sxn, sxc, sxp, sgn, sgc, sgp,
                                                             CHANNELS_LAST, VEC_X, VEC_G)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    k = (pid % K_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)  # output tiles vary fastest: one split's tiles share g, x
    rest = pid // K_TILES
    c = (rest % C_TILES) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = rest // C_TILES
    k_ok = k < K
    c_ok = c < COUT
    acc = tl.full([BLOCK_C, BLOCK_K], 0.0, tl.float32)
    for i in range(0, loop_bound(CHUNK)):
        t = split * CHUNK + i
        n = t // TILES_M
        p = (t % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        p_ok = (p < HW) & (t < TILES)
        # g's tile loaded as [BLOCK_C, BLOCK_M] (its transpose, by the pointers: no shuffle in registers)
        at = tl.load(g_ptr + n * sgn + c[:, None] * sgc + p[None, :] * sgp, mask=c_ok[:, None] & p_ok[None, :],
                     other=0.0)
        b = tl.load(x_ptr + n * sxn + p[:, None] * sxp + k[None, :] * sxc, mask=p_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if HAS_GATE:  # the excited input as the forward's prologue formed it, rounded to x's dtype
            gate = tl.load(gate_ptr + n * K + k, mask=k_ok & (t < TILES), other=0.0).to(tl.float32)
            b = round_like(b.to(tl.float32) * gate[None, :], x_ptr, BF16_RTNE)
        acc = gemm_dot(at, b, acc, IEEE, UPCAST)
    tl.store(part_ptr + split * COUT * K + c[:, None] * K + k[None, :], acc, mask=c_ok[:, None] & k_ok[None, :])


@dataclass
class PointwiseBackwardLaunch:
    """The two GEMMs' operands: ``g`` (the output's gradient) and ``x`` dense in x's layout, in x's dtype."""

    g: Tensor
    x: Tensor
    weight: Tensor  # [Cout, K] in x's dtype, dense
    gate: Optional[Tensor]  # [N, K] float32 or x's dtype, dense
    grad_x: Tensor
    layout: str
    n: int
    k: int
    h: int
    w: int
    cout: int
    int64: bool


def prepare(grad_out: Tensor, x: Tensor, weight: Tensor, gate: Optional[Tensor]) -> PointwiseBackwardLaunch:
    layout = layout_of(x)
    xd = as_layout(x, layout)
    g = as_layout(grad_out.to(x.dtype), layout)
    n, k, h, w = xd.shape
    grad_x = empty_in_layout(tuple(xd.shape), layout, xd)
    return PointwiseBackwardLaunch(
        g=g, x=xd, weight=weight.to(x.dtype).contiguous(), gate=gate.contiguous() if gate is not None else None,
        grad_x=grad_x, layout=layout, n=n, k=k, h=h, w=w, cout=weight.shape[0], int64=needs_int64(g, xd, grad_x),
    )


def _pixel_strides(t: Tensor) -> tuple[int, int, int]:
    """(sample, channel, pixel) strides of a tensor dense in either layout (a pixel is one step along W)."""
    return t.stride(0), t.stride(1), t.stride(3)


def vectors(lp: PointwiseBackwardLaunch) -> tuple[int, int]:
    """``(VEC_X, VEC_G)``: elements per aligned vector along x's and g's contiguous axis (channels_last: K and
    Cout; NCHW: H W for both)."""
    return pair_vectors(lp.layout, lp.x, lp.k, lp.g, lp.cout, lp.h * lp.w)


def _flags(lp: PointwiseBackwardLaunch) -> dict:
    vec_x, vec_g = vectors(lp)
    return dict(HAS_GATE=lp.gate is not None, IEEE=lp.x.dtype == torch.float32, UPCAST=needs_dot_upcast(lp.x),
                INT64=lp.int64, BF16_RTNE=needs_bf16_rtne(lp.x), CHANNELS_LAST=lp.layout == "nhwc", VEC_X=vec_x,
                VEC_G=vec_g)


def _pixel_tile(lp: PointwiseBackwardLaunch, widest: int) -> int:
    return max(MIN_DOT, min(widest, next_pow2(lp.h * lp.w)))


# ---------------------------------------------------------------- dgrad
def _dgrad_programs(lp: PointwiseBackwardLaunch, bm: int, bk: int) -> int:
    return lp.n * triton.cdiv(lp.h * lp.w, bm) * triton.cdiv(lp.k, bk)


def _dgrad_candidates(lp: PointwiseBackwardLaunch) -> list[_tuning.Config]:
    """``Config(BLOCK_M, BLOCK_K, warps)``, the first the untuned default: pixels 128 (64 from 16 x 16 down;
    64 for float32) x K up to 128 (64 for float32), halved (not below 32) until the grid fills the GPU."""
    f32 = lp.x.dtype == torch.float32
    big = lp.h * lp.w > 256
    space = [(64, 64, 4), (32, 64, 4), (64, 32, 4)] if f32 else \
        ([(128, 128, 8), (128, 64, 4), (64, 128, 4)] if big else [(64, 128, 4), (64, 64, 4), (128, 128, 8)])
    out = []
    for bm, bk, nw in space:
        bm = _pixel_tile(lp, bm)
        bk = max(MIN_DOT, min(bk, next_pow2(lp.k)))
        while _dgrad_programs(lp, bm, bk) < MIN_PROGRAMS and (bm > 32 or bk > 32):
            if bm > 32:
                bm //= 2
            else:
                bk //= 2
        while nw > 1 and bm * bk < nw * 32 * 16:
            nw //= 2
        cfg = _tuning.Config(bm, bk, nw)
        if cfg not in out:
            out.append(cfg)
    return out


def _dgrad_block_c(lp: PointwiseBackwardLaunch) -> int:
    return max(MIN_DOT, min(next_pow2(lp.cout), 32 if lp.x.dtype == torch.float32 else 64))


def _launch_dgrad(lp: PointwiseBackwardLaunch, part: Tensor, cfg: _tuning.Config) -> None:
    bm, bk = cfg.block_a, cfg.block_b
    tiles_m = triton.cdiv(lp.h * lp.w, bm)
    k_tiles = triton.cdiv(lp.k, bk)
    _dgrad_kernel.on(lp.x)[(lp.n * tiles_m * k_tiles,)](
        lp.g, lp.weight, lp.gate if lp.gate is not None else lp.weight, lp.x, lp.grad_x, part,
        lp.h * lp.w, lp.k, lp.cout, tiles_m, k_tiles, *_pixel_strides(lp.g), *_pixel_strides(lp.x),
        **_flags(lp), BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=_dgrad_block_c(lp),
        num_warps=cfg.num_warps, num_stages=2 if lp.x.dtype == torch.float32 else 3,
    )


def _gate_partials(lp: PointwiseBackwardLaunch, bm: int) -> Tensor:
    """The dgrad's float32 ``[N, pixel tiles, K]`` buffer of the gate's gradient partials (a stub without gate)."""
    if lp.gate is None:
        return lp.grad_x.new_empty((1,), dtype=torch.float32)
    return torch.empty((lp.n, triton.cdiv(lp.h * lp.w, bm), lp.k), dtype=torch.float32, device=lp.x.device)


def _dgrad(lp: PointwiseBackwardLaunch) -> Optional[Tensor]:
    """Fill ``lp.grad_x``; the gate's float32 ``[N, K]`` gradient, or None without gate."""
    key = ("pointwise_dgrad", lp.x.device.index, lp.layout, lp.x.dtype, lp.gate is not None, next_pow2(lp.k),
           next_pow2(lp.cout), next_pow2(lp.h * lp.w), next_pow2(lp.n), lp.int64)
    cfg = _tuning.choose(key, lp.x, lambda: _space(lp, _dgrad_candidates(lp)),
                         lambda c: _launch_dgrad(lp, _gate_partials(lp, c.block_a), c))
    part = _gate_partials(lp, cfg.block_a)
    _launch_dgrad(lp, part, cfg)
    return sum_rows(part) if lp.gate is not None else None


# ---------------------------------------------------------------- wgrad
def wgrad_tiles(lp: PointwiseBackwardLaunch, cfg: _tuning.Config) -> tuple[int, int, int, int]:
    """``(BLOCK_M, pixel tiles in all, SPLITS, CHUNK)`` of a wgrad launch: pixel tiles per sample of
    ``BLOCK_M`` (:func:`_wgrad_pixel_step`), split over enough programs that the grid has ``2 MIN_PROGRAMS``
    (``CHUNK`` tiles each, at least one)."""
    bm = _pixel_tile(lp, _wgrad_pixel_step(lp))
    out_tiles = triton.cdiv(lp.cout, cfg.block_a) * triton.cdiv(lp.k, cfg.block_b)
    return (bm, *pixel_splits(lp.n, lp.h * lp.w, bm, out_tiles))


def pixel_splits(n: int, hw: int, block_m: int, out_tiles: int) -> tuple[int, int, int]:
    """``(TILES, SPLITS, CHUNK)`` of a reduction over pixels (split-K): the ``n * cdiv(hw, block_m)`` per-sample
    pixel tiles in consecutive chunks of ``CHUNK``, one chunk per split, enough splits that ``out_tiles`` output
    tiles per split give the grid ``2 MIN_PROGRAMS`` programs (at least one tile per split)."""
    tiles = n * triton.cdiv(hw, block_m)
    splits = max(1, min(tiles, triton.cdiv(2 * MIN_PROGRAMS, out_tiles)))
    chunk = triton.cdiv(tiles, splits)
    return tiles, triton.cdiv(tiles, chunk), chunk


def _scalar_pixels(lp: PointwiseBackwardLaunch) -> bool:
    """NCHW with an odd H W (B0's 7 x 7): every element of a tile is its own load, address and mask."""
    return lp.layout == "nchw" and vectors(lp)[0] == 1


def _wgrad_pixel_step(lp: PointwiseBackwardLaunch) -> int:
    """Pixels per step of the wgrad's reduction: 64 (32 for float32), halved on NCHW for :func:`_scalar_pixels`
    and float32 (whose 64 x 64 tiles spilled at 64 / 32 pixels on sm_90: transposed FMA operands)."""
    step = 32 if lp.x.dtype == torch.float32 else 64
    return step // 2 if _scalar_pixels(lp) or (lp.layout == "nchw" and lp.x.dtype == torch.float32) else step


def _wgrad_candidates(lp: PointwiseBackwardLaunch) -> list[_tuning.Config]:
    """``Config(BLOCK_C, BLOCK_K, warps)``, the first the untuned default: Cout up to 128 x K up to 128 on
    channels_last, 64 x 128 on NCHW, 64 x 64 on 8 warps for float32 and where H W is odd."""
    f32 = lp.x.dtype == torch.float32
    if f32:  # IEEE FMA, operands in registers: 64 x 64 on 4 warps spilled ~1 KB (gated)
        space = [(64, 64, 8), (32, 32, 4)] if lp.layout == "nchw" else [(64, 64, 8), (32, 64, 4)]
    elif lp.layout == "nhwc":
        space = [(128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)]
    elif _scalar_pixels(lp):  # 64 x 128 spilled 704 B at 7 x 7 (gated)
        space = [(64, 64, 8), (64, 64, 4), (32, 64, 4)]
    else:  # pixels contiguous: 128 x 128 took 255 registers and spilled (gated)
        space = [(64, 128, 4), (128, 64, 4), (64, 64, 4)]
    out = []
    for bc, bk, nw in space:
        bc = max(MIN_DOT, min(bc, next_pow2(lp.cout)))
        bk = max(MIN_DOT, min(bk, next_pow2(lp.k)))
        while nw > 1 and bc * bk < nw * 32 * 16:
            nw //= 2
        cfg = _tuning.Config(bc, bk, nw)
        if cfg not in out:
            out.append(cfg)
    return out


def _weight_partials(lp: PointwiseBackwardLaunch, cfg: _tuning.Config) -> Tensor:
    splits = wgrad_tiles(lp, cfg)[2]
    return torch.empty((1, splits, lp.cout * lp.k), dtype=torch.float32, device=lp.x.device)


def _launch_wgrad(lp: PointwiseBackwardLaunch, part: Tensor, cfg: _tuning.Config) -> None:
    bc, bk = cfg.block_a, cfg.block_b
    bm, tiles, splits, chunk = wgrad_tiles(lp, cfg)
    c_tiles, k_tiles = triton.cdiv(lp.cout, bc), triton.cdiv(lp.k, bk)
    _wgrad_kernel.on(lp.x)[(splits * c_tiles * k_tiles,)](
        lp.g, lp.x, lp.gate if lp.gate is not None else lp.x, part,
        lp.h * lp.w, lp.k, lp.cout, triton.cdiv(lp.h * lp.w, bm), tiles, chunk, c_tiles, k_tiles,
        *_pixel_strides(lp.g), *_pixel_strides(lp.x),
        **_flags(lp), BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk,  # NCHW 16-bit spilled 32 B at 3 stages (32 x 64 tiles)
        num_warps=cfg.num_warps, num_stages=2 if lp.x.dtype == torch.float32 or lp.layout == "nchw" else 3,
    )


def _wgrad(lp: PointwiseBackwardLaunch) -> Tensor:
    """The weight's float32 ``[Cout, K]`` gradient."""
    key = ("pointwise_wgrad", lp.x.device.index, lp.layout, lp.x.dtype, lp.gate is not None, next_pow2(lp.k),
           next_pow2(lp.cout), next_pow2(lp.h * lp.w), next_pow2(lp.n), lp.int64)
    cfg = _tuning.choose(key, lp.x, lambda: _space(lp, _wgrad_candidates(lp)),
                         lambda c: _launch_wgrad(lp, _weight_partials(lp, c), c))
    part = _weight_partials(lp, cfg)
    _launch_wgrad(lp, part, cfg)
    return sum_rows(part)[0].view(lp.cout, lp.k)


# Shape classes with fewer elements of x than this are not tuned (see pointwise.TUNE_MIN_ELEMENTS).
TUNE_MIN_ELEMENTS = 1 << 20


def _space(lp: PointwiseBackwardLaunch, candidates: list[_tuning.Config]) -> tuple[list[_tuning.Config],
                                                                                     _tuning.Config]:
    if interpreted(lp.x) or lp.x.numel() < TUNE_MIN_ELEMENTS:
        return candidates[:1], candidates[0]
    return candidates, candidates[0]


# ---------------------------------------------------------------- the op
def fuses(activation: str, pool: bool) -> bool:
    """Whether :func:`pointwise_conv_backward` runs the Triton GEMMs (else cuDNN's backward, whose
    activation derivative needs the conv output recomputed)."""
    return activation == "identity" and not pool


def pointwise_conv_backward_with(fallback: Callable[..., tuple]) -> Callable[..., tuple]:
    """The triton backend's ``pointwise_conv_backward`` (the op's signature, without ``backend``): the two
    GEMMs of this module where :func:`fuses`, else ``fallback`` (cuDNN's backward with the Triton excite
    kernels: :func:`effnet_kernels._aten_convs.pointwise_conv_backward_with`)."""

    def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                 residual: Optional[Tensor], activation: str,
                 pool: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients of ``pointwise_conv`` w.r.t. (x, weight, bias, gate, residual); an absent input's is
        empty. grad_out is used in x's dtype (as eager's conv backward uses it)."""
        if not fuses(activation, pool) or x.numel() == 0 or weight.shape[0] == 0:
            return fallback(grad_out, x, weight, bias, gate, residual, activation, pool)
        lp = prepare(grad_out, x, weight, gate)
        with device_guard(lp.x):
            grad_gate = _dgrad(lp)
            grad_w = _wgrad(lp)
        return (  # an absent input's gradient: an empty tensor (each its own: outputs must not alias)
            lp.grad_x,
            grad_w.to(weight.dtype).reshape(weight.shape),
            lp.g.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype) if bias is not None else x.new_empty((0,)),
            grad_gate.to(gate.dtype) if gate is not None else x.new_empty((0,)),
            (lp.g if lp.g is not grad_out else lp.g.clone()) if residual is not None else x.new_empty((0,)),
        )

    return backward
