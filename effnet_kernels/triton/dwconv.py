"""Triton ``dwconv_bn_act``: depthwise k x k conv + folded BatchNorm + activation (+ SE squeeze).

One kernel serves both memory formats and every activation (the constexpr ``ACT``, see
:mod:`._activation`). A program computes a tile of ``BLOCK_P`` output
pixels (flattened over Ho x Wo of one sample) x ``BLOCK_C`` channels with float32
accumulation, applies ``scale``/``shift`` and the activation in the epilogue, stores the tile in
the input's dtype and, with the squeeze, sums the activated float32 values of the tile
per channel:

* channels_last (the fast path): the tile is ``[BLOCK_P, BLOCK_C]`` with channels the
  fastest axis, so loads and stores are contiguous and vectorised along C (the channel
  stride 1 is specialised to a constant by Triton);
* NCHW: the same kernel with the tile transposed (``[BLOCK_C, BLOCK_P]``, pixels the
  fastest axis), so a warp walks along W; no layout conversion.

Each of the k x k taps is one masked load of the tile's shifted input window. The
windows of neighbouring taps and pixels overlap, and the reuse is left to L1/L2 (no
explicit shared-memory staging): DRAM sees each input row about once per program.
Padding is any (left, right, top, bottom): out-of-range taps read as zero. Weights are
read per tap from the ``[C, k*k]`` fp32 array (strided along C, so not vectorised;
cached).

Squeeze: sums are pre-scaled by ``1 / (Ho * Wo)``. When one tile covers a sample's
whole output, the tile stores its sums straight into ``mean``. Otherwise either every
tile ``atomic_add``s into the zeroed ``mean`` (fast, not bitwise reproducible), or, when
``torch.are_deterministic_algorithms_enabled()``, every tile stores its sums into a
``[N, tiles, C]`` float32 buffer that a second small kernel reduces in a fixed order.

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
from ._jit import SUM, device_guard, device_kernel, interpreted, needs_bf16_rtne, next_pow2

Tensor = torch.Tensor

# squeeze modes (constexpr SQUEEZE)
_NO_SQUEEZE, _SQUEEZE_ATOMIC, _SQUEEZE_STORE = 0, 1, 2

# The one fixed config for Triton's interpreter (CPU tensors), where every op costs the
# same ~0.5 ms whatever the tile size, so fewer, larger tiles run faster. Tests shrink it
# to exercise several tiles and channel blocks.
INTERPRETER_CONFIG = _tuning.Config(block_a=64, block_b=32, num_warps=4)


# spatial sizes only bound masks and the row axis: not specialised, so they share one compile
@device_kernel(do_not_specialize=("H", "W", "HO", "WO", "TILES", "pad_top", "pad_left"))
def _dwconv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, red_ptr,
    C, H, W, HO, WO, TILES,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    pad_top, pad_left, inv_hw,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    ACT: tl.constexpr, SQUEEZE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
    BF16_RTNE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:  # before any product: tile * BLOCK_P, n * stride, ...
        pid = pid.to(tl.int64)
    n = pid // TILES
    tile = pid % TILES
    p1 = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:  # tile [BLOCK_P, BLOCK_C], channels fastest
        p = p1[:, None]
        c = c1[None, :]
        acc = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    else:  # tile [BLOCK_C, BLOCK_P], pixels fastest
        p = p1[None, :]
        c = c1[:, None]
        acc = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    c_ok = c < C
    oh = p // WO
    ow = p % WO
    if INT64:
        tile_ok = (oh < HO) & c_ok  # = p < HO * WO (p >= 0) without the 32-bit product
        c = c.to(tl.int64)
    else:
        tile_ok = (p < HO * WO) & c_ok
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_tile = x_ptr + n * sxn + c * sxc + iw0 * sxw
    w_c = w_ptr + c * (K * K)

    for kh in tl.static_range(K):
        ih = ih0 + kh
        row_ok = tile_ok & (ih >= 0) & (ih < H)
        x_row = x_tile + ih * sxh
        for kw in tl.static_range(K):
            iw = iw0 + kw
            xv = tl.load(x_row + kw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            wv = tl.load(w_c + (kh * K + kw), mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv

    u = acc * tl.load(scale_ptr + c, mask=c_ok, other=0.0) + tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    u = activate(u, ACT)
    out = u
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = (out.to(tl.uint32, bitcast=True) + 0x7FFF + ((out.to(tl.uint32, bitcast=True) >> 16) & 1)) >> 16
        out = out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(y_ptr + n * syn + c * syc + oh * syh + ow * syw, out.to(y_ptr.dtype.element_ty), mask=tile_ok)

    if SQUEEZE != 0:
        if CHANNELS_LAST:
            s = tl.reduce(tl.where(tile_ok, u, 0.0), 0, SUM) * inv_hw
        else:
            s = tl.reduce(tl.where(tile_ok, u, 0.0), 1, SUM) * inv_hw
        if INT64:
            c1 = c1.to(tl.int64)
        if SQUEEZE == 1:
            tl.atomic_add(red_ptr + n * C + c1, s, mask=c1 < C)
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


def _candidates(lp: DWConvLaunch) -> list[_tuning.Config]:
    """Bounded GPU config space: tiles of 2-8K elements, never much wider than C or Ho*Wo."""
    if lp.layout == "nhwc":
        space = [(64, 32, 4), (32, 64, 4), (16, 128, 4), (64, 64, 8), (128, 32, 8)]
    else:
        space = [(128, 8, 4), (256, 4, 4), (64, 16, 4), (256, 8, 8)]
    cmax, pmax = next_pow2(lp.c), next_pow2(lp.ho * lp.wo)
    out = []
    for bp, bc, nw in space:
        bp, bc = min(bp, max(pmax, 16)), min(bc, max(cmax, 2))
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
    if next_pow2(lp.n) * next_pow2(lp.c) * next_pow2(lp.ho * lp.wo) < TUNE_MIN_ELEMENTS:
        return candidates[:1], candidates[0]  # one candidate: cached untimed
    return candidates, candidates[0]


def _launch(lp: DWConvLaunch, cfg: _tuning.Config, deterministic: bool) -> None:
    bp, bc = cfg.block_a, cfg.block_b
    tiles = triton.cdiv(lp.ho * lp.wo, bp)
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
        lp.x, lp.weight, lp.scale, lp.shift, lp.y, red if red is not None else lp.y,
        lp.c, lp.h, lp.w, lp.ho, lp.wo, tiles,
        *lp.x.stride(), *lp.y.stride(),
        lp.pad_top, lp.pad_left, 1.0 / (lp.ho * lp.wo),
        K=lp.k, SH=lp.stride_h, SW=lp.stride_w,
        ACT=lp.act, SQUEEZE=mode, CHANNELS_LAST=lp.layout == "nhwc", INT64=lp.int64,
        BF16_RTNE=needs_bf16_rtne(lp.y), BLOCK_P=bp, BLOCK_C=bc, num_warps=cfg.num_warps,
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
        squeeze_mode, next_pow2(lp.c), next_pow2(lp.ho * lp.wo), next_pow2(lp.n), lp.int64,
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
    deterministic = lp.deterministic
    squeeze_mode = "none" if not squeeze else ("det" if deterministic else "atomic")
    with device_guard(lp.x):
        cfg = _tuning.choose(_tune_key(lp, squeeze_mode), lp.x, lambda: _space(lp), _timed_launch(lp, deterministic))
        _launch(lp, cfg, deterministic)
    return lp.y, lp.mean
