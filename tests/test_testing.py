"""effnet_kernels.testing: calibration, sensitivity and the parity rule for models and blocks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import testing


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
    ).eval()


def test_calibration_sets_batch_statistics_and_restores_modes():
    net = small_net()
    net[5].momentum = 0.3
    x = torch.randn(6, 3, 5, 5)
    testing.calibrate_batchnorm(net, x, jitter=0.0)
    assert not any(m.training for m in net.modules())  # eval restored, dropout never ran in train
    assert net[5].momentum == 0.3 and int(net[1].num_batches_tracked) == 1
    with torch.no_grad():
        z = net[0](x)
    torch.testing.assert_close(net[1].running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, z.var((0, 2, 3), unbiased=True))
    with torch.no_grad():  # the calibrated layer normalises its calibration batch
        u = net[1](z)
    torch.testing.assert_close(u.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)


def test_calibration_jitters_affine_first_and_is_seeded():
    a, b = small_net(), small_net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 5, 5)
    testing.calibrate_batchnorm(a, x, jitter=0.1, seed=3)
    testing.calibrate_batchnorm(b, x, jitter=0.1, seed=3)
    assert not torch.equal(a[1].weight, torch.ones(8)) and not torch.equal(a[1].bias, torch.zeros(8))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    with torch.no_grad():  # statistics calibrated after the jitter: the output is still normalised
        u = a[1](a[0](x))
    torch.testing.assert_close(u.mean((0, 2, 3)), a[1].bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(model="net"), "model must be a torch.nn.Module"),
    (dict(x=[1.0]), "x must be a Tensor"),
    (dict(x=torch.randn(1, 3, 4, 4)), "at least 2 samples"),
    (dict(jitter=-0.1), "jitter must be"),
    (dict(jitter=math.nan), "jitter must be"),
])
def test_calibration_rejects_bad_arguments(bad, match):
    args = dict(model=small_net(), x=torch.randn(2, 3, 4, 4), jitter=0.1)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=match):
        testing.calibrate_batchnorm(args["model"], args["x"], jitter=args["jitter"])


def test_sensitivity_and_assert_sensitive():
    net = small_net()
    x = torch.randn(4, 3, 5, 5)
    assert testing.sensitivity(net, x, x) == 0.0
    assert testing.assert_sensitive(testing.calibrate_batchnorm(net, x), x, 1e-5) > 1e-3
    constant = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 25, 3))
    with torch.no_grad():
        constant[2].weight.zero_()
        constant[2].bias.fill_(1.0)
    with pytest.raises(AssertionError, match="not sensitive"):
        testing.assert_sensitive(constant, x, 1e-5)


def test_parity_limit_and_result():
    assert testing.parity_limit(1e-3, 10.0, torch.float16) == pytest.approx(2e-3 + 1e-4 * 10)
    assert testing.parity_limit(1e-3, 10.0, torch.float16, factor=3.0) == pytest.approx(3e-3 + 1e-3)
    ok = testing.ParityResult("y", err=1.0, eager_err=1.0, limit=2.0, ref_scale=10.0)
    bad = testing.ParityResult("y", err=3.0, eager_err=1.0, limit=2.0, ref_scale=10.0)
    assert ok.ok and not bad.ok and bad.rel_err == pytest.approx(0.3)
    assert "FAILED" in str(bad) and "ok" in str(ok)
    assert testing.failures([ok, bad]) == [bad]
    assert testing.max_abs_err(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.float64)) == math.inf
    assert testing.max_abs_err(torch.zeros(3), torch.zeros(2, dtype=torch.float64)) == math.inf


def test_model_parity_passes_a_copy_and_rejects_a_perturbed_model():
    x = torch.randn(4, 3, 6, 6)
    net = testing.calibrate_batchnorm(small_net(), x)
    assert testing.model_parity(net, copy.deepcopy(net), x).ok
    worse = copy.deepcopy(net)
    with torch.no_grad():
        worse[4].weight.mul_(1.001)
    result = testing.model_parity(net, worse, x)
    assert not result.ok and result.err > result.limit


def test_blockwise_parity_feeds_each_block_its_eager_input():
    x = torch.randn(2, 8, 6, 6)
    eager = nn.Sequential(*(ek.MBConv(8, 8, expand_ratio=2, backend="torch") for _ in range(3)))
    testing.calibrate_batchnorm(eager.eval(), x)
    eager = ek.revert(eager)
    model = ek.convert(copy.deepcopy(eager), backend="torch")
    assert testing.fused_block_names(model) == ["0", "1", "2"]
    results = testing.blockwise_parity(eager, model, x)
    assert [r.what for r in results] == ["0", "1", "2"] and all(r.ok for r in results)
    # a defect in block 1 only: block 1 fails, blocks 0 and 2 (given eager inputs) still pass
    with torch.no_grad():
        model[1].plan.original.project_conv.weight.mul_(1.01)
    results = testing.blockwise_parity(eager, model, x)
    assert [r.ok for r in results] == [True, False, True]
    with pytest.raises(ValueError, match="not in both models"):
        testing.blockwise_parity(eager, model, x, names=["7"])


def test_block_inputs_records_each_blocks_first_call_and_removes_its_hooks():
    x = torch.randn(2, 3, 5, 5)
    net = small_net()
    seen = testing.block_inputs(net, x, ["0", "4"])
    assert torch.equal(seen["0"][0][0], x) and seen["0"][1] == {}
    with torch.no_grad():
        assert torch.equal(seen["4"][0][0], net[:4](x))
    assert not any(m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError, match=r"names: blocks \['9'\] are not in the model"):
        testing.block_inputs(net, x, ["9"])
    net.eval()
    skipped = nn.Sequential(net, nn.Identity())
    skipped.forward = lambda t: net(t)  # the Identity never runs
    with pytest.raises(ValueError, match="names: block '1' did not run"):
        testing.block_inputs(skipped, x, ["1"])


# ---------------------------------------------------------------- checks that cannot fail are failures
def test_a_result_whose_limit_is_not_finite_fails():
    """eager (or the reference) overflowed: every error is within an infinite limit, nothing was checked."""
    r = testing.ParityResult("step 1 output", math.inf, math.inf, math.inf, 1.0)
    assert not r.ok and "blind check" in str(r)
    assert testing.ParityResult("x", 1.0, 1.0, 3.0, 10.0).ok
    assert testing.max_abs_err(torch.ones(2), torch.tensor([1.0, math.inf], dtype=torch.float64)) == math.inf


def _overflowing_net() -> nn.Sequential:
    """A net whose fp32 output overflows (1e22 squared) while its fp64 twin's does not."""
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1e22)
        net[1].weight.fill_(1e22)
    return net


def test_train_step_parity_fails_runs_that_overflow():
    """The runs in fp32 give inf (the model under test as well as eager): inf <= 3 x inf once passed."""
    net = _overflowing_net()
    results = testing.train_step_parity(net, copy.deepcopy(net), torch.ones(2, 4), steps=1, lr=0.0)
    output = next(r for r in results if r.what == "step 0 output")
    assert not output.ok and "blind check" in str(output)
    # the same with finite weights passes: the failure is the overflow
    finite = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    assert not testing.failures(testing.train_step_parity(finite, copy.deepcopy(finite), torch.randn(2, 4), steps=1))


def test_a_training_result_is_blind_where_eager_and_the_model_are_both_far_off():
    scale = 2.0
    clean = testing.ParityResult("g", 0.1 * scale, 0.1 * scale, 0.3 * scale, scale)
    diverged = testing.ParityResult("g", 0.5 * scale, 0.4 * scale, 1.2 * scale, scale)
    precise = testing.ParityResult("g", 0.001 * scale, 0.4 * scale, 1.2 * scale, scale)  # eager alone imprecise
    assert testing._unless_blind(clean) == clean and testing._unless_blind(precise) == precise
    marked = testing._unless_blind(diverged)
    assert diverged.ok and not marked.ok and "both over 0.25" in str(marked)


def test_worst_of_measures_analytically_zero_tensors_against_the_median():
    """A tensor zero in fp64 (1e-16: a BatchNorm bias into another BatchNorm) whose fp32 rounding is
    1e-6 of the typical tensor's scale: it does not decide the worst-of result (1e-3 of the median
    used to stand in for its scale, making that rounding a 1e-3 relative error)."""
    typical = [torch.full((3,), 1.0, dtype=torch.float64) for _ in range(4)]
    pairs = [(t.float() + 1e-7, t.float() + 2e-7, t) for t in typical]
    zero = torch.full((3,), 1e-16, dtype=torch.float64)
    pairs.append((zero.float() + 1e-6, zero.float() + 1e-6, zero))
    r = testing._worst("grad", pairs, torch.float32, testing.BACKWARD_FACTOR)
    assert r.eager_err == pytest.approx(1e-6, rel=1e-3) and r.err == pytest.approx(1e-6, rel=1e-3)
    # a defect on the zero tensor (1e-2 of the typical scale) still fails
    pairs[-1] = (zero.float() + 1e-2, zero.float() + 1e-6, zero)
    assert not testing._worst("grad", pairs, torch.float32, testing.BACKWARD_FACTOR).ok
