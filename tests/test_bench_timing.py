"""benchmarks.timing, benchmarks.gate and benchmarks.env on the CPU."""

import math

import pytest
import torch

from benchmarks import env, gate
from benchmarks.timing import TimingConfig, quantiles, time_calls


def test_quantiles_hand_computed():
    samples = [float(v) for v in range(11)]  # 0..10
    assert quantiles(samples) == pytest.approx((2.0, 5.0, 8.0))
    assert quantiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        quantiles([])


def test_time_calls_rotates_inputs_and_respects_iteration_bounds():
    seen = []
    cfg = TimingConfig(warmup_iters=2, warmup_s=0.0, min_time_s=10.0, min_iters=5, max_iters=7)
    t = time_calls(seen.append, 3, "cpu", cfg)
    assert t.iters == 7  # min_time_s asks for more, max_iters caps
    assert len(seen) == 2 + 7
    assert seen == [i % 3 for i in range(9)]
    assert 0 <= t.ms_p20 <= t.ms_p50 <= t.ms_p80


def test_timing_config_validation():
    with pytest.raises(ValueError, match="max_iters"):
        TimingConfig(min_iters=10, max_iters=5)
    with pytest.raises(ValueError, match="warmup_iters"):
        TimingConfig(warmup_iters=0)
    with pytest.raises(ValueError, match="n_inputs"):
        time_calls(lambda i: None, 0, "cpu")


def test_rel_err_and_gate():
    ref = torch.randn(4, 10, dtype=torch.float64)
    noise = torch.randn(4, 10, dtype=torch.float64)
    out = ref + 1e-3 * noise
    assert gate.rel_err(out, ref) == pytest.approx(1e-3 * noise.norm().item() / ref.norm().item())
    bad = out.clone()
    bad[0, 0] = float("nan")
    assert gate.rel_err(bad, ref) == math.inf
    assert gate.rel_err(out[:2], ref) == math.inf
    assert gate.check(out.half(), ref, "fp16", eager_err=0.0).ok  # 1e-3 < fp16 floor 1e-2
    result = gate.check(out, ref, "fp32", eager_err=0.0)  # 1e-3 > fp32 floor 1e-4
    assert not result.ok and "output differs from eager" in result.reason
    assert gate.check(out, ref, "fp32", eager_err=1e-3).ok  # within 3x eager's own error
    with pytest.raises(ValueError, match="dtype"):
        gate.check(out, ref, "int8", 0.0)


def test_env(monkeypatch):
    monkeypatch.setenv(env.COMMIT_ENV, "abc123")
    versions = env.collect_versions("cpu")
    assert tuple(versions) == env.VERSION_COLUMNS
    assert versions["commit"] == "abc123" and versions["torch"] == torch.__version__ and versions["gpu"] == "cpu"
    assert env.measure_copy_bandwidth("cpu", 1 << 20, iters=3) > 0
    with pytest.raises(ValueError, match="nbytes"):
        env.measure_copy_bandwidth("cpu", 0)
