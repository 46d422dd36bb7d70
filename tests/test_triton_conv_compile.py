"""The Triton ``conv_bn_act`` kernel (the stem) compiles for sm_90 without a GPU: no spills, bounded registers.

Launches are made by the real launcher on CPU tensors and recorded with Triton's own binder
(``tests/test_triton_compile.py``'s :class:`LaunchRecorder`: the specialisation, constexprs
and options of a GPU launch), then compiled to a cubin for sm_90 and read back: ptxas
registers and spill bytes, the MMA instructions (wgmma for fp16/bf16; none, and no TF32,
for fp32: IEEE FMAs), the store widths. ``pytest -s`` prints the register table.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from effnet_kernels import models  # noqa: E402
from effnet_kernels.ops._checks import ACT_CODES  # noqa: E402
from effnet_kernels.triton import conv  # noqa: E402

from .test_triton_compile import (  # noqa: E402,F401  (recorded_launches is a fixture)
    ALIGNED, H100_MAX_SHARED, MAX_REGISTERS, compile_sm90, cpu_input, ptxas_usage, recorded_launches)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TF_SAME = (0, 1, 0, 1)

#: (model, Cout, resolution) of the EfficientNet B0-B7 stems (3 -> Cout, 3 x 3, stride 2) and MobileNetV3's
STEMS = [(m, models.round_filters(models.STEM_CHANNELS, models.PARAMS[m][0]), models.native_resolution(m))
         for m in models.MODEL_NAMES] + [("mobilenet_v3", 16, 224)]


def test_stem_table():
    assert [c for _, c, _ in STEMS] == [32, 32, 32, 40, 48, 48, 56, 64, 16]


@pytest.fixture
def launches(recorded_launches, monkeypatch):
    """The recorder, with the conv launcher acting as on a GPU (compiled kernels, untuned default configs)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(conv, "interpreted", lambda t: False)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    return recorded_launches


def run_conv(n, cin, cout, h, w, k, stride, dtype, channels_last, padding=None, activation="silu", bias=True,
             force_int64=False):
    """The real Triton launcher on uninitialised CPU tensors (its launch is recorded, not run)."""
    x = cpu_input((n, cin, h, w), dtype, channels_last)
    padding = padding if padding is not None else (k // 2,) * 4
    real = conv.needs_int64
    if force_int64:
        conv.needs_int64 = lambda *tensors: True
    try:
        conv.conv_bn_act(x, torch.empty(cout, cin, k, k), torch.empty(cout) if bias else None, (stride, stride),
                         padding, activation)
    finally:
        conv.needs_int64 = real


def usage_table(rec) -> list[tuple[str, int, int, int, str]]:
    """(variant, registers, spill bytes, shared bytes, MMA form) of every distinct recorded launch."""
    rows = []
    for what, compiled in rec.compile_all():
        ptx = compiled.asm["ptx"]
        regs, spills = ptxas_usage(ptx)
        mma = sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma)\.[\w.]+", ptx)))
        rows.append((what, regs, spills, int(compiled.metadata.shared), ",".join(mma) or "fma"))
    return rows


def short(what: str) -> str:
    consts = re.search(r"\} (\{.*\}) num_warps", what)
    keep = ("CHANNELS_LAST", "BLOCK_M", "BLOCK_N", "VEC", "INT64", "HAS_BIAS", "ACT")
    shown = " ".join(f"{k}={v}" for k, v in re.findall(r"'(\w+)': (\w+)", consts.group(0) if consts else "")
                     if k in keep)
    dtype = re.search(r"'x_ptr': '\*(\w+)'", what)
    warps = re.search(r"num_warps=(\d+)", what)
    return f"{dtype.group(1) if dtype else '?'} {shown} warps={warps.group(1) if warps else '?'}"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_stems_compile_without_spills(launches, dtype):
    """B0's and MobileNetV3's stems (Cout 32 and 16), TF "same" padding, batch 1 and 256, NCHW and
    channels_last, compiled here: each distinct variant has 0 spill bytes and <= MAX_REGISTERS registers
    (16 warps per SM); fp16/bf16 run on wgmma, fp32 on FMAs (no MMA instruction at all: no TF32). Every B0-B7
    stem is in the committed kernel audit (tests/test_kernel_audit_conv.py checks the same rules on its rows)."""
    for channels_last in (False, True):
        for name, cout, res in STEMS:
            if name not in ("b0", "mobilenet_v3"):
                continue
            for n in (1, 256):
                run_conv(n, 3, cout, res, res, 3, 2, DTYPES[dtype], channels_last, padding=TF_SAME)
    rows = usage_table(launches)
    print(f"\nconv_bn_act {dtype}: {len(rows)} variants")
    for what, regs, spills, shared, mma in rows:
        print(f"  {regs:4d} regs {spills} B spilled {shared:6d} B smem  {mma:45s} {short(what)}")
    for what, regs, spills, shared, mma in rows:
        assert spills == 0 and regs <= MAX_REGISTERS, f"{what}: {regs} registers, {spills} B spilled"
        assert shared <= H100_MAX_SHARED, what
        if dtype == "fp32":
            assert mma == "fma", f"{what}: {mma}"
        else:
            ptx_type = {"fp16": "f16", "bf16": "bf16"}[dtype]
            assert f".f32.{ptx_type}.{ptx_type}" in mma, f"{what}: {mma}"  # wgmma; mma.sync on 1-2 warp tiles


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_stem_stores_are_128_bit(launches, dtype, channels_last):
    """B0's stem at batch 256: every global store of y is a 16-byte vector (along W for NCHW, along Cout for
    channels_last); B3's Cout = 40 channels_last too (80-byte fp16 pixels, which the divisibility-16 hint misses)."""
    run_conv(256, 3, 32, 224, 224, 3, 2, DTYPES[dtype], channels_last, padding=TF_SAME)
    if channels_last:
        run_conv(256, 3, 40, 300, 300, 3, 2, DTYPES[dtype], channels_last, padding=TF_SAME)
    for what, compiled in launches.compile_all():
        stores = re.findall(r"\bst\.global[\w.:]*", compiled.asm["ptx"])
        assert stores and all(".v4." in s for s in stores), f"{short(what)}: {sorted(set(stores))}"


@pytest.mark.parametrize("activation", list(ACT_CODES))
def test_activation_variants_compile(activation):
    """Each activation's constexpr variant (only SiLU / sigmoid keep an exp), no bias and with it."""
    from effnet_kernels.triton._jit import next_pow2  # noqa: F401

    consts = conv.compile_constexprs(activation=activation, has_bias=activation != "identity")
    unit = {"sxc": 1, "syc": 1, "sww": 1}
    compiled = compile_sm90(conv._conv_bn_act_kernel, conv.compile_signature("fp16"), {**consts, **unit},
                            num_warps=conv.warps_for(consts["BLOCK_M"], consts["BLOCK_N"]))
    ptx = compiled.asm["ptx"]
    assert ("ex2.approx" in ptx) == (activation in ("silu", "sigmoid")), activation


def test_general_shapes_and_int64_compile(launches):
    """Not the stem: Cin 1 / 5 / 64, k 1 / 5 / 7 (runtime K loops), stride 1, Cout 7 / 33 / 96 / 256 (several
    channel blocks), tiny outputs, and the 64-bit-offset variant: all compile, no spills."""
    for dtype, cl in ((torch.float16, True), (torch.float32, False), (torch.bfloat16, False)):
        run_conv(2, 1, 7, 1, 1, 3, 1, dtype, cl)
        run_conv(2, 5, 33, 17, 19, 5, 2, dtype, cl, padding=(1, 2, 2, 1), activation="relu6", bias=False)
        run_conv(4, 64, 96, 56, 56, 7, 1, dtype, cl)
        run_conv(8, 32, 256, 28, 28, 1, 1, dtype, cl, padding=(0, 0, 0, 0), activation="hardswish")
        run_conv(64, 3, 32, 224, 224, 3, 2, dtype, cl, padding=TF_SAME, force_int64=True)
    for what, regs, spills, shared, mma in usage_table(launches):
        assert spills == 0 and regs <= MAX_REGISTERS, f"{short(what)}: {regs} registers, {spills} B spilled"


def test_compile_signature_matches_the_launch(launches):
    """compile_signature / compile_constexprs (for the kernel audit) describe what the launcher really launches."""
    run_conv(256, 3, 32, 224, 224, 3, 2, torch.float16, True, padding=TF_SAME)
    ((_, (jf, signature, constexprs, attrs, options)),) = launches.launches.items()
    consts = {jf.arg_names[path[0]]: v for path, v in constexprs.items()}
    want = conv.compile_constexprs(dtype="fp16", channels_last=True, cout=32, block_m=128)
    assert {k: consts[k] for k in want} == want
    assert options.num_warps == conv.warps_for(128, 32) == 8
    types = conv.compile_signature("fp16")
    runtime = {k: v for k, v in signature.items() if v != "constexpr"}
    assert all(types[k] == v for k, v in runtime.items()), runtime
    assert set(runtime) <= set(conv.KERNEL_ARGS) and {"x_ptr", "w_ptr", "b_ptr", "y_ptr"} <= set(runtime)
    assert {"x_ptr", "w_ptr", "y_ptr"} <= ALIGNED  # the hand-compiled tests mark these as a launch does
