"""Sticky CUDA errors: exit code 75, the failing job recorded, the rest not; ``--resume`` continues the run."""

import pytest
import torch
from torch import nn

from benchmarks import models, network, providers
from benchmarks.env import RUN_ID_ENV
from benchmarks.records import read_rows

FAST = ["--device", "cpu", "--copy-mb", "1", "--warmup-iters", "1", "--warmup-s", "0", "--min-time-s", "0",
        "--min-iters", "2", "--max-iters", "2", "--quiet", "--buffers", "2"]
STICKY = "CUDA error: an illegal memory access was encountered"


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.SiLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.body(x))


class Poisoned(nn.Module):
    """What a kernel with an out-of-bounds access looks like to the runner."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        raise RuntimeError(STICKY + "\nCUDA kernel errors might be asynchronously reported ...")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(models._BUILDERS, "small", lambda: (Small(), 8))
    monkeypatch.setitem(providers.PROVIDERS, "poison", providers.Provider("poison", lambda m, d: Poisoned(m)))
    monkeypatch.setenv("EFFNET_COMMIT", "testcommit")
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    yield
    torch.set_num_threads(threads)


def _configs(rows):
    return [(r["model"], r["batch"], r["dtype"], r["layout"], r["provider"], r["mode"]) for r in rows]


def test_sticky_error_exits_75_records_the_job_and_resume_finishes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_ID_ENV, "session-1")
    out = tmp_path / "r.csv"
    argv = ["--models", "small", "--batches", "2,3", "--dtypes", "fp32", "--providers", "eager,poison,eager@nchw",
            "--out", str(out)] + FAST
    assert network.main(argv) == network.EXIT_CUDA_CONTEXT_LOST == 75
    rows = read_rows(out)
    # the job before ran, the failing one is recorded as failed, nothing after it was written
    assert _configs(rows) == [("small", "2", "fp32", "channels_last", "eager", "infer"),
                              ("small", "2", "fp32", "channels_last", "poison", "infer")]
    assert rows[1]["status"] == f"failed: RuntimeError: {STICKY}"
    assert {r["run_id"] for r in rows} == {"session-1"}
    # each --resume continues after what is recorded; poison fails again at batch 3 (exit 75 again)
    assert network.main(argv + ["--resume"]) == 75
    assert network.main(argv + ["--resume"]) == 0
    rows = read_rows(out)
    configs = _configs(rows)
    assert len(configs) == len(set(configs)) == 6  # every configuration exactly once
    assert sorted(configs) == sorted(
        ("small", b, "fp32", layout, prov, "infer")
        for b in ("2", "3") for prov, layout in (("eager", "channels_last"), ("poison", "channels_last"),
                                                 ("eager", "nchw")))
    for r in rows:
        assert r["status"] == ("ok" if r["provider"] == "eager" else f"failed: RuntimeError: {STICKY}"), r
    assert {r["run_id"] for r in rows} == {"session-1"}
    # finished: one more resume runs nothing
    assert network.main(argv + ["--resume"]) == 0
    assert len(read_rows(out)) == 6


def test_resume_only_skips_rows_of_the_same_run_and_retries_time_budget_skips(tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    argv = ["--models", "small", "--batches", "2", "--dtypes", "fp32,bf16", "--providers", "eager",
            "--out", str(out)] + FAST
    monkeypatch.setenv(RUN_ID_ENV, "run-a")
    assert network.main(argv + ["--time-budget", "1e-9"]) == 0
    assert {r["status"][:24] for r in read_rows(out)} == {"skipped: time budget of "}
    assert network.main(argv + ["--resume"]) == 0  # budget skips are not "done"
    assert [r["status"] for r in read_rows(out)[2:]] == ["ok", "ok"]
    assert network.main(argv + ["--resume"]) == 0
    assert len(read_rows(out)) == 4
    monkeypatch.setenv(RUN_ID_ENV, "run-b")  # another run: nothing of it is done yet
    assert network.main(argv + ["--resume"]) == 0
    assert [r["run_id"] for r in read_rows(out)] == ["run-a"] * 4 + ["run-b"] * 2
    # without EFFNET_RUN_ID, --resume continues the last run in --out; a plain run starts a new one
    monkeypatch.delenv(RUN_ID_ENV)
    assert network.main(argv + ["--resume"]) == 0
    assert len(read_rows(out)) == 6
    assert network.main(argv) == 0
    new = read_rows(out)[6:]
    assert len(new) == 2 and new[0]["run_id"] not in ("run-a", "run-b") and new[0]["run_id"] == new[1]["run_id"]


def test_resume_matches_the_requested_batch_and_skips_a_finished_model_without_building_it(tmp_path, monkeypatch):
    class Greedy(Small):
        def forward(self, x):
            if x.shape[0] > 8:
                raise torch.cuda.OutOfMemoryError("pretend: CUDA out of memory")
            return super().forward(x)

    built = []
    monkeypatch.setitem(models._BUILDERS, "greedy", lambda: built.append(1) or (Greedy(), 8))
    monkeypatch.setitem(models._RESOLUTIONS, "greedy", 8)
    monkeypatch.setenv(RUN_ID_ENV, "run-c")
    out = tmp_path / "r.csv"
    argv = ["--models", "greedy", "--batches", "16", "--dtypes", "fp32", "--providers", "eager", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    (row,) = read_rows(out)
    assert (row["batch"], row["requested_batch"]) == ("8", "16")
    assert network.main(argv + ["--resume"]) == 0
    assert len(read_rows(out)) == 1 and len(built) == 1


def test_dry_run_with_resume_reports_what_is_done(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RUN_ID_ENV, "run-d")
    out = tmp_path / "r.csv"
    argv = ["--models", "small", "--batches", "2", "--dtypes", "fp32", "--providers", "eager", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    capsys.readouterr()
    assert network.main(argv + ["--resume", "--dry-run"]) == 0
    assert "run run-d, resume: 1 rows of this run already there" in capsys.readouterr().out
