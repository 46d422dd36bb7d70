"""Triton ``dwconv_bn_act_train``: depthwise conv + BatchNorm with batch statistics + activation (+ squeeze).

Two passes over x:

1. statistics (:func:`batch_statistics`): ``_dwconv_stats_kernel`` computes the conv output
   ``z`` of a ``BLOCK_H x BLOCK_W`` pixel x ``BLOCK_C`` channel tile of one sample (the same
   tap loop as the forward, :func:`conv_tile`) and stores the tile's per-channel
   ``(count, mean, M2)`` (M2 the sum of squared deviations from the tile's own mean, exact
   two-pass in registers); :func:`._partials.combine_moments` merges the tiles' triples in a
   fixed order by Chan's formula into the batch mean and biased variance. No sum of squares of
   large-mean values, no atomics: accurate whatever ``mean / std`` is, and bitwise reproducible.
2. apply: the eval kernel (:func:`effnet_kernels.triton.dwconv.dwconv_bn_act`) with the
   statistics folded into ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``
   (float32). The fold computes ``u = z * scale + shift``: the rounding of ``mean * scale``
   costs ``~2^-24 |mean| / std`` of u, well inside the parity rule unless the conv output's
   mean is thousands of standard deviations (tests/test_triton_train.py checks a mean of ~85 std in fp32).

With ``mean`` / ``var`` given (a backward's recompute of its forward) pass 1 is skipped and
they are returned as given.

Bytes per call (``E`` bytes per element, ``X = N C H W``, ``P = N C Ho Wo``): pass 1 reads x
(``X E``; halo re-reads from L1/L2) and writes ``12 C`` per tile; the combine reads those;
pass 2 reads x and writes y (``X E + P E``). In all ``2 X E + P E`` (fp16, stride 1: 6 B per
output element, the eval op's 4 B plus one more read of x), as PyTorch's eager train-mode
BatchNorm reads z twice and writes it once on top of the conv's ``X E + P E``.

The tile helpers here (:func:`program_tile`, :func:`tile_index`, :func:`conv_tile`,
:func:`pixel_sum`, :func:`per_channel`, :class:`Geometry`) are shared with the backward
kernels (:mod:`.dwconv_backward`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .._launch import as_layout, layout_of, needs_int64
from . import dwconv as _dwconv
from ._jit import SUM, device_function, device_guard, device_kernel, interpreted, multiple_of, next_pow2, vector_width
from ._partials import combine_moments
from ._weights import fold_tap_major

Tensor = torch.Tensor

# (pixels, channels) per program in Triton's interpreter, where every op costs about the same
# whatever the tile: few, large tiles run fastest. Tests shrink it to exercise several tiles.
INTERPRETER_TILE = (256, 32)
# NCHW (pixels, channels, warps) on a GPU, read off ptxas for sm_90 (tests/test_triton_train_compile.py):
# on 4 warps the stats kernel spilled 24 B and the input-gradient kernel took 254 registers; on 8, <= 128.
NCHW_TILE = (128, 8, 8)


@dataclasses.dataclass
class Geometry:
    """A depthwise conv's sizes; ``x`` dense in ``layout`` (``"nhwc"`` = channels_last)."""

    x: Tensor
    layout: str
    n: int
    c: int
    h: int
    w: int
    ho: int
    wo: int
    k: int
    sh: int
    sw: int
    pad_top: int
    pad_left: int
    int64: bool

    @property
    def channels_last(self) -> bool:
        return self.layout == "nhwc"

    @property
    def m(self) -> int:
        """Values per channel of the conv output, N * Ho * Wo."""
        return self.n * self.ho * self.wo


def geometry(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
             *others: Optional[Tensor]) -> Geometry:
    """The geometry of ``dwconv(pad(x), weight)``; ``others`` (e.g. grad_y) only widen the int64 test."""
    layout = layout_of(x)
    xd = as_layout(x, layout)
    n, c, h, w = xd.shape
    k = weight.shape[-1]
    left, right, top, bottom = padding
    ho = (h + top + bottom - k) // stride[0] + 1
    wo = (w + left + right - k) // stride[1] + 1
    return Geometry(x=xd, layout=layout, n=n, c=c, h=h, w=w, ho=ho, wo=wo, k=k, sh=stride[0], sw=stride[1],
                    pad_top=top, pad_left=left, int64=needs_int64(xd, *others) or n * c * ho * wo > 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class Tile:
    """A program's tile over a ``rows x cols`` plane: ``block_h x block_w`` pixels x ``block_c`` channels."""

    block_h: int
    block_w: int
    block_c: int
    num_warps: int
    tiles_w: int
    tiles: int  # tiles per sample and channel block

    def grid(self, g: Geometry) -> tuple[int, int]:
        return g.n * self.tiles, triton.cdiv(g.c, self.block_c)

    def rows(self, g: Geometry) -> int:
        """Programs along axis 0 (one partial row each)."""
        return g.n * self.tiles

    def constexprs(self) -> dict:
        return dict(BLOCK_H=self.block_h, BLOCK_W=self.block_w, BLOCK_C=self.block_c, num_warps=self.num_warps)


def choose_tile(g: Geometry, rows: int, cols: int, nhwc_pixels: int = 64, nhwc_warps: int = 4) -> Tile:
    """The tile of a kernel over ``rows x cols`` planes.

    GPU: channels_last a whole 128-byte line of channels x ``nhwc_pixels`` pixels on
    ``nhwc_warps`` warps (about square: the smallest halo; the backward kernels, which keep more
    values per element live, take fewer values per thread so that they fit in 128 registers
    without spilling: see :mod:`.dwconv_backward`); NCHW (:data:`NCHW_TILE`) 8 channel planes x
    128 pixels up to 64 wide (a warp's lanes on consecutive W) on 8 warps. Clamped to C and the plane; one
    fixed config (untuned).
    """
    if interpreted(g.x):
        bp, bc, nw = (*INTERPRETER_TILE, 4)
    elif g.channels_last:
        bp, bc, nw = nhwc_pixels, 128 // g.x.element_size(), nhwc_warps
    else:
        bp, bc, nw = NCHW_TILE
    bc = min(bc, max(next_pow2(g.c), 2))
    bp = min(bp, max(next_pow2(rows) * next_pow2(cols), 16))
    widest = 1 << (bp.bit_length() // 2) if g.channels_last else 64
    bw = min(next_pow2(cols), bp, widest)
    bh = max(bp // bw, 1)
    tiles_w = triton.cdiv(cols, bw)
    return Tile(bh, bw, bc, nw, tiles_w, triton.cdiv(rows, bh) * tiles_w)


@device_function
def program_tile(TILES, INT64: tl.constexpr):
    """(sample, tile, partial row) of this program (axis 0 enumerates sample-major tiles)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    return pid // TILES, pid % TILES, pid


@device_function
def tile_index(tile, TILES_W, ROWS, COLS, C, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """(row, col, channel, channel vector, in-bounds mask) of the tile's elements.

    channels_last: a ``[pixels, BLOCK_C]`` tile, channels fastest; NCHW: ``[BLOCK_C, pixels]``,
    pixels fastest (rows of ``BLOCK_W``, a power of two: shifts and masks, no division).
    """
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    r1 = (tile // TILES_W) * BLOCK_H + i // BLOCK_W
    q1 = (tile % TILES_W) * BLOCK_W + i % BLOCK_W
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        c1 = c1.to(tl.int64)
    if CHANNELS_LAST:
        r, q, c = r1[:, None], q1[:, None], c1[None, :]
    else:
        r, q, c = r1[None, :], q1[None, :], c1[:, None]
    return r, q, c, c1, (r < ROWS) & (q < COLS) & (c < C)


@device_function
def pixel_sum(v, CHANNELS_LAST: tl.constexpr):
    """Per-channel sum of a tile over its pixels (a ``[BLOCK_C]`` vector)."""
    if CHANNELS_LAST:
        s = tl.reduce(v, 0, SUM)
    else:
        s = tl.reduce(v, 1, SUM)
    return s


@device_function
def per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A ``[BLOCK_C]`` vector broadcast along the tile's pixel axis."""
    if CHANNELS_LAST:
        b = v[None, :]
    else:
        b = v[:, None]
    return b


@device_function
def conv_tile(x_ptr, w_ptr, WC, n, oh, ow, c, ok, C, H, W, sxn, sxc, sxh, sxw, pad_top, pad_left,
              K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
    """float32 ``z = dwconv(pad(x))`` at the tile's output pixels (0 where ``ok`` is false).

    ``w_ptr``: tap-major ``[K * K, WC]`` float32 weights (:func:`._weights.fold_tap_major`).
    """
    c_ok = c < C
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_tile = x_ptr + n * sxn + c * sxc + iw0 * sxw
    acc = tl.where(ok, 0.0, 0.0)
    for kh in tl.static_range(K):
        ih = ih0 + kh
        row_ok = ok & (ih >= 0) & (ih < H)
        x_row = x_tile + ih * sxh
        for kw in tl.static_range(K):
            iw = iw0 + kw
            xv = tl.load(x_row + kw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            wv = tl.load(w_ptr + c + (kh * K + kw) * WC, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv
    return acc


DWCONV_DO_NOT_SPECIALIZE = ("H", "W", "HO", "WO", "TILES_W", "TILES", "pad_top", "pad_left")


@device_kernel(do_not_specialize=DWCONV_DO_NOT_SPECIALIZE)
def _dwconv_stats_kernel(
    x_ptr, w_ptr, part_ptr,
    C, WC, H, W, HO, WO, TILES_W, TILES,
    sxn, sxc, sxh, sxw, pad_top, pad_left,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    """part[row, 0:3, c] = (count, mean, M2) of z over this program's tile (row = sample * TILES + tile)."""
    if VEC > 1:  # channels_last: VEC divides C and x's pixel strides (see _jit.vector_width): aligned channel
        # vectors, which Triton's specialisation sees only when C % 16 == 0 (C = 40, 56: 255 registers and
        # 36 B of spills at B3's / B6's first block without it, benchmarks/results/kernel_audit_train.md)
        C = multiple_of(C, VEC)
        sxn, sxh, sxw = multiple_of(sxn, VEC), multiple_of(sxh, VEC), multiple_of(sxw, VEC)
    n, tile, row = program_tile(TILES, INT64)
    oh, ow, c, c1, ok = tile_index(tile, TILES_W, HO, WO, C, CHANNELS_LAST, INT64, BLOCK_H, BLOCK_W, BLOCK_C)
    z = conv_tile(x_ptr, w_ptr, WC, n, oh, ow, c, ok, C, H, W, sxn, sxc, sxh, sxw, pad_top, pad_left, K, SH, SW)
    cnt = pixel_sum(tl.where(ok, 1.0, 0.0), CHANNELS_LAST)
    mean = pixel_sum(z, CHANNELS_LAST) / tl.maximum(cnt, 1.0)  # z is 0 outside the tile
    d = tl.where(ok, z - per_channel(mean, CHANNELS_LAST), 0.0)
    m2 = pixel_sum(d * d, CHANNELS_LAST)
    out = part_ptr + row * (3 * C) + c1
    c_ok = c1 < C
    tl.store(out, cnt, mask=c_ok)
    tl.store(out + C, mean, mask=c_ok)
    tl.store(out + 2 * C, m2, mask=c_ok)


def tap_major(weight: Tensor) -> Tensor:
    """The unscaled depthwise weight as the tap-major ``[k*k, CP]`` float32 array the kernels read."""
    return fold_tap_major(weight, torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device))


def conv_args(g: Geometry, w_tap: Tensor, tile: Tile) -> tuple:
    """The launch arguments every conv-recomputing kernel takes after its pointers, in order."""
    return (g.c, w_tap.shape[1], g.h, g.w, g.ho, g.wo, tile.tiles_w, tile.tiles, *g.x.stride(), g.pad_top, g.pad_left)


def conv_constexprs(g: Geometry, tile: Tile) -> dict:
    return dict(K=g.k, SH=g.sh, SW=g.sw, CHANNELS_LAST=g.channels_last, INT64=g.int64, **tile.constexprs())


def channel_vector(g: Geometry, *others: Optional[Tensor]) -> int:
    """A conv-recomputing kernel's ``VEC``: channels per aligned 128-bit vector of x, dividing C and the pixel
    strides of x and of the ``others`` (the per-pixel tensors the kernel also reads or writes; None: absent).

    Only where Triton's launch specialisation cannot see the alignment itself (an extent not a multiple
    of 16: C = 40, 56), channels_last and 32-bit offsets; else 1, the kernel without the hint. Where every
    extent is a multiple of 16 the hint only re-derives what Triton knows, and it cost registers there (B0's
    k5 s2 input gradient: 146 against 113); with 64-bit offsets the fp32 k7 statistics kernel spilled 17 KB.
    """
    if not g.channels_last or g.int64:
        return 1
    extents = [g.c] + [s for t in (g.x, *others) if t is not None for s in (t.stride(0), t.stride(2), t.stride(3))]
    if all(e % 16 == 0 for e in extents):
        return 1
    return vector_width(g.x.element_size(), *extents)


def batch_statistics(g: Geometry, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (float32 ``[C]``) of ``z = dwconv(pad(x), weight)`` over (N, Ho, Wo)."""
    if g.m == 0:
        z = torch.zeros(g.c, dtype=torch.float32, device=g.x.device)
        return z, z.clone()
    tile = choose_tile(g, g.ho, g.wo)
    w_tap = tap_major(weight)
    part = torch.empty((tile.rows(g), 3, g.c), dtype=torch.float32, device=g.x.device)
    with device_guard(g.x):
        _dwconv_stats_kernel.on(g.x)[tile.grid(g)](g.x, w_tap, part, *conv_args(g, w_tap, tile),
                                                  **conv_constexprs(g, tile), VEC=channel_vector(g))
        return combine_moments(part)


def dwconv_bn_stats(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Triton ``effnet::dwconv_bn_stats`` (signature of the reference): :func:`batch_statistics`."""
    return batch_statistics(geometry(x, weight, stride, padding), weight)


def dwconv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Optional[Tensor],
    var: Optional[Tensor],
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Triton implementation of ``effnet::dwconv_bn_act_train`` (signature of the reference).

    Returns ``(y, pooled, mean, var)``: ``y`` in x's dtype and memory format, ``pooled``
    ``[N, C]`` float32 or ``None``, the batch ``mean`` / biased ``var`` float32 ``[C]`` (the
    given ones when given).
    """
    if mean is None or var is None:
        mean, var = batch_statistics(geometry(x, weight, stride, padding), weight)
        mean, var = mean.to(gamma.dtype), var.to(gamma.dtype)
    scale = gamma.to(torch.float32) * torch.rsqrt(var.to(torch.float32) + eps)
    shift = beta.to(torch.float32) - mean.to(torch.float32) * scale
    y, pooled = _dwconv.dwconv_bn_act(x, weight, scale, shift, stride, padding, activation, squeeze)
    return y, pooled, mean, var
