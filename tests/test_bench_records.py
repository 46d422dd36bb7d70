"""benchmarks.records: CSV creation, appending with the same header, header changes."""

import csv
import math

import pytest
from torch import nn

from benchmarks.records import NETWORK_COLUMNS, OPS_COLUMNS, append_rows, format_value, read_rows

REQUIRED = ("gpu", "driver", "torch", "cuda", "cudnn", "triton", "commit", "model", "resolution", "batch",
            "dtype", "layout", "provider", "mode", "img_per_s", "ms_p20", "ms_p50", "ms_p80", "peak_mem_mb",
            "status", "timestamp")


def test_network_columns_hold_the_issue_columns_in_order():
    positions = [NETWORK_COLUMNS.index(c) for c in REQUIRED]
    assert positions[:-1] == sorted(positions[:-1])
    for extra in ("max_rel_err", "act_mb_per_img", "bound_img_per_s", "frac_of_bound", "copy_gb_per_s"):
        assert extra in NETWORK_COLUMNS
    for c in ("op", "shape", "us_p50", "gb_per_s", "copy_gb_per_s", "speedup_vs_eager"):
        assert c in OPS_COLUMNS


def test_new_file_gets_header_and_rows(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    append_rows(path, [{"a": 1, "b": 2.5}, {"a": "x"}], ["a", "b"])
    with path.open() as f:
        lines = list(csv.reader(f))
    assert lines == [["a", "b"], ["1", "2.5"], ["x", ""]]


def test_append_same_header_keeps_old_rows_and_header_once(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"a": 1}], ["a", "b"])
    append_rows(path, [{"a": 2, "b": 3}], ["a", "b"])
    text = path.read_text().splitlines()
    assert text == ["a,b", "1,", "2,3"]


def test_changed_header_rewrites_with_union_and_keeps_rows(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"a": 1, "old": "o"}], ["a", "old"])
    append_rows(path, [{"a": 2, "new": "n"}], ["a", "new"])
    rows = read_rows(path)
    assert list(rows[0]) == ["a", "old", "new"]
    assert rows == [{"a": "1", "old": "o", "new": ""}, {"a": "2", "old": "", "new": "n"}]
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_key_is_rejected_and_file_untouched(tmp_path):
    path = tmp_path / "r.csv"
    append_rows(path, [{"a": 1}], ["a"])
    before = path.read_text()
    with pytest.raises(ValueError, match="not CSV columns.*zzz"):
        append_rows(path, [{"zzz": 1}], ["a"])
    assert path.read_text() == before


def test_format_value():
    assert format_value(None) == ""
    assert format_value(math.nan) == ""
    assert format_value(1234.56789) == "1234.57"
    assert format_value("failed: x") == "failed: x"


def test_read_missing_file_is_empty(tmp_path):
    assert read_rows(tmp_path / "missing.csv") == []


def test_merge_cli_appends_returned_files(tmp_path, capsys):
    from benchmarks.records import main

    returned, results = tmp_path / "out", tmp_path / "results"
    returned.mkdir()
    append_rows(results / "results.csv", [{"a": 1, "b": 2}], ["a", "b"])
    append_rows(returned / "results.csv", [{"a": 3, "b": 4}, {"a": 5}], ["a", "b"])
    append_rows(returned / "ops.csv", [{"op": "se"}], ["op"])
    assert main([str(returned / "results.csv"), str(returned / "ops.csv"), "--into", str(results)]) == 0
    assert read_rows(results / "results.csv") == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}, {"a": "5", "b": ""}]
    assert read_rows(results / "ops.csv") == [{"op": "se"}]
    assert main([str(tmp_path / "missing.csv"), "--into", str(results)]) == 2
    assert "sources" in capsys.readouterr().err


# ---------------------------------------------------------------- provenance columns (benchmarks.env)
PROVENANCE = ("python", "nvcc", "src_hash", "cuda_ext", "triton_tune", "run_id")


def test_both_csvs_start_with_the_version_and_provenance_columns():
    from benchmarks.env import VERSION_COLUMNS

    for c in PROVENANCE + ("gpu", "torch", "commit"):
        assert c in VERSION_COLUMNS
    assert NETWORK_COLUMNS[:len(VERSION_COLUMNS)] == VERSION_COLUMNS == OPS_COLUMNS[:len(VERSION_COLUMNS)]
    for c in ("requested_batch", "sensitivity", "checks"):
        assert c in NETWORK_COLUMNS


def test_source_hash_follows_contents_and_ignores_caches(tmp_path):
    from benchmarks.env import source_hash

    (tmp_path / "effnet_kernels" / "__pycache__").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "effnet_kernels" / "a.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "k.cu").write_text("// kernel\n")
    first = source_hash(tmp_path)
    assert len(first) == 12 and int(first, 16) >= 0
    (tmp_path / "effnet_kernels" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0junk")
    (tmp_path / "effnet_kernels" / "_C.so").write_bytes(b"\0binary")
    assert source_hash(tmp_path) == first
    (tmp_path / "csrc" / "k.cu").write_text("// kernel, changed\n")
    assert source_hash(tmp_path) != first
    assert source_hash(tmp_path / "nowhere") == ""


def test_run_id_triton_tuning_and_cuda_extension_state(monkeypatch):
    from benchmarks import env

    monkeypatch.setenv(env.RUN_ID_ENV, "my-run")
    assert env.run_id() == "my-run" and env.collect_versions("cpu")["run_id"] == "my-run"
    assert env.collect_versions("cpu", "other")["run_id"] == "other"
    monkeypatch.delenv(env.RUN_ID_ENV)
    assert env.run_id() == env.run_id() != "my-run"  # one per process
    assert env.new_run_id() != env.new_run_id()
    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "0")
    assert env.triton_tuning_state() == "off"
    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "1")
    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE_BUDGET_S", "12.5")
    assert env.triton_tuning_state() == "on budget=12.5"
    try:
        from effnet_kernels.triton import _tuning
    except Exception:
        pass
    else:  # the variables env.py reads are the tuner's
        assert (_tuning.TUNE_ENV_VAR, _tuning.BUDGET_ENV_VAR, _tuning.DEFAULT_BUDGET_S) == (
            "EFFNET_KERNELS_TRITON_TUNE", "EFFNET_KERNELS_TRITON_TUNE_BUDGET_S", 30.0)
    from effnet_kernels import _build, cuda

    class Built:
        @staticmethod
        def build_info():
            return {"source_hash": "abc123"}

    monkeypatch.setattr(cuda, "_module", None)
    monkeypatch.setattr(cuda, "_import_prebuilt", lambda: (None, []))
    monkeypatch.setattr(_build, "read_record", lambda directory: None)
    assert env.cuda_extension_hash() == ""  # not built: empty
    monkeypatch.setattr(cuda, "_expected_hash", lambda: "abc123")
    monkeypatch.setattr(cuda, "_module", Built())
    assert env.cuda_extension_hash() == "abc123"
    monkeypatch.setattr(cuda, "_expected_hash", lambda: "def456")
    assert env.cuda_extension_hash() == "abc123!stale"


class TinyNet(nn.Module):
    """A conv + BN + SiLU + head network for CPU runs of benchmarks.network (registered as "net")."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.body(x))


def cpu_network_argv(out, providers: str) -> list[str]:
    """benchmarks.network arguments for a quick CPU run of the "net" model (batch 2, fp32) into ``out``."""
    return ["--models", "net", "--batches", "2", "--dtypes", "fp32", "--providers", providers, "--out", str(out),
            "--device", "cpu", "--copy-mb", "1", "--warmup-iters", "1", "--warmup-s", "0", "--min-time-s", "0",
            "--min-iters", "2", "--max-iters", "2", "--quiet", "--buffers", "2"]


def test_network_rows_carry_the_provenance_columns(tmp_path, monkeypatch):
    import platform

    from benchmarks import env, models, network

    monkeypatch.setitem(models._BUILDERS, "net", lambda: (TinyNet(), 8))
    monkeypatch.setenv(env.RUN_ID_ENV, "prov-run")
    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "0")
    out = tmp_path / "r.csv"
    # an older file (no provenance columns) stays readable and keeps its rows
    append_rows(out, [{"gpu": "H100", "model": "b0", "status": "ok"}], ("gpu", "model", "status"))
    assert network.main(cpu_network_argv(out, "eager")) == 0
    old, row = read_rows(out)
    assert old["model"] == "b0" and old["run_id"] == "" and old["python"] == ""
    assert row["python"] == platform.python_version()
    assert row["nvcc"] == env.nvcc_version() and row["cuda_ext"] == env.cuda_extension_hash()
    assert row["src_hash"] == env.source_hash() != ""
    assert row["triton_tune"] == "off" and row["run_id"] == "prov-run"
    assert row["requested_batch"] == "2" and float(row["sensitivity"]) > 0.1 and row["checks"].startswith("network ")
