"""The launch-config tuner's logic (pure Python; timings are faked, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from effnet_kernels.triton import _tuning  # noqa: E402
from effnet_kernels.triton._tuning import Config  # noqa: E402

A, B, C = Config(16, 64), Config(32, 32), Config(64, 16, 8)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Tuning enabled, ``do_bench`` replaced by a table of timings; returns the log of timed configs."""
    import triton.testing

    timings = {A: 3.0, B: 1.0, C: 2.0}
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        return timings[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: True)
    _tuning.clear_cache()
    yield timed
    _tuning.clear_cache()


def test_times_every_candidate_once_and_caches_the_fastest(fake_gpu):
    spaces = []

    def space():
        spaces.append(1)
        return [A, B, C], A

    t = torch.empty(1)
    assert _tuning.choose("k", t, space, fake_gpu.append) == B
    assert fake_gpu == [A, B, C]
    assert _tuning.choose("k", t, space, fake_gpu.append) == B
    assert fake_gpu == [A, B, C] and len(spaces) == 1, "a cached key must not be timed or enumerated again"
    assert _tuning.choose("other", t, space, fake_gpu.append) == B and len(fake_gpu) == 6


def test_a_config_that_fails_loses(fake_gpu):
    def run(cfg):
        fake_gpu.append(cfg)
        if cfg == B:
            raise RuntimeError("out of resources")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], A), run) == C


def test_all_failing_falls_back_to_the_default(fake_gpu):
    def run(cfg):
        raise RuntimeError("no")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C


def test_without_tuning_the_default_is_used_and_not_cached(monkeypatch):
    _tuning.clear_cache()
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)

    def run(cfg):
        raise AssertionError("nothing may be timed")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C
    assert "k" not in _tuning._cache


def test_tuning_is_off_on_cpu_and_by_environment(monkeypatch):
    assert not _tuning.tuning_enabled(torch.empty(1))
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
        assert not _tuning.tuning_enabled(torch.empty(1, device="cuda"))


def test_tuning_stops_when_the_process_budget_is_spent(fake_gpu, monkeypatch, capsys):
    """Compiling every candidate costs seconds: past the budget new shape classes get the default, uncached."""
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "1e-12")
    t = torch.empty(1)
    assert _tuning.choose("first", t, lambda: ([A, B, C], A), fake_gpu.append) == B, "the first class is tuned"
    assert len(fake_gpu) == 3
    assert _tuning.choose("second", t, lambda: ([A, B, C], C), fake_gpu.append) == C
    assert len(fake_gpu) == 3 and "second" not in _tuning._cache
    assert _tuning.choose("first", t, lambda: ([A, B, C], A), fake_gpu.append) == B, "tuned classes stay cached"
    assert capsys.readouterr().err.count("tuning budget used up") == 1
    _tuning.choose("third", t, lambda: ([A, B, C], C), fake_gpu.append)
    assert "tuning budget" not in capsys.readouterr().err, "said once per process"


def test_budget_zero_and_default(fake_gpu, monkeypatch):
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "0")
    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], C), fake_gpu.append) == C and fake_gpu == []
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "inf")
    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], C), fake_gpu.append) == B
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "not a number")
    assert _tuning.tuning_budget_s() == _tuning.DEFAULT_BUDGET_S
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR)
    assert _tuning.tuning_budget_s() == _tuning.DEFAULT_BUDGET_S


def test_a_failing_trial_still_counts_against_the_budget(fake_gpu, monkeypatch):
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "1e-12")

    def run(cfg):
        raise RuntimeError("out of resources")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C
    assert _tuning._spent_s > 0
    assert _tuning.choose("k2", torch.empty(1), lambda: ([A, B], C), fake_gpu.append) == C and fake_gpu == []
