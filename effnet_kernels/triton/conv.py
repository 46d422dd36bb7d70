"""Triton ``conv_bn_act``: dense k x k conv + folded BatchNorm + activation (a network's stem, issue #12).

``y = act(conv2d(pad(x, padding), weight, stride) + bias)`` in one pass: float32 accumulation,
bias and the activation (the constexpr ``ACT``, :mod:`._activation`) in float32, one rounding
to x's dtype, stored in x's memory format.

Design: an implicit GEMM on the tensor cores
---------------------------------------------

``M`` = output pixels, ``K`` = ``Cin * k * k`` (the stem: 3 * 3 * 3 = 27, padded to one
``BLOCK_K = 32`` chunk by the load masks), ``N`` = ``Cout``. A program owns ``BLOCK_M``
consecutive output pixels of one sample (pixel index ``p = oh * Wo + ow``; one integer
division per pixel, no masked tail per row as with a 2-D tile: 112 x 112 = 98 x 128) times
``BLOCK_N`` output channels, and loops over K in ``BLOCK_K`` chunks; each chunk gathers the
im2col tile ``A [BLOCK_M, BLOCK_K]`` straight from x (column ``kk`` is a ``(ci, kh, kw)``
tap; padding and the K tail are load masks, never materialised), loads ``B [BLOCK_K,
BLOCK_N]`` from the weight through its four strides, and ``tl.dot``\\ s them into a float32
accumulator. The K order follows x's layout so that neighbouring columns are neighbouring
addresses: ``(ci, kh, kw)`` for NCHW (kw runs along W), ``(kh, kw, ci)`` for channels_last
(ci runs along C). The epilogue adds the bias, applies the activation and stores the tile;
y is dense in its layout, so a pixel's offset is ``p * syw`` and stores run along p (NCHW) or
along Cout (channels_last) as vectors (the constexpr ``VEC``, as in :mod:`.dwconv`).

Why tensor cores and not a direct convolution with Cout in registers -- B0 at 224 x 224,
per image, ``s`` bytes per element:

* bytes: read x ``3 * 224 * 224 * s`` = 150,528 s, write y ``32 * 112 * 112 * s`` =
  401,408 s (weights 27 * 32 * s and bias from L2): 1.10 MB in fp16/bf16, 2.21 MB in fp32;
  at an H200's ~4.3 TB/s that is 0.257 us (fp16) / 0.513 us (fp32) per image, 65.7 us /
  131 us at batch 256 (implied by the bytes, not measured);
* FLOPs: ``2 * 27 * 32 * 112 * 112`` = 21.7 MFLOP per image (19.6 FLOP per byte in fp16),
  5.55 GFLOP at batch 256;
* on the CUDA cores (H200 datasheet: ~67 TFLOP/s fp32 FMA) those FLOPs take 83 us at batch
  256 *at peak* -- more than the 66 us the fp16 bytes take, so a direct convolution (864
  FMAs per output pixel, plus its operand loads and address arithmetic) would make the
  16-bit stem compute-bound at well under the bandwidth; on the tensor cores (~990 TFLOP/s
  dense fp16/bf16) they take 5.6 us (6.6 us with K padded 27 -> 32): the stem stays
  memory-bound with a 10x margin. fp16 x fp16 products are exact in float32 and the MMA
  accumulates in float32, so this is still "fp32 accumulation, one rounding".
* float32 inputs: the rule is IEEE fp32 (relative error <= 1e-5, no TF32), so the dot is
  ``input_precision="ieee"``, which Triton lowers to FMAs on the CUDA cores -- 83 us of
  FLOPs under 131 us of fp32 bytes at batch 256: memory-bound at peak, about balanced in
  practice. The same kernel, no second code path.

General shapes (Cin 1..64, k 1/3/5/7, any H, W) run the same kernel with more K chunks
(``Cin * k * k`` up to 3136: a runtime loop); correct, not tuned for.

Operands: weight in x's dtype (cast by the launcher only when it is not), any strides;
bias float32 or x's dtype (or none, ``HAS_BIAS``). In Triton's interpreter the 16-bit
operands are widened to float32 before the dot (``DOT_F32``: its numpy matmul has no
bfloat16), which computes the same exact products. A sample's base address is computed in
64 bits (one scalar product per program), offsets within a sample in 32 bits unless one
sample's may not fit (``INT64``, :func:`._launch.needs_int64` of one sample: a stem input
of ~16k x 16k pixels; then twice the warps per tile, as 64-bit offsets took 172 registers
at 8 warps).

Compiled for sm_90 (``tests/test_triton_conv_compile.py``, every B0-B7 / MobileNetV3 stem,
batch 1 and 256, fp16/bf16/fp32, NCHW and channels_last: 63 variants): 0 spill bytes, 56-128
registers, wgmma (``m64n32k16`` at Cout 32) or mma.sync (1-2 warp tiles) for 16-bit inputs,
FMAs and no MMA instruction for float32, 128-bit stores of y. Not measured on a GPU yet: the
im2col gather shares the store's layout (NCHW: 8 pixels per thread, ~4 cache lines per warp
load; channels_last: 32 pixels per warp load, 3 lines), L1 work a measurement should weigh
against the DRAM time before anything is changed for it.

:data:`KERNEL_ARGS`, :func:`compile_signature`, :func:`compile_constexprs` and
:func:`launch_args` describe a launch's compile signature (types, constexprs, warps) for tests
and the kernel audit; :func:`compulsory_bytes` and :func:`flops` its arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .._launch import as_layout, empty_in_layout, layout_of, needs_int64
from ..ops._checks import ACT_CODES
from . import _tuning
from ._activation import activate
from ._jit import device_guard, device_kernel, interpreted, multiple_of, needs_bf16_rtne, next_pow2, round_bf16_rtne, \
    vector_width

Tensor = torch.Tensor

MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
BLOCK_K = 32  # the stem's K = 27 in one chunk
MAX_BLOCK_N = 64  # B0-B7 stems: Cout 32-64 in one program column

# spatial sizes and padding only bound masks and the pixel decomposition: one compile for all of them
_DO_NOT_SPECIALIZE = ("H", "W", "HO", "WO", "HWO", "TILES", "pad_top", "pad_left")


@device_kernel(do_not_specialize=_DO_NOT_SPECIALIZE)
def _conv_bn_act_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    CIN, COUT, H, W, HO, WO, HWO, TILES,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syw,
    pad_top, pad_left,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
):
    if VEC > 1:  # the launcher guarantees VEC divides these (see out_vector): aligned VEC-element stores
        syn = multiple_of(syn, VEC)
        if CHANNELS_LAST:
            COUT = multiple_of(COUT, VEC)
            syw = multiple_of(syw, VEC)
        else:
            HWO = multiple_of(HWO, VEC)
            syc = multiple_of(syc, VEC)
    pid = tl.program_id(0)
    n = pid // TILES
    # a sample's base in 64 bits (one scalar product); offsets within a sample are 32-bit unless INT64
    x_n = x_ptr + n.to(tl.int64) * sxn
    y_n = y_ptr + n.to(tl.int64) * syn
    p = (pid % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels oh * WO + ow of sample n
    if INT64:  # before any product
        p = p.to(tl.int64)
    p_ok = p < HWO
    oh = p // WO
    ow = p - oh * WO
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_pix = x_n + ih0 * sxh + iw0 * sxw  # [BLOCK_M]: the window's top-left tap (may be padding)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    if INT64:
        co = co.to(tl.int64)
    w_co = w_ptr + co * swo

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    KTOT = CIN * (K * K)
    k0 = 0
    while k0 < KTOT:  # `while`, not range(): see se_gate.py (Triton 3.6's interpreter, numpy >= 2.4)
        kk = k0 + tl.arange(0, BLOCK_K)
        if INT64:
            kk = kk.to(tl.int64)
        k_ok = kk < KTOT
        if CHANNELS_LAST:  # kk = (kh * K + kw) * CIN + ci: neighbouring columns are neighbouring channels
            tap = kk // CIN
            ci = kk - tap * CIN
        else:  # kk = ci * K * K + kh * K + kw: neighbouring columns are neighbouring W
            ci = kk // (K * K)
            tap = kk - ci * (K * K)
        kh = tap // K
        kw = tap - kh * K
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        a_ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_pix[:, None] + (ci * sxc + kh * sxh + kw * sxw)[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_co[None, :] + (ci * swc + kh * swh + kw * sww)[:, None], mask=k_ok[:, None] & co_ok[None, :],
                    other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        k0 += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out = activate(acc, ACT)
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    # y is dense in its layout (the launcher allocates it): pixel p sits at p * syw (syh == WO * syw)
    tl.store(y_n + co[None, :] * syc + p[:, None] * syw, out.to(y_ptr.dtype.element_ty),
             mask=p_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launch


@dataclass
class ConvLaunch:
    """Everything one ``_conv_bn_act_kernel`` launch needs; ``x`` and ``y`` dense in ``layout``."""

    x: Tensor
    weight: Tensor  # [Cout, Cin, k, k] in x's dtype, any strides
    bias: Optional[Tensor]  # [Cout] float32 or x's dtype, dense
    y: Tensor
    layout: str
    n: int
    cin: int
    cout: int
    h: int
    w: int
    ho: int
    wo: int
    k: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    act: int
    int64: bool  # offsets within one sample may not fit in int32


def prepare_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                 activation: str) -> ConvLaunch:
    """Lay out the inputs and allocate the output of ``conv_bn_act`` (arguments already validated)."""
    layout = layout_of(x)
    xd = as_layout(x, layout)
    n, cin, h, w = xd.shape
    cout, k = weight.shape[0], weight.shape[-1]
    left, right, top, bottom = padding
    ho = (h + top + bottom - k) // stride[0] + 1
    wo = (w + left + right - k) // stride[1] + 1
    y = empty_in_layout((n, cout, ho, wo), layout, xd)
    return ConvLaunch(
        x=xd,
        weight=weight if weight.dtype == x.dtype else weight.to(x.dtype),
        bias=bias.contiguous() if bias is not None else None,  # the kernel reads it at unit stride
        y=y,
        layout=layout,
        n=n, cin=cin, cout=cout, h=h, w=w, ho=ho, wo=wo, k=k,
        stride_h=stride[0], stride_w=stride[1], pad_top=top, pad_left=left,
        act=ACT_CODES[activation],
        int64=needs_int64(xd[:1], y[:1]),  # one sample's offsets (the sample base is always 64-bit)
    )


def out_vector(lp: ConvLaunch) -> int:
    """The kernel's ``VEC``: output elements per aligned (<= 16-byte) vector store along y's contiguous axis.

    channels_last: stores run along Cout, aligned when ``Cout`` (= the pixel stride) is a multiple
    of VEC (Cout = 40, 48, 56 fp16: 16 bytes, which Triton's divisibility-16 hint does not see);
    NCHW: along the pixels of a plane, aligned when ``Ho * Wo`` (= the channel stride) is.
    """
    es = lp.y.element_size()
    return vector_width(es, lp.cout) if lp.layout == "nhwc" else vector_width(es, lp.ho * lp.wo)


# An H200 has 132 SMs; fewer than two programs per SM leave some idle for the whole launch.
SM_COUNT = 132
MIN_PROGRAMS = 2 * SM_COUNT
MIN_BLOCK_M = 32

# Triton's interpreter (CPU tensors): one fixed config, large tiles (every op costs about the same
# whatever its size). Tests shrink it to exercise several pixel tiles and channel blocks.
INTERPRETER_CONFIG = _tuning.Config(block_a=128, block_b=MAX_BLOCK_N, num_warps=8)


def _block_n(lp: ConvLaunch, cap: int = MAX_BLOCK_N) -> int:
    return max(min(next_pow2(lp.cout), cap), MIN_DOT)


def _programs(lp: ConvLaunch, block_m: int, block_n: int) -> int:
    return lp.n * triton.cdiv(lp.ho * lp.wo, block_m) * triton.cdiv(lp.cout, block_n)


def _candidates(lp: ConvLaunch) -> list[_tuning.Config]:
    """GPU configs ``Config(BLOCK_M, BLOCK_N, warps)``; the first is the untuned default.

    BLOCK_N covers Cout (<= 64, >= 16 for tl.dot); a tile runs on :func:`warps_for` warps (one
    per 512 outputs: at BLOCK_N = 32, 16 pixels per warp, whose 16 x 32 im2col gather -- 16
    addresses and masks per thread -- and accumulators are what the registers hold).
    ``128 x 32`` on 4 warps took 168-177 registers for sm_90 (8 warps per SM), on 8 warps 97-116
    (16 warps per SM); ``64 x 64`` on 4 warps 168. BLOCK_M 128 is the default, 64 and 256 the
    alternatives; each is clamped to the sample's pixels and halved (not below 32) until the
    grid has two programs per SM (batch 1 at 224: 98 tiles of 128 -> 392 of 32).
    """
    bn = _block_n(lp)
    pmax = max(next_pow2(lp.ho * lp.wo), MIN_DOT)
    out = []
    for bm in (128, 64, 256):
        bm = min(bm, pmax)
        while bm > MIN_BLOCK_M and _programs(lp, bm, bn) < MIN_PROGRAMS:
            bm //= 2
        cfg = _tuning.Config(bm, bn, min(warps_for(bm, bn) * (2 if lp.int64 else 1), 16))
        if cfg not in out:
            out.append(cfg)
    return out


def warps_for(block_m: int, block_n: int = 32) -> int:
    """Warps of a ``block_m x block_n`` tile, 1 to 16: at most 16 gathered im2col elements (``block_m x 32``)
    and 16 accumulators per thread (a 32 x 16 tile on one warp, 32 gathered elements per thread, took 135
    registers)."""
    return min(max(block_m // 16, block_m * block_n // 512, 1), 16)


# Shape classes with fewer output elements than this are not timed (a launch-latency-bound call).
TUNE_MIN_ELEMENTS = 1 << 20


def _space(lp: ConvLaunch) -> tuple[list[_tuning.Config], _tuning.Config]:
    candidates = _candidates(lp)
    if interpreted(lp.x):
        bn = min(INTERPRETER_CONFIG.block_b, _block_n(lp))
        bm = min(INTERPRETER_CONFIG.block_a, max(next_pow2(lp.ho * lp.wo), MIN_DOT))
        return candidates, _tuning.Config(bm, bn, warps_for(bm, bn))
    if next_pow2(lp.n) * next_pow2(lp.cout) * next_pow2(lp.ho) * next_pow2(lp.wo) < TUNE_MIN_ELEMENTS:
        return candidates[:1], candidates[0]
    return candidates, candidates[0]


def _tune_key(lp: ConvLaunch) -> tuple:
    return ("conv_bn_act", lp.x.device.index, lp.layout, lp.x.dtype, lp.cin, lp.k, lp.stride_h, lp.stride_w, lp.act,
            lp.bias is not None, next_pow2(lp.cout), next_pow2(lp.ho), next_pow2(lp.wo), next_pow2(lp.n), lp.int64)


def launch_args(lp: ConvLaunch, cfg: _tuning.Config) -> tuple[tuple, tuple, dict]:
    """``(grid, positional args, constexprs + num_warps)`` of the launch of ``lp`` with ``cfg``."""
    bm, bn = cfg.block_a, cfg.block_b
    hwo = lp.ho * lp.wo
    tiles = triton.cdiv(hwo, bm)
    syn, syc, syh, syw = lp.y.stride()
    assert syh == lp.wo * syw or lp.ho == 1, "y must be dense in its layout"
    grid = (lp.n * tiles, triton.cdiv(lp.cout, bn))
    args = (lp.x, lp.weight, lp.bias if lp.bias is not None else lp.y, lp.y,
            lp.cin, lp.cout, lp.h, lp.w, lp.ho, lp.wo, hwo, tiles,
            *lp.x.stride(), *lp.weight.stride(), syn, syc, syw,
            lp.pad_top, lp.pad_left)
    consts = dict(K=lp.k, SH=lp.stride_h, SW=lp.stride_w, ACT=lp.act, HAS_BIAS=lp.bias is not None,
                  CHANNELS_LAST=lp.layout == "nhwc", INT64=lp.int64, BF16_RTNE=needs_bf16_rtne(lp.y),
                  DOT_F32=lp.x.dtype == torch.float32 or interpreted(lp.x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K,
                  VEC=out_vector(lp), num_warps=cfg.num_warps)
    return grid, args, consts


def _launch(lp: ConvLaunch, cfg: _tuning.Config) -> None:
    grid, args, consts = launch_args(lp, cfg)
    _conv_bn_act_kernel.on(lp.x)[grid](*args, **consts)


#: The kernel's runtime arguments and their compile types (``compile_signature``), in order.
KERNEL_ARGS = ("x_ptr w_ptr b_ptr y_ptr CIN COUT H W HO WO HWO TILES sxn sxc sxh sxw swo swc swh sww syn syc syw "
               "pad_top pad_left").split()


def compile_signature(dtype: str, bias_dtype: Optional[str] = "fp32") -> dict[str, str]:
    """Triton types of :data:`KERNEL_ARGS` for x in ``dtype`` (``"fp16"``, ``"bf16"``, ``"fp32"``): pointers
    typed, every integer i32 (no INT64). ``bias_dtype=None``: no bias (``b_ptr`` is y's pointer)."""
    types = {name: "i32" for name in KERNEL_ARGS}
    types.update(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{bias_dtype or dtype}", y_ptr=f"*{dtype}")
    return types


def compile_constexprs(k: int = 3, stride: int = 2, activation: str = "silu", channels_last: bool = True,
                       dtype: str = "fp16", cout: int = 32, block_m: int = 128, has_bias: bool = True,
                       int64: bool = False) -> dict:
    """The constexprs of a GPU launch (the stem by default: k3 s2 SiLU, Cout 32, 128-pixel tiles)."""
    es = 4 if dtype == "fp32" else 2
    return dict(K=k, SH=stride, SW=stride, ACT=ACT_CODES[activation], HAS_BIAS=has_bias, CHANNELS_LAST=channels_last,
                INT64=int64, BF16_RTNE=False, DOT_F32=dtype == "fp32", BLOCK_M=block_m,
                BLOCK_N=max(min(next_pow2(cout), MAX_BLOCK_N), MIN_DOT), BLOCK_K=BLOCK_K,
                VEC=vector_width(es, cout) if channels_last else 16 // es)


def compulsory_bytes(n: int, cin: int, h: int, w: int, cout: int, ho: int, wo: int, k: int, element_size: int,
                     bias_bytes: int = 4) -> int:
    """Bytes one launch must move through HBM: x once, y once, the weight (in x's dtype) and the bias once
    (``bias_bytes`` per element, 0 without bias). B0's stem at 224, fp16: 1,105,728 B per image."""
    return element_size * (n * cin * h * w + n * cout * ho * wo + cout * cin * k * k) + bias_bytes * cout


def flops(n: int, cin: int, cout: int, ho: int, wo: int, k: int) -> int:
    """Multiply-adds x 2 of the convolution (the epilogue not counted): 21.7 M per image for B0's stem."""
    return 2 * n * cout * ho * wo * cin * k * k


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                activation: str) -> Tensor:
    """Triton implementation of ``effnet::conv_bn_act`` (signature of the reference).

    Args:
        x: ``[N, Cin, H, W]`` float32/float16/bfloat16, any strides (NCHW and channels_last used as
            they are, other views made dense in their memory format); CUDA, or CPU under
            ``TRITON_INTERPRET=1``.
        weight: ``[Cout, Cin, k, k]``, k odd, any float dtype (used in x's dtype), any strides.
        bias: ``[Cout]`` float32 or x's dtype, or None.
        stride: ``(sh, sw)`` of 1s and 2s; padding: ``(left, right, top, bottom)``.
        activation: a name of ``ops._checks.ACTIVATIONS``.

    Returns:
        ``[N, Cout, Ho, Wo]`` in x's dtype and memory format.
    """
    lp = prepare_conv(x, weight, bias, stride, padding, activation)
    if lp.y.numel() == 0:
        return lp.y
    with device_guard(lp.x):
        cfg = _tuning.choose(_tune_key(lp), lp.x, lambda: _space(lp), lambda c: _launch(lp, c))
        _launch(lp, cfg)
    return lp.y
