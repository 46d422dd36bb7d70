"""The Triton ``pointwise_conv`` kernel compiles for an H100 / H200 (sm_90) without a GPU.

The real launcher runs on uninitialised CPU tensors while every launch is bound by Triton's
own binder and recorded (``test_triton_compile.recorded_launches``), then compiled down to a
cubin: every dtype x layout x gate / residual / pool variant at B0's expand (24 -> 144, 56 x 56),
project (1152 -> 320, 7 x 7, gated) and head (320 -> 1280, 7 x 7, pooled) shapes, the whole
tuning space, and the 64-bit offset variant. Checked: no spills, registers that leave at least
:data:`MIN_WARPS_PER_SM` warps resident, shared memory within the sm_90 limit, the dot on the
tensor cores (``wgmma`` / ``mma``) for 16-bit inputs and IEEE FMA (no TF32) for float32, and
128-bit A / weight loads (``cp.async`` 16-byte copies or ``ld.global.v4``) and output stores on
channels_last when K and Cout are multiples of 16.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from .test_triton_compile import H100_MAX_SHARED, ptxas_usage, recorded_launches  # noqa: E402,F401

from effnet_kernels.triton import pointwise  # noqa: E402

# A GEMM hides its load latency with the cp.async pipeline (num_stages deep), not with warps as the
# bandwidth kernels do (their 16): two 4-warp CTAs per SM, i.e. <= 255 registers at 128 threads
# (65536 / (2 x 128) = 256), or one 8-warp CTA at <= 255 (ptxas's own ceiling).
MIN_WARPS_PER_SM = 8
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def resident_warps(regs: int, num_warps: int, shared: int) -> int:
    """Warps one SM keeps resident (registers allocated per warp in 256-register units, 228 KB shared)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = H100_MAX_SHARED // shared if shared else 32
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps) * num_warps


def run_pointwise(shape, cout, dtype, channels_last, gate=False, bias=True, residual=False, pool=False,
                  activation="silu", force_int64=False):
    """The real launcher on uninitialised CPU tensors (the launch is recorded, not run)."""
    from effnet_kernels import _launch

    n, k, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    res = torch.empty(n, cout, h, w, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    real = _launch.needs_int64
    if force_int64:
        _launch.needs_int64 = lambda *tensors: True
    try:
        pointwise.pointwise_conv(x, torch.empty(cout, k), torch.empty(cout) if bias else None,
                                 torch.empty(n, k) if gate else None, res, activation, pool)
    finally:
        _launch.needs_int64 = real


@pytest.fixture
def launches(recorded_launches, monkeypatch):  # noqa: F811
    """recorded_launches, with the pointwise launcher also told it runs on a GPU (untuned unless a test tunes)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(pointwise, "interpreted", lambda t: False)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    return recorded_launches


def constexprs_of(what: str) -> dict:
    """``{name: value}`` of the constexprs in a LaunchRecorder description."""
    return dict(re.findall(r"'(\w+)': (True|False|\d+)", what.split("} {", 1)[1]))


def check_compiled(rec, capsys=None) -> list[tuple[str, dict]]:
    """Compile every recorded launch; assert the resource invariants; return (config line, facts) per launch."""
    out = []
    for what, compiled in rec.compile_all():
        ptx = compiled.asm["ptx"]
        regs, spills = ptxas_usage(ptx)
        c = constexprs_of(what)
        warps = compiled.metadata.num_warps
        shared = compiled.metadata.shared
        resident = resident_warps(regs, warps, shared)
        dtype = re.search(r"'x_ptr': '\*(\w+)'", what).group(1)
        line = (f"{'nhwc' if c['CHANNELS_LAST'] == 'True' else 'nchw'} {dtype} "
                f"gate={c['HAS_GATE']} res={c['HAS_RES']} pool={c['POOL']} BLOCK_M={c['BLOCK_M']} "
                f"BLOCK_N={c['BLOCK_N']} BLOCK_K={c['BLOCK_K']} warps={warps}: {regs} regs, {spills} B spilled, "
                f"{shared} B shared, {resident} warps/SM")
        assert spills == 0, line
        assert shared <= H100_MAX_SHARED, line
        assert resident >= MIN_WARPS_PER_SM, line
        out.append((line, {"ptx": ptx, "c": c, "regs": regs}))
    if capsys is not None:
        with capsys.disabled():
            print("\n" + "\n".join(line for line, _ in out))
    return out


def mma_ops(ptx: str) -> set[str]:
    return set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx))


def vector_copies(ptx: str) -> tuple[set[str], set[str]]:
    """(byte sizes of the cp.async global->shared copies, forms of ld.global) in ``ptx``."""
    return (set(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*(?:,[^;]*)?;", ptx)),
            set(re.findall(r"\bld\.global[\w.:]*", ptx)))


B0_SHAPES = {  # (x shape at batch 256, Cout, gate, residual, pool): B0's expand, project and head convs
    "expand": ((256, 24, 56, 56), 144, False, False, False),
    "project": ((256, 1152, 7, 7), 320, True, False, False),
    "project-res": ((256, 672, 14, 14), 112, True, True, False),
    "head": ((256, 320, 7, 7), 1280, False, False, True),
}


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_b0_variants_compile(launches, capsys, dtype, channels_last):
    """Every variant (gate / residual / pool) of B0's expand, project and head convs: no spills, >= 8 warps/SM;
    16-bit dots on the tensor cores, float32 on IEEE FMA (no TF32, no MMA)."""
    for shape, cout, gate, res, pool in B0_SHAPES.values():
        run_pointwise(shape, cout, dtype, channels_last, gate=gate, residual=res, pool=pool)
    compiled = check_compiled(launches, capsys)
    assert len(compiled) == len(B0_SHAPES)
    for line, facts in compiled:
        ops = mma_ops(facts["ptx"])
        if dtype == torch.float32:
            assert not ops and "tf32" not in facts["ptx"], f"{line}: float32 must not use TF32 / MMA ({ops})"
            assert "fma.rn.f32" in facts["ptx"], line
        else:
            assert ops, f"{line}: no wgmma / mma instruction for the 16-bit dot"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last_a_loads_and_stores_are_128_bit(launches, dtype):
    """K and Cout multiples of 16, channels_last: A and weight tiles move in 16-byte copies (cp.async 0x10, or
    ld.global.v4 where the gate's multiply makes the load a register load), no 16-bit loads; outputs st.global.v4."""
    run_pointwise((256, 96, 28, 28), 144, dtype, True, gate=True, residual=True)
    run_pointwise((256, 48, 56, 56), 192, dtype, True)
    for line, facts in check_compiled(launches):
        copies, loads = vector_copies(facts["ptx"])
        assert copies <= {"0x10", "16"} and (copies or any(".v4." in op for op in loads)), f"{line}: {copies} {loads}"
        assert not any(op.endswith((".b16", ".u16")) for op in loads), f"{line}: 16-bit global loads {loads}"
        stores = set(re.findall(r"\bst\.global[\w.:]*", facts["ptx"]))
        assert stores and all(".v4." in op for op in stores), f"{line}: output stores {stores}"


def test_negative_control_unaligned_nchw_is_seen(launches):
    """The vector checks can fail: NCHW at 7 x 7 (49 pixels per plane, planes not 16-byte aligned) stores
    16-bit scalars, and the check above would reject it."""
    run_pointwise((256, 1152, 7, 7), 320, torch.float16, False, gate=True)
    ((line, facts),) = check_compiled(launches)
    stores = set(re.findall(r"\bst\.global[\w.:]*", facts["ptx"]))
    assert not all(".v4." in op for op in stores), f"{line}: {stores}"


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_every_candidate_config_compiles(recorded_launches, monkeypatch, channels_last):  # noqa: F811
    """The whole tuning space of a large expand and a pooled head, as the tuner launches it (each candidate once)."""
    monkeypatch.setattr(pointwise, "interpreted", lambda t: False)
    run_pointwise((256, 24, 56, 56), 144, torch.float16, channels_last)
    run_pointwise((256, 1152, 7, 7), 320, torch.float16, channels_last, gate=True)
    run_pointwise((256, 320, 7, 7), 1280, torch.bfloat16, channels_last, pool=True)
    run_pointwise((256, 192, 14, 14), 1152, torch.float32, channels_last)
    assert len(recorded_launches.launches) >= 10
    check_compiled(recorded_launches)


def test_int64_variants_compile(launches):
    run_pointwise((2, 144, 28, 28), 24, torch.bfloat16, True, gate=True, residual=True, force_int64=True)
    run_pointwise((2, 320, 7, 7), 1280, torch.float16, False, pool=True, force_int64=True)
    assert len(check_compiled(launches)) == 2


def test_awkward_shapes_compile(launches):
    """K = 3, Cout = 17 (masked K and Cout, scalar accesses), H = W = 1, no bias (with and without the pool),
    every activation's specialisation."""
    from effnet_kernels.ops._checks import ACTIVATIONS

    run_pointwise((2, 3, 5, 7), 17, torch.float16, True, gate=True, residual=True)
    run_pointwise((8, 40, 1, 1), 1, torch.bfloat16, False)
    run_pointwise((2, 24, 8, 8), 40, torch.float32, False, bias=False, residual=True)
    run_pointwise((2, 24, 8, 8), 40, torch.bfloat16, True, bias=False, gate=True, pool=True)
    for act in ACTIVATIONS:
        run_pointwise((2, 24, 8, 8), 40, torch.float16, True, activation=act)
    assert len(check_compiled(launches)) == 4 + len(ACTIVATIONS)
