"""Triton ``dwconv_bn_act``: depthwise k x k conv + folded BatchNorm + activation (+ SE squeeze).

One kernel serves both memory formats and every activation (the constexpr ``ACT``, see
:mod:`._activation`). A program computes a row-aligned 2-D tile of ``BLOCK_H x BLOCK_W``
output pixels (``BLOCK_W`` a power of two, so the pixel's row and column are a shift and a
mask; no runtime div/mod per element) x ``BLOCK_C`` channels of one sample, with float32
accumulation; the epilogue adds ``shift`` and applies the activation, stores the tile in
the input's dtype and, with the squeeze, sums the activated float32 values per channel:

* channels_last (the fast path): the tile is ``[pixels, BLOCK_C]`` with channels fastest;
  ``BLOCK_C`` is a whole 128-byte line (64 fp16/bf16, 32 fp32) so loads and stores are
  128-bit vectors along C, each thread holding several pixels; the tile is about square
  (smallest halo). That needs C * element size to be a multiple of 16 bytes, not C a
  multiple of 16 (which is all Triton's launch specialisation sees): the constexpr ``VEC``
  (:func:`channel_vector`) tells the kernel how many channels per vector are aligned, so
  C = 24, 40, 56 get 128-bit accesses too (and C = 12 fp16 64-bit ones);
* NCHW: the tile transposed (``[BLOCK_C, pixels]``), up to 64 pixels wide so a warp's 32
  lanes read 32 consecutive W (coalesced 64-128 B per instruction). The k taps of a row are
  shifted by one element each, so these loads cannot be 16-byte aligned and stay scalar;
  converting NCHW to channels_last at the boundary instead would add a read and a write of
  x and of y (3x this kernel's bytes at stride 1), so it is not done.

Weights are the tap-major ``[k*k, CP]`` float32 array with the BN scale folded in
(:mod:`._weights`, prepared once per fold and cached), read per tap as 128-bit vectors
along C, in the tile's own layout (:func:`weight_tile` says how). The k x k windows of
neighbouring pixels overlap; the reuse is left to L1 (no shared-memory staging), which the
squeeze's atomics no longer invalidate: they are
``sem="relaxed"`` (a plain ``REDG`` in SASS, no ``MEMBAR`` / ``CCTL.IVALL``).

Squeeze: sums are pre-scaled by ``1 / (Ho * Wo)``. When one tile covers a sample's
whole output, the tile stores its sums straight into ``mean``. Otherwise either every
tile atomically adds into the zeroed ``mean`` (fast, not bitwise reproducible), or, when
``torch.are_deterministic_algorithms_enabled()``, every tile stores its sums into a
``[N, tiles, C]`` float32 buffer that a second small kernel reduces in a fixed order.

Bytes and FLOPs per launch (``E`` bytes per element): read x once (``N C H W E``; the halo
re-reads hit L1/L2), write y (``N C Ho Wo E``), weights ``4 k^2 C`` and shift ``4C`` per
program column (L2), mean ``4NC``; ``2 k^2`` FLOPs per output plus the epilogue. B0's
largest layer (N = 256, C = 96, 112 x 112 -> 56 x 56, k3 s2, fp16): 617 MB + 154 MB =
771 MB, which at an H200's ~4.8 TB/s implies ~160 us (implied by the bytes, not
measured); 1.4 GFLOP.

Offsets are 32-bit unless :class:`~effnet_kernels._launch.DWConvLaunch` says they may
not fit (``int64``), in which case the kernel is specialised for 64-bit offsets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._launch import DWConvLaunch, prepare_dwconv
from . import _tuning
from ._activation import activate
from ._jit import (SUM, device_guard, device_kernel, interpreted, multiple_of, needs_bf16_rtne, next_pow2,
                   round_bf16_rtne, vector_width)
from ._weights import tap_major_weight

Tensor = torch.Tensor

# squeeze modes (constexpr SQUEEZE)
_NO_SQUEEZE, _SQUEEZE_ATOMIC, _SQUEEZE_STORE = 0, 1, 2

# The one fixed config for Triton's interpreter (CPU tensors), where every op costs the
# same ~0.5 ms whatever the tile size, so fewer, larger tiles run faster. Tests shrink it
# to exercise several tiles and channel blocks.
INTERPRETER_CONFIG = _tuning.Config(block_a=64, block_b=32, num_warps=4)


# spatial sizes only bound masks and the row axis: not specialised, so they share one compile
@device_kernel(do_not_specialize=("H", "W", "HO", "WO", "TILES_W", "TILES", "pad_top", "pad_left"))
def _dwconv_bn_act_kernel(
    x_ptr, w_ptr, shift_ptr, y_ptr, red_ptr,
    C, WC, H, W, HO, WO, TILES_W, TILES,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    pad_top, pad_left, inv_hw,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    ACT: tl.constexpr, SQUEEZE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
    BF16_RTNE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    VEC: tl.constexpr, WEIGHT_TILE: tl.constexpr,
):
    if VEC > 1:  # channels_last: VEC divides C and the pixel strides, so channel vectors of VEC elements
        # are aligned, which Triton's specialisation only sees when C % 16 == 0 (see _jit.vector_width)
        C = multiple_of(C, VEC)
        sxn, sxh, sxw = multiple_of(sxn, VEC), multiple_of(sxh, VEC), multiple_of(sxw, VEC)
        syn, syh, syw = multiple_of(syn, VEC), multiple_of(syh, VEC), multiple_of(syw, VEC)
    pid = tl.program_id(0)
    if INT64:  # before any product: th * BLOCK_H, n * stride, ...
        pid = pid.to(tl.int64)
    n = pid // TILES
    tile = pid % TILES
    i = tl.arange(0, BLOCK_H * BLOCK_W)  # BLOCK_W is a power of two: // and % are a shift and a mask
    oh1 = (tile // TILES_W) * BLOCK_H + i // BLOCK_W
    ow1 = (tile % TILES_W) * BLOCK_W + i % BLOCK_W
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:  # tile [pixels, BLOCK_C], channels fastest
        oh, ow, c = oh1[:, None], ow1[:, None], c1[None, :]
        acc = tl.full([BLOCK_H * BLOCK_W, BLOCK_C], 0.0, tl.float32)
    else:  # tile [BLOCK_C, pixels], pixels (rows of BLOCK_W along W) fastest
        oh, ow, c = oh1[None, :], ow1[None, :], c1[:, None]
        acc = tl.full([BLOCK_C, BLOCK_H * BLOCK_W], 0.0, tl.float32)
    c_ok = c < C
    tile_ok = (oh < HO) & (ow < WO) & c_ok
    if INT64:
        c = c.to(tl.int64)
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_tile = x_ptr + n * sxn + c * sxc + iw0 * sxw
    w_c = w_ptr + c  # tap-major [K * K, WC], BN scale folded in (see _weights.py)
    if WEIGHT_TILE:  # weights (and shift) addressed per tile element: loaded in the tile's layout (see weight_tile)
        w_c = tl.broadcast_to(w_c, acc.shape)

    for kh in tl.static_range(K):
        ih = ih0 + kh
        row_ok = tile_ok & (ih >= 0) & (ih < H)
        x_row = x_tile + ih * sxh
        for kw in tl.static_range(K):
            iw = iw0 + kw
            xv = tl.load(x_row + kw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            wv = tl.load(w_c + (kh * K + kw) * WC, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv

    shift_c = shift_ptr + c
    if WEIGHT_TILE:
        shift_c = tl.broadcast_to(shift_c, acc.shape)
    u = activate(acc + tl.load(shift_c, mask=c_ok, other=0.0), ACT)
    out = u
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    tl.store(y_ptr + n * syn + c * syc + oh * syh + ow * syw, out.to(y_ptr.dtype.element_ty), mask=tile_ok)

    if SQUEEZE != 0:
        if CHANNELS_LAST:
            s = tl.reduce(tl.where(tile_ok, u, 0.0), 0, SUM) * inv_hw
        else:
            s = tl.reduce(tl.where(tile_ok, u, 0.0), 1, SUM) * inv_hw
        if INT64:
            c1 = c1.to(tl.int64)
        if SQUEEZE == 1:  # relaxed: a plain red.global, no fence / L1 invalidation (nothing reads it here)
            tl.atomic_add(red_ptr + n * C + c1, s, mask=c1 < C, sem="relaxed")
        else:
            tl.store(red_ptr + (n * TILES + tile) * C + c1, s, mask=c1 < C)


@device_kernel
def _sum_tiles_kernel(part_ptr, mean_ptr, C, TILES, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean[n, c] = sum over t of part[n, t, c], in a fixed order (bitwise reproducible)."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    t0 = 0
    while t0 < TILES:  # not range(): see se_gate.py on Triton's interpreter and numpy >= 2.4
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < TILES)[:, None] & c_ok[None, :]
        acc += tl.load(part_ptr + (n * TILES + t[:, None]) * C + c[None, :], mask=ok, other=0.0)
        t0 += BLOCK_T
    tl.store(mean_ptr + n * C + c, tl.reduce(acc, 0, SUM), mask=c_ok)


# An H200 has 132 SMs; a grid of fewer than two programs per SM leaves some idle for the whole launch.
SM_COUNT = 132
MIN_PROGRAMS = 2 * SM_COUNT


def tile_shape(lp: DWConvLaunch, block_p: int) -> tuple[int, int]:
    """``(BLOCK_H, BLOCK_W)`` of a ``block_p``-pixel tile: row-aligned, BLOCK_W a power of two <= next_pow2(Wo).

    channels_last: about square (the smallest halo: ``(BH*SH + k-1) x (BW*SW + k-1)`` input
    pixels per tile); NCHW: up to 64 wide, so a warp's lanes read consecutive W.
    """
    widest = 64 if lp.layout == "nchw" else 1 << (block_p.bit_length() // 2)
    bw = min(next_pow2(lp.wo), block_p, widest)
    return max(block_p // bw, 1), bw


def _programs(lp: DWConvLaunch, block_p: int, block_c: int) -> int:
    bh, bw = tile_shape(lp, block_p)
    return lp.n * triton.cdiv(lp.ho, bh) * triton.cdiv(lp.wo, bw) * triton.cdiv(lp.c, block_c)


def _fill(lp: DWConvLaunch, bp: int, bc: int, min_p: int, min_c: int) -> tuple[int, int]:
    """Shrink a tile (pixels first, then channels) until the grid has MIN_PROGRAMS programs or the floors are hit."""
    while _programs(lp, bp, bc) < MIN_PROGRAMS and (bp > min_p or bc > min_c):
        if bp > min_p:
            bp //= 2
        else:
            bc //= 2
    return bp, bc


def _candidates(lp: DWConvLaunch) -> list[_tuning.Config]:
    """Bounded GPU config space of ``Config(pixels, channels, warps)``; the first is the untuned default.

    channels_last: BLOCK_C is a whole 128-byte line of channels (64 fp16/bf16, 32 fp32) or two,
    each thread holding 8 (or 4 fp32) channels x 2-4 pixels. NCHW: 4-8 channel planes x 64-256
    pixels. Every tile is clamped to C and Ho x Wo, then shrunk (pixels first) until the grid
    fills the GPU (small shapes: batch 1, the late 7 x 7 layers). With 64-bit offsets the
    channels_last default is the 32-pixel tile (registers <= 128: 16 warps per SM).
    """
    if lp.layout == "nhwc":
        line = 128 // lp.x.element_size()
        space = [(64, line, 4), (32, line, 4), (16, 2 * line, 4), (128, line, 8), (64, 2 * line, 8)]
        if lp.int64:  # 64-bit addresses per pixel: 64 x 64 bf16 k3 s2 took 151 registers (12 warps/SM), 32 x 64 86
            space[0], space[1] = space[1], space[0]
        min_p, min_c = 8, min(line, 32)
    else:
        space = [(128, 8, 4), (256, 4, 8), (64, 8, 4), (256, 8, 8)]  # (128, 4, 4) spilled 4 B at 4 x 32 tiles
        min_p, min_c = 32, 2
    cmax, pmax = next_pow2(lp.c), next_pow2(lp.ho) * next_pow2(lp.wo)
    out = []
    vec = 16 // lp.x.element_size()  # elements of one 128-bit access
    for bp, bc, nw in space:
        bp, bc = _fill(lp, min(bp, max(pmax, 16)), min(bc, max(cmax, 2)), min_p, min_c)
        if lp.layout == "nhwc":
            while nw > 1 and bp * bc < nw * 32 * vec:  # a small tile keeps whole vectors per thread, on fewer warps
                nw //= 2
        cfg = _tuning.Config(bp, bc, nw)
        if cfg not in out:
            out.append(cfg)
    return out


# Shape classes whose output has fewer elements than this (bounded above by the class's
# powers of two) are not tuned: such a launch takes ~launch latency whatever the tiles, so
# timing 5 candidates would only buy 5 compiles (1-9 s each of host CPU).
TUNE_MIN_ELEMENTS = 1 << 20


def _space(lp: DWConvLaunch) -> tuple[list[_tuning.Config], _tuning.Config]:
    """(GPU candidates, the config to use untuned): the interpreter's fixed one, or the first candidate."""
    candidates = _candidates(lp)
    if interpreted(lp.x):
        return candidates, INTERPRETER_CONFIG
    if next_pow2(lp.n) * next_pow2(lp.c) * next_pow2(lp.ho) * next_pow2(lp.wo) < TUNE_MIN_ELEMENTS:
        return candidates[:1], candidates[0]  # one candidate: cached untimed
    return candidates, candidates[0]


def channel_vector(lp: DWConvLaunch) -> int:
    """The kernel's ``VEC``: channels per aligned 128-bit vector (channels_last; 1 for NCHW, whose taps
    shift W by one element). It divides C and every pixel stride of x and y, so C = 24/40/56 (fp16:
    48/80/112-byte pixels) still get 16-byte accesses; C = 1, odd C, C = 12 fp16 get narrower ones."""
    if lp.layout != "nhwc":
        return 1
    sx, sy = lp.x.stride(), lp.y.stride()
    return vector_width(lp.x.element_size(), lp.c, sx[0], sx[2], sx[3], sy[0], sy[2], sy[3])


def weight_tile(lp: DWConvLaunch, cfg: _tuning.Config) -> bool:
    """The kernel's ``WEIGHT_TILE``: load weights and shift through pointers of the whole tile's shape.

    A ``[1, BLOCK_C]`` load (one row of channels, broadcast over the pixels) is laid out by
    Triton on its own: with fewer elements than threads, Triton 3.6 rematerialises it in the
    tile's layout (each thread loads its own channel vector, 128-bit); otherwise it keeps a
    layout of ``BLOCK_C / threads`` elements per thread plus a layout conversion per tap:
    scalar loads on the batch-1 tiles of 8 pixels x 64 fp16 channels on 64 threads (SASS
    LDG 128:25 32:26 at k5). Addressed per tile element, the load takes the tile's layout,
    128-bit, but is repeated for each pixel a thread holds (k5, 64 x 64 fp16 on 4 warps:
    302 LDG.128 instead of 152), so it is used only where the row load would not be
    rematerialised (``BLOCK_C >= threads``; those candidate tiles hold 1-2 pixels per thread).
    """
    return lp.layout == "nhwc" and cfg.block_b >= 32 * cfg.num_warps


def _launch(lp: DWConvLaunch, cfg: _tuning.Config, deterministic: bool) -> None:
    bh, bw = tile_shape(lp, cfg.block_a)
    bc = cfg.block_b
    tiles_w = triton.cdiv(lp.wo, bw)
    tiles = triton.cdiv(lp.ho, bh) * tiles_w
    red: Optional[Tensor] = None
    mode = _NO_SQUEEZE
    if lp.mean is not None:
        if tiles == 1:
            mode, red = _SQUEEZE_STORE, lp.mean
        elif deterministic:
            mode = _SQUEEZE_STORE
            red = torch.empty((lp.n, tiles, lp.c), dtype=torch.float32, device=lp.x.device)
        else:  # lp.mean comes zero-filled
            mode, red = _SQUEEZE_ATOMIC, lp.mean
    grid = (lp.n * tiles, triton.cdiv(lp.c, bc))
    _dwconv_bn_act_kernel.on(lp.x)[grid](
        lp.x, lp.weight, lp.shift, lp.y, red if red is not None else lp.y,
        lp.c, lp.weight.shape[1], lp.h, lp.w, lp.ho, lp.wo, tiles_w, tiles,
        *lp.x.stride(), *lp.y.stride(),
        lp.pad_top, lp.pad_left, 1.0 / (lp.ho * lp.wo),
        K=lp.k, SH=lp.stride_h, SW=lp.stride_w,
        ACT=lp.act, SQUEEZE=mode, CHANNELS_LAST=lp.layout == "nhwc", INT64=lp.int64,
        BF16_RTNE=needs_bf16_rtne(lp.y), BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, VEC=channel_vector(lp),
        WEIGHT_TILE=weight_tile(lp, cfg), num_warps=cfg.num_warps,
    )
    if mode == _SQUEEZE_STORE and red is not lp.mean:
        block_c = min(next_pow2(lp.c), 128)
        _sum_tiles_kernel.on(lp.x)[(lp.n, triton.cdiv(lp.c, block_c))](
            red, lp.mean, lp.c, tiles, BLOCK_T=min(next_pow2(tiles), 16), BLOCK_C=block_c, num_warps=4,
        )


def _timed_launch(lp: DWConvLaunch, deterministic: bool) -> Callable[[_tuning.Config], None]:
    """A launch for timing candidates; it writes a scratch mean (atomics would pile up in ``lp.mean``)."""
    scratch: Optional[DWConvLaunch] = None

    def run(cfg: _tuning.Config) -> None:
        nonlocal scratch
        if scratch is None:
            scratch = dataclasses.replace(lp, mean=None if lp.mean is None else torch.zeros_like(lp.mean))
        _launch(scratch, cfg, deterministic)

    return run


def _tune_key(lp: DWConvLaunch, squeeze_mode: str) -> tuple:
    return (
        "dwconv", lp.x.device.index, lp.layout, lp.x.dtype, lp.k, lp.stride_h, lp.stride_w, lp.act,
        squeeze_mode, next_pow2(lp.c), next_pow2(lp.ho), next_pow2(lp.wo), next_pow2(lp.n), lp.int64,
    )


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Triton implementation of ``effnet::dwconv_bn_act`` (signature of the reference).

    Args:
        x: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (made dense in its
            own memory format); CUDA, or CPU under ``TRITON_INTERPRET=1``.
        weight: ``[C, 1, k, k]``, k odd; scale, shift: ``[C]`` float32.
        stride: ``(sh, sw)``; padding: ``(left, right, top, bottom)``.
        activation: a name of ``ops._checks.ACTIVATIONS``, applied after the affine;
        squeeze: also return the spatial mean.

    Returns:
        ``(y, mean)``: ``y`` in x's dtype and memory format, ``mean`` ``[N, C]`` float32
        (``None`` without squeeze).
    """
    lp = prepare_dwconv(x, weight, scale, shift, stride, padding, activation, squeeze)
    if lp.y.numel() == 0:
        return lp.y, lp.mean
    lp.weight = tap_major_weight(weight, scale)  # [k*k, CP] float32, scale folded: the epilogue adds shift
    deterministic = lp.deterministic
    squeeze_mode = "none" if not squeeze else ("det" if deterministic else "atomic")
    with device_guard(lp.x):
        cfg = _tuning.choose(_tune_key(lp, squeeze_mode), lp.x, lambda: _space(lp), _timed_launch(lp, deterministic))
        _launch(lp, cfg, deterministic)
    return lp.y, lp.mean
