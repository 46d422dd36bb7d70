"""Triton ``se_excite``: out = y * gate[:, :, None, None], in y's dtype and memory format.

The dense tensor is seen as a matrix of rows x columns with the gate constant along
one axis, so a tile loads its gate values once and broadcasts them:

* channels_last: rows are the N*H*W pixels, columns the C channels (contiguous,
  vectorised; the constexpr ``VEC``, :func:`._jit.vector_width` of C, gives 128-bit
  accesses wherever a row is a multiple of 16 bytes, e.g. C = 24/40/56 in fp16); the gate
  of row ``i``, column ``c`` is ``gate[i // (H*W), c]``;
* NCHW: rows are the N*C planes, columns the H*W pixels; the gate of row ``i`` is
  ``gate.view(-1)[i]``.

* NCHW (``_se_excite_planes_kernel``): the tensor is one flat run of N*C*H*W elements cut
  into ``BLOCK``-element pieces at 16-element boundaries, so every access is a 128-bit
  vector whatever H*W is (7 x 7, 14 x 14: plane starts are not vector-aligned, which a
  row-per-plane tile cannot vectorise). The plane of element ``start + i`` is found with one
  integer division per program and, per element, ``q = floor((rem0 + i + 0.5) / HW)`` in
  float32, exact while ``rem0 + i < 2^22`` (its error is below ``(q + 1) 2^-23 < 0.5 / HW``);
  larger planes take the 2-D kernel.

The product is taken in float32 and rounded once.

Bytes per launch: read y and write out (2 x the element size per element: 4 B in fp16)
plus the gate (4NC, from L1/L2 after the first touch); one multiply per element. A late
B0 layer (N = 256, C = 1152, 7 x 7, fp16): 14.5 M elements, 57.8 MB, which at an H200's
~4.8 TB/s implies ~12 us (implied by the bytes, not measured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import prepare_se_excite
from ._jit import device_guard, device_kernel, multiple_of, needs_bf16_rtne, next_pow2, round_bf16_rtne, vector_width

Tensor = torch.Tensor

_TILE_ELEMENTS = 4096
_MAX_BLOCK_COLS = 256
PLANES_BLOCK = 2048  # elements per program of the flat NCHW kernel (16 per thread at 4 warps)
_FLOAT_DIV_EXACT = 1 << 22  # the float32 plane index is exact below this (see the module docstring)


@device_kernel(do_not_specialize=("HW",))  # TOTAL specialised: its divisibility by 16 lets the masks vectorise
def _se_excite_planes_kernel(
    y_ptr, g_ptr, o_ptr, TOTAL, HW, inv_hw, INT64: tl.constexpr, BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[e] = y[e] * gate.view(-1)[e // HW] over the flat NCHW tensor, BLOCK elements per program."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    start = start * BLOCK
    plane0 = start // HW  # the one integer division of the program
    i = tl.arange(0, BLOCK)
    local = (start - plane0 * HW).to(tl.int32) + i  # < HW + BLOCK < 2^22
    q = ((local.to(tl.float32) + 0.5) * inv_hw).to(tl.int32)
    offs = start + i
    ok = offs < TOTAL
    gate = tl.load(g_ptr + plane0 + q, mask=ok, other=0.0)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0)
    out = y.to(tl.float32) * gate.to(tl.float32)
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=ok)


@device_kernel(do_not_specialize=("ROWS", "HW", "COL_BLOCKS"))  # row-axis ints (COLS stays specialised)
def _se_excite_kernel(
    y_ptr, g_ptr, o_ptr, ROWS, COLS, HW, COL_BLOCKS,
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, VEC: tl.constexpr,
):
    if VEC > 1:  # VEC divides the row length: rows start VEC-aligned (see _jit.vector_width)
        COLS = multiple_of(COLS, VEC)
    pid = tl.program_id(0)
    if INT64:  # before the products: (pid // COL_BLOCKS) * BLOCK_ROWS may pass 2^31 too
        pid = pid.to(tl.int64)
    rows = (pid // COL_BLOCKS) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % COL_BLOCKS) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    if CHANNELS_LAST:
        gate = tl.load(g_ptr + (rows // HW)[:, None] * COLS + cols[None, :], mask=ok, other=0.0)
    else:
        gate = tl.load(g_ptr + rows, mask=rows < ROWS, other=0.0)[:, None]
    offs = rows[:, None] * COLS + cols[None, :]
    y = tl.load(y_ptr + offs, mask=ok, other=0.0)
    out = y.to(tl.float32) * gate.to(tl.float32)
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=ok)


def se_excite(y: Tensor, gate: Tensor) -> Tensor:
    """Triton implementation of ``effnet::se_excite`` (signature of the reference).

    Args:
        y: ``[N, C, H, W]`` float32/float16/bfloat16, any strides (made dense in its
            own memory format).
        gate: ``[N, C]`` any float dtype.

    Returns:
        ``y * gate[:, :, None, None]`` in y's dtype and memory format.
    """
    lp = prepare_se_excite(y, gate)
    if lp.out.numel() == 0:
        return lp.out
    n, c, h, w = lp.y.shape
    hw = h * w
    if lp.layout == "nchw" and hw + PLANES_BLOCK < _FLOAT_DIV_EXACT:
        with device_guard(lp.y):
            _se_excite_planes_kernel.on(lp.y)[(triton.cdiv(lp.y.numel(), PLANES_BLOCK),)](
                lp.y, lp.gate, lp.out, lp.y.numel(), hw, 1.0 / hw,
                INT64=lp.int64, BF16_RTNE=needs_bf16_rtne(lp.out), BLOCK=PLANES_BLOCK, num_warps=4,
            )
        return lp.out
    rows, cols = (n * hw, c) if lp.layout == "nhwc" else (n * c, hw)
    block_cols = min(next_pow2(cols), _MAX_BLOCK_COLS)
    block_rows = max(_TILE_ELEMENTS // block_cols, 1)
    col_blocks = triton.cdiv(cols, block_cols)
    grid = (triton.cdiv(rows, block_rows) * col_blocks,)
    with device_guard(lp.y):
        _se_excite_kernel.on(lp.y)[grid](
            lp.y, lp.gate, lp.out, rows, cols, hw, col_blocks,
            CHANNELS_LAST=lp.layout == "nhwc", INT64=lp.int64, BF16_RTNE=needs_bf16_rtne(lp.out),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, VEC=vector_width(lp.y.element_size(), cols), num_warps=4,
        )
    return lp.out
