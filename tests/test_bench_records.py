"""benchmarks.records: CSV creation, appending with the same header, header changes."""

import csv
import math

import pytest

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
