"""The Triton training kernels compile for an H100 (sm_90) without a GPU: no spills, registers reported.

The real launchers (``effnet_kernels.triton.dwconv_train`` / ``dwconv_backward`` / ``se_backward``)
run on uninitialised CPU tensors of every B0 depthwise and SE shape (fp16, channels_last, batch 1
and 256) while every kernel launch is bound by Triton's own binder and recorded instead of run
(``tests/test_triton_compile.py``'s ``LaunchRecorder``: the same specialisation and constexprs as a
GPU launch); each distinct launch is compiled to a cubin and read with ``ptxas -v``. Run without
``TRITON_INTERPRET`` (this module skips when Triton was imported in interpreter mode).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .test_triton_compile import MAX_REGISTERS, cpu_input, ptxas_usage, recorded_launches  # noqa: E402,F401

from effnet_kernels import models  # noqa: E402
from effnet_kernels.triton import dwconv_backward, dwconv_train, se_backward  # noqa: E402

TRAIN_KERNELS = ("_dwconv_stats_kernel", "_combine_moments_kernel", "_grad_u_kernel", "_dwconv_input_grad_kernel",
                 "_sum_tiles_kernel", "_se_excite_backward_kernel", "_rows_times_kernel", "_outer_kernel")


@pytest.fixture
def train_launches(recorded_launches, monkeypatch):
    """The recorder, with the training launchers also taking the GPU path and tuning off (the eval
    kernel the train forward applies with is covered by tests/test_triton_compile.py)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    monkeypatch.setattr(dwconv_train, "interpreted", lambda t: False)
    monkeypatch.setattr(se_backward, "interpreted", lambda t: False)
    return recorded_launches


def _b0_training_step(batches=(1, 256)) -> None:
    """Every training launcher at every B0 depthwise / SE shape class, fp16 channels_last, SiLU / sigmoid."""
    dt = torch.float16
    for c, h, w, k, stride in models.depthwise_shapes(("b0",)):
        pad = (k // 2,) * 4
        for n in batches:
            x = cpu_input((n, c, h, w), dt, True)
            weight, g, b = torch.empty(c, 1, k, k, dtype=dt), torch.ones(c), torch.zeros(c)
            y, _, mean, var = dwconv_train.dwconv_bn_act_train(x, weight, g, b, None, None, 1e-3, (stride,) * 2,
                                                               pad, "silu", True)
            gy = cpu_input(tuple(y.shape), dt, True)
            gp = torch.empty(n, c)
            dwconv_backward.dwconv_bn_act_train_backward(gy, gp, x, weight, g, b, mean, var, 1e-3, (stride,) * 2,
                                                         pad, "silu")
            dwconv_backward.dwconv_bn_act_backward(gy, gp, x, weight, g, b, (stride,) * 2, pad, "silu")
            # the expand BatchNorm + SiLU backward of the tensor the depthwise conv reads (its 1x1 "conv" variant)
            dwconv_backward.bn_act_train_backward(cpu_input(tuple(x.shape), dt, True), x, g, b, mean, var, "silu")
            se_backward.se_excite_backward(gy, y, torch.empty(n, c))
    pairs = sorted({(s.mid_channels, s.se_reduced) for s in models.layer_shapes("b0") if s.se_reduced})
    for n in batches:
        for c, r in pairs:
            se_backward.se_gate_backward(torch.empty(n, c), torch.empty(n, c, dtype=dt), torch.empty(r, c, dtype=dt),
                                         torch.empty(r, dtype=dt), torch.empty(c, r, dtype=dt),
                                         torch.empty(c, dtype=dt), "silu", "sigmoid")


def test_b0_training_kernels_compile_without_spills(train_launches, capsys):
    """Every distinct training-kernel launch of a B0 step (batch 1 and 256): compiles, 0 spill bytes,
    <= MAX_REGISTERS registers; the registers of each are printed (``pytest -s``). (The eval kernel the
    train forward applies with is compiled by tests/test_triton_compile.py and the kernel audit, not here.)"""
    _b0_training_step()
    seen, report = set(), []
    for what, compiled in train_launches.compile_all(only=TRAIN_KERNELS):
        name = what.split()[0]
        seen.add(name)
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        report.append((name, regs, spills, what))
        assert spills == 0, f"{what}: {spills} B spilled ({regs} registers)"
        assert regs <= MAX_REGISTERS, f"{what}: {regs} registers"
    assert seen == set(TRAIN_KERNELS), sorted(set(TRAIN_KERNELS) - seen)
    with capsys.disabled():
        worst = {}
        for name, regs, _, _ in report:
            worst[name] = max(worst.get(name, 0), regs)
        print(f"\n{len(report)} training-kernel variants; max registers per kernel: {worst}")


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_nchw_and_int64_variants_compile_without_spills(train_launches, monkeypatch, int64):
    """NCHW tiles (8 channel planes x 128 pixels), both dtypes of 16 bits and fp32, k 3/5/7, stride 1/2, several
    activations' derivatives: 0 spill bytes, <= MAX_REGISTERS registers; the 64-bit offset specialisation
    (both layouts): 0 spill bytes."""
    if int64:
        monkeypatch.setattr(dwconv_train, "needs_int64", lambda *tensors: True)
        monkeypatch.setattr(se_backward, "needs_int64", lambda *tensors: True)
    cases = [(torch.float16, 3, 1, "relu6"), (torch.bfloat16, 5, 2, "hardswish"), (torch.float32, 7, 1, "silu")]
    for channels_last in (False, True) if int64 else (False,):
        # 64-bit offsets: every case on NCHW, the widest (fp32, k7) on channels_last
        for dt, k, stride, act in cases if not (int64 and channels_last) else cases[2:]:
            x = cpu_input((8, 144, 28, 28), dt, channels_last)
            c, pad = 144, (k // 2, k // 2 + stride - 1, k // 2, k // 2 + stride - 1)
            weight, g, b = torch.empty(c, 1, k, k, dtype=dt), torch.ones(c), torch.zeros(c)
            mean, var = dwconv_train.batch_statistics(dwconv_train.geometry(x, weight, (stride,) * 2, pad), weight)
            ho, wo = (28 + pad[2] + pad[3] - k) // stride + 1, (28 + pad[0] + pad[1] - k) // stride + 1
            gy = cpu_input((8, c, ho, wo), dt, channels_last)
            dwconv_backward.dwconv_bn_act_train_backward(gy, torch.empty(8, c), x, weight, g, b, mean, var, 1e-3,
                                                         (stride,) * 2, pad, act)
            dwconv_backward.dwconv_bn_act_backward(gy, None, x, weight, g, b, (stride,) * 2, pad, act)
            se_backward.se_excite_backward(gy, gy, torch.empty(8, c))
    count = 0
    for what, compiled in train_launches.compile_all(only=TRAIN_KERNELS):
        count += 1
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        # 64-bit offsets (tensors past 2^31 elements, rare) double the address registers: no spills is the bar
        assert spills == 0 and (int64 or regs <= MAX_REGISTERS), f"{what}: {regs} registers, {spills} B spilled"
    assert count >= 10
