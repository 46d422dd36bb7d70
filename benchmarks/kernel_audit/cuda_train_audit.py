"""The CUDA training launches (``csrc/dwconv_train.cu``, ``csrc/se_train.cu``), as :mod:`.cuda_audit` lists the eval ones.

Each function mirrors the C++ that launches the kernels, with the geometry of
:mod:`.cuda_geometry` (whose chunking tests/test_cuda_geometry.py checks against the sources'
``dwconv_train_partials_numel``). The 1x1 convs' training backward (``expand_bn_act_train_backward``,
``pointwise_conv_backward``) has no CUDA C++ kernel: the cuda backend runs cuDNN and aten ops there
(``effnet_kernels/_aten_convs.py``), so those workloads have no CUDA rows.
"""

from __future__ import annotations

from effnet_kernels.ops._checks import ACT_CODES

from . import cuda_geometry as cg
from .cuda_audit import CUDA_TYPES, CudaLaunch, eval_dwconv_launch
from .train_workloads import TRAIN_OPS
from .workloads import Workload

_NS = "effnet::(anonymous namespace)::"


def _tiled(name: str, wl: Workload, what: str, over_input: bool = False) -> CudaLaunch:
    """A per-channel reduction kernel on ``tile_launch``'s grid: channel groups x chunks of the output positions
    (``over_input``: of the input positions)."""
    h, w = (wl.h, wl.w) if over_input else (wl.ho, wl.wo)
    grid, (bx, by), chunk = cg.train_tile_launch(wl.layout == "nhwc", wl.n, wl.c, h, w)
    return CudaLaunch(name, grid, (bx, by, 1), 0, f"block={bx}x{by}: {what}", note=f"chunks of {chunk} positions",
                      channel_slots=grid[0] * bx if wl.layout == "nhwc" else None)


def _flat(name: str, total: int, what: str) -> CudaLaunch:
    """A grid-stride kernel of one thread per item (``grid_1d``)."""
    return CudaLaunch(name, (cg.grid_1d(total), 1, 1), (cg.THREADS, 1, 1), 0, f"grid-stride, thread per {what}",
                      note=f"{total} {what}s")


def launches(wl: Workload) -> list[CudaLaunch]:
    """The CUDA launches a training op makes for ``wl`` (one of :data:`.train_workloads.TRAIN_OPS`)."""
    if wl.op not in TRAIN_OPS:
        raise ValueError(f"unknown training op {wl.op!r}; choose from {', '.join(TRAIN_OPS)}")
    t, k, c = CUDA_TYPES[wl.dtype], wl.k, wl.c
    if wl.op == "dwconv_bn_act_train":  # dwconv_bn_stats, then the eval forward kernel applies the folded BN
        return [_tiled(f"void {_NS}stats_kernel<{t}, {k}>", wl, "Welford partials"),
                _flat(f"{_NS}stats_combine_kernel", c, "channel"),
                eval_dwconv_launch(wl)]
    if wl.op == "dwconv_bn_act_train_backward":  # run_backward(kBoth): launch_grad_sums, launch_input_grads
        sums = _flat(f"{_NS}sum_rows_kernel", c, "channel")
        return [_tiled(f"void {_NS}bwd_reduce_kernel<{t}, {k}>", wl, "sum(g), sum(g xhat) partials"), sums, sums,
                _tiled(f"void {_NS}gz_kernel<{t}, {k}>", wl, "gz"),
                _tiled(f"void {_NS}input_grads_kernel<{t}, {k}>", wl, "grad_x, per-tap partials", over_input=True),
                _flat(f"{_NS}sum_rows_kernel", k * k * c, "weight tap")]
    if wl.op == "se_excite_backward":
        bx, by = cg.channel_tile(wl.layout == "nhwc")
        grid = (cg.ceil_div(c, bx), min(wl.n, cg.GRID_LIMIT), 1)
        return [CudaLaunch(f"void {_NS}se_excite_bwd_kernel<{t}>", grid, (bx, by, 1), 0,
                           f"block={bx}x{by}: (channel group, sample) over H*W",
                           channel_slots=grid[0] * bx if wl.layout == "nhwc" else None)]
    if wl.op == "se_gate_backward":  # fp32 throughout: no dtype in the kernels; SiLU and sigmoid in every B0-B7 SE
        at_b = f"{_NS}at_b_kernel"
        act, gate = ACT_CODES["silu"], ACT_CODES["sigmoid"]
        return [CudaLaunch(f"void {_NS}se_gate_bwd_sample_kernel<{act}, {gate}>",
                           (min(wl.n, cg.GRID_LIMIT), 1, 1), (cg.THREADS, 1, 1), 4 * 3 * wl.r, "block per sample"),
                _flat(at_b, c * wl.r, "grad_w_expand element"), _flat(at_b, c, "grad_b_expand element"),
                _flat(at_b, wl.r * c, "grad_w_reduce element"), _flat(at_b, wl.r, "grad_b_reduce element")]
    return []  # expand_bn_act_train_backward, pointwise_conv_backward: cuDNN + aten
