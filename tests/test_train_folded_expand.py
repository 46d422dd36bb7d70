"""The expand step of a training block as one folded GEMM (issue #11): statistics from the input's moments.

In half precision (x's dtype or autocast's) the recomputing block computes the expand conv's batch
statistics from x's mean and covariance (``_train_block.conv1x1_moments``) and runs conv + BatchNorm
+ activation as one ``pointwise_conv`` with the batch statistics folded in, in the forward and in the
backward's recompute. Checked here:

* the moments against the statistics of the conv output computed in float64, both layouts, a mean
  of ~50 standard deviations, and against eager's own error in the same dtype;
* converted blocks (every block shape with an expand conv, BatchNorm settings, channels_last, fp16
  parameters) by the training parity rule under fp16 autocast, the folded path seen to run;
* the Triton backend (interpreter) serving the folded GEMM in a training block;
* the counted training step: the folded block dispatches fewer bytes than the unfolded one, its expand
  BatchNorm + SiLU backward one ``bn_act_train_backward``;
* negative controls: a variance 3% high, the conv output's mean shifted by a tenth of its standard
  deviation, x's mean (the fold's shift) by 0.05 of x's, and the activation dropped from the folded
  GEMM each fail the training check.
"""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effnet_kernels as ek
from effnet_kernels import _train_block, ops, testing
from effnet_kernels.blocks import MBConvBlock
from tests.environments import count_backend_calls, triton_interpreted
from tests.model_checks import assert_train_parity, folded_expand_calls
from tests.test_train_fused import BLOCKS, BN_SETTINGS, _pair, set_batchnorm

CL = torch.channels_last


def _fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


def _half_parity(eager: nn.Module, fused: nn.Module, x: torch.Tensor, *, dtype=torch.float16, context=None, steps=2):
    """Two SGD steps by the rule, the tensors of a kind judged together (``per_tensor=False``): per tensor,
    fp16 autocast's error on these small blocks has a tail (the SE reduce bias, two values, breaks the
    rule at some seeds whichever way the expand step runs, folded or native_batch_norm)."""
    return assert_train_parity(eager, fused, x, steps=steps, dtype=dtype, per_tensor=False,
                               context=context or _fp16_autocast)


# ---------------------------------------------------------------- the moments
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "mean_50_std"])
def test_moments_are_the_conv_outputs_statistics(dtype, fmt, offset):
    torch.manual_seed(1)
    c, e = 12, 40
    x64 = (torch.randn(3, c, 7, 9, dtype=torch.float64) + offset * torch.rand(c, dtype=torch.float64)[:, None, None])
    w = torch.randn(e, c, 1, 1) / math.sqrt(c)
    x = x64.to(dtype).contiguous(memory_format=fmt)
    mean, var, mu = _train_block.conv1x1_moments(x, w)
    assert mean.dtype == var.dtype == mu.dtype == torch.float32 and mean.shape == var.shape == (e,)
    torch.testing.assert_close(mu.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    # the statistics of h = conv1x1(x, w) in float64 (x as given, w exact)
    h64 = F.conv2d(x.to(torch.float64), w.to(torch.float64))
    var64, mean64 = torch.var_mean(h64, dim=(0, 2, 3), correction=0)
    # eager's own statistics in this dtype: those of its conv (w rounded to the dtype) output, rounded
    h = F.conv2d(x.float(), w.to(dtype).float()).to(dtype).float()
    var_e, mean_e = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    scale = var64.sqrt()  # errors in units of the channel's standard deviation
    err = ((mean.double() - mean64) / scale).abs().max(), ((var.double() - var64) / var64).abs().max()
    eager = ((mean_e.double() - mean64) / scale).abs().max(), ((var_e.double() - var64) / var64).abs().max()
    floor = 1e-6 if offset == 0 else 1e-4  # float32 rounding of |mean| ~ 50 std
    assert err[0] <= max(2 * eager[0], floor), (err, eager)
    assert err[1] <= max(2 * eager[1], floor), (err, eager)


def test_moments_are_exact_in_float64():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64) * 3 + 7
    w = torch.randn(9, 5, 1, 1, dtype=torch.float64)
    mean, var, _ = _train_block.conv1x1_moments(x, w)
    var_ref, mean_ref = torch.var_mean(F.conv2d(x, w), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, var_ref, rtol=1e-10, atol=1e-12)


def test_moments_ignore_autocast():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float16)
    w = torch.randn(6, 4, 1, 1)
    want = _train_block.conv1x1_moments(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _train_block.conv1x1_moments(x, w)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- which blocks fold
def test_only_half_precision_batches_of_this_process_fold():
    _, fused, x = _pair(BLOCKS["k5_s2_se"])
    with folded_expand_calls() as calls:
        fused(x).sum().backward()  # float32: the native_batch_norm path
    assert len(calls) == 0
    with folded_expand_calls() as calls, _fp16_autocast():
        fused(x).float().sum().backward()
    assert len(calls) == 1
    _, fused, x = _pair(BLOCKS["no_expand_se"])
    with folded_expand_calls() as calls, _fp16_autocast():
        fused(x).float().sum().backward()
    assert len(calls) == 0, "a block without an expand conv has nothing to fold"


# ---------------------------------------------------------------- blocks by the rule
EXPANDING = [name for name, cfg in BLOCKS.items() if cfg.get("expand_ratio", 6) != 1]


@pytest.mark.parametrize("name", EXPANDING)
def test_block_trains_folded_by_the_rule_under_fp16_autocast(name):
    eager, fused, x = _pair(BLOCKS[name], size=16)
    with folded_expand_calls() as calls:
        _half_parity(eager, fused, x)
    assert len(calls) >= 2


def test_block_trains_folded_channels_last_under_bf16_autocast():
    eager, fused, x = _pair(BLOCKS["k5_s2_se"], size=16, fmt=CL)
    with folded_expand_calls() as calls:
        _half_parity(eager, fused, x, dtype=torch.bfloat16, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(calls) >= 2


@pytest.mark.parametrize("setting", BN_SETTINGS)
def test_batchnorm_settings_under_fp16_autocast(setting):
    eager, fused, x = _pair(BLOCKS["expand_se_residual_drop"], size=16)
    for model in (eager, fused):
        set_batchnorm(model.get_submodule("expand_bn"), setting)
    with folded_expand_calls() as calls:
        _half_parity(eager, fused, x)
    assert len(calls) >= 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_are_batchnorms(momentum):
    """After two steps the expand BatchNorm's running mean and unbiased variance are those float64 computes
    from the fp16 conv's exact output (momentum, or the cumulative average, and the M / (M - 1)
    correction as nn.BatchNorm2d applies them) within twice eager fp16's own error; num_batches_tracked equal."""
    eager, fused, x = _pair(BLOCKS["k5_s2_se"], size=16)
    xs = [x.half(), torch.randn_like(x).half()]
    models = [eager.half(), fused.half()]
    for m in models:
        m.get_submodule("expand_bn").momentum = momentum
    bn0 = copy.deepcopy(eager.get_submodule("expand_bn")).double()
    before = int(bn0.num_batches_tracked)
    w = eager.get_submodule("expand_conv").weight.detach().double()
    with torch.no_grad():  # the float64 twin of the expand BatchNorm, fed the exact conv outputs
        for t in xs:
            bn0(F.conv2d(t.double(), w))
    with folded_expand_calls() as calls:
        for t in xs:
            for m in models:
                m(t.clone().requires_grad_()).float().sum().backward()
    assert len(calls) == 2
    e, f = (m.get_submodule("expand_bn") for m in models)
    assert int(f.num_batches_tracked) == int(e.num_batches_tracked) == int(bn0.num_batches_tracked)
    assert int(f.num_batches_tracked) == before + 2
    for name in ("running_mean", "running_var"):
        ref = getattr(bn0, name)
        err_f = (getattr(f, name).double() - ref).abs().max()
        err_e = (getattr(e, name).double() - ref).abs().max()
        assert err_f <= 2 * err_e + 1e-6 * ref.abs().max(), (name, err_f, err_e)


def test_fp16_parameters_train_folded():
    eager, fused, x = _pair(BLOCKS["expand_se_residual_drop"], size=16)
    with folded_expand_calls() as calls:
        assert_train_parity(eager.half(), fused.half(), x.half(), steps=2, dtype=torch.float16, per_tensor=False)
    assert len(calls) >= 2


# ---------------------------------------------------------------- the Triton backend
def test_triton_serves_the_folded_gemm_in_training(monkeypatch):
    pytest.importorskip("triton")
    with triton_interpreted():
        calls = count_backend_calls(monkeypatch, "triton", ["pointwise_conv"])
        torch.manual_seed(0)
        block = MBConvBlock(in_channels=8, out_channels=8, kernel_size=3, stride=1, expand_ratio=6,
                            drop_path_rate=0.0)
        x = torch.randn(2, 8, 8, 8).contiguous(memory_format=CL)
        testing.calibrate_batchnorm(block.eval(), x)
        fused = ek.convert(copy.deepcopy(block), backend="triton").train()
        _half_parity(block.train(), fused, x, steps=1)
        # forward a and the projection; recompute both (the fp64 and eager twins are unconverted)
        assert calls["pointwise_conv"] >= 3, calls


# ---------------------------------------------------------------- fewer bytes
def test_the_folded_step_moves_fewer_bytes():
    from benchmarks.traffic import count_train_step

    torch.manual_seed(0)
    block = MBConvBlock(in_channels=16, out_channels=16, kernel_size=3, stride=1, expand_ratio=6,
                        drop_path_rate=0.0).to(torch.float16)
    fused = ek.convert(block.eval(), backend="torch").train()
    x = torch.randn(8, 16, 32, 32, dtype=torch.float16).contiguous(memory_format=CL)
    folded = count_train_step(copy.deepcopy(fused), x)
    with mock.patch.object(_train_block, "folds_expand", lambda *a: False):
        unfolded = count_train_step(copy.deepcopy(fused), x)
    expanded = 8 * 96 * 32 * 32 * 2  # one fp16 tensor of the expanded width
    # in tensors of the expanded width read or written: forward 5 -> 1 (conv, BatchNorm, activation -> one GEMM),
    # recompute 5 -> 1 (the GEMM), backward 7 -> 1 (the activation's, BatchNorm's and the conv's backward -> one op
    # reading grad_a, counted once); the moments cost about 1.3 (reads of x, a float32 copy and its Gram GEMM, at
    # 1/6 of the width)
    assert unfolded.activation_bytes - folded.activation_bytes >= 11 * expanded, (folded, unfolded)
    ops_of = {name: t.kernels for name, t in folded.by_op.items()}
    assert ops_of.get("effnet::expand_bn_act_train_backward") == 1 and "effnet::bn_act_train_backward" not in ops_of
    assert "aten::silu" not in ops_of and "aten::silu_backward" not in ops_of, ops_of
    assert ops_of.get("aten::native_batch_norm") == 1  # the projection's, in the forward
    assert unfolded.by_op["aten::silu_backward"].kernels == 1 and "effnet::bn_act_train_backward" not in unfolded.by_op


# ---------------------------------------------------------------- negative controls
def _skewed_moments(mean_shift: float = 0.0, var_factor: float = 1.0, input_shift: float = 0.0):
    """The moments with the conv output's mean shifted by ``mean_shift`` of its std, its variance scaled
    by ``var_factor``, and x's mean (the fold's shift) shifted by ``input_shift`` (x: unit variance)."""
    real = _train_block.conv1x1_moments

    def skewed(x, w):
        mean, var, mu = real(x, w)
        return _train_block.Conv1x1Moments(mean + mean_shift * var.sqrt(), var * var_factor, mu + input_shift)

    return mock.patch.object(_train_block, "conv1x1_moments", skewed)


def _no_activation():
    real = ops.pointwise_conv

    def skipped(x, weight, bias=None, *, activation="identity", **kwargs):
        return real(x, weight, bias, **kwargs)

    return mock.patch.object(_train_block.ops, "pointwise_conv", skipped)


@pytest.mark.parametrize("defect", ["variance_3pct_high", "mean_shift_tenth_std", "input_mean_shift",
                                    "skip_activation"])
def test_negative_controls(defect):
    eager, fused, x = _pair(BLOCKS["expand_se_residual_drop"], size=16)
    plant = {"variance_3pct_high": lambda: _skewed_moments(var_factor=1.03),
             "mean_shift_tenth_std": lambda: _skewed_moments(mean_shift=0.1),
             "input_mean_shift": lambda: _skewed_moments(input_shift=0.05),
             "skip_activation": _no_activation}[defect]
    with plant(), pytest.raises(AssertionError, match="break the rule"):
        _half_parity(eager, fused, x)
