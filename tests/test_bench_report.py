"""benchmarks.report: markdown tables and plots from a hand-made results CSV."""

import pytest

from benchmarks import report
from benchmarks.records import NETWORK_COLUMNS, OPS_COLUMNS, append_rows

BASE = {"gpu": "H100", "driver": "580", "torch": "2.11", "cuda": "13.0", "cudnn": "91000", "triton": "3.6",
        "commit": "abc", "run_id": "20250101T000000Z-aaaaaa", "resolution": 224, "batch": 256, "dtype": "fp16", "mode": "infer", "copy_gb_per_s": 3000.0,
        "act_mb_per_img": 90.0, "bound_img_per_s": 33333.0}


def _row(model, provider, layout, ips, status="ok"):
    row = {**BASE, "model": model, "provider": provider, "layout": layout, "status": status}
    if ips is not None:
        row.update(img_per_s=ips, frac_of_bound=ips / 33333.0, ms_p50=256 / ips * 1e3)
    return row


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "results.csv"
    append_rows(path, [
        _row("b1", "eager", "channels_last", 1000.0),
        _row("b0", "eager", "channels_last", 999.0),  # superseded below
        _row("b0", "eager", "channels_last", 2000.0),
        _row("b0", "eager", "nchw", 1000.0),
        _row("b0", "fused-cuda", "channels_last", 5000.0),
        _row("b0", "fused-triton", "channels_last", None, "failed: output differs from eager"),
    ], NETWORK_COLUMNS)
    return path


def test_table_has_latest_values_speedups_and_status(csv_path):
    from benchmarks.records import read_rows

    md = report.network_tables(read_rows(csv_path))
    assert "#### H100 · infer · fp16 · batch 256 · run 20250101T000000Z-aaaaaa" in md
    b0 = next(line for line in md.splitlines() if line.startswith("| b0 |"))
    cells = [c.strip() for c in b0.strip("|").split("|")]
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    by = dict(zip(cols, cells))
    assert by["eager@channels_last"] == "2,000 (1.00x, 6%)"
    assert by["eager@nchw"] == "1,000 (0.50x, 3%)"
    assert by["fused-cuda@channels_last"] == "5,000 (2.50x, 15%)"
    assert by["fused-triton@channels_last"] == "failed"
    assert by["act MB/img"] == "90.0"
    assert md.index("| b0 |") < md.index("| b1 |")


def test_main_writes_markdown_and_plots(csv_path, tmp_path):
    pytest.importorskip("matplotlib")
    md = tmp_path / "out" / "RESULTS.md"
    ops = tmp_path / "ops.csv"
    op = {"gpu": "H100", "op": "dwconv", "shape": "32x96x112x112/k3s2", "dtype": "fp16", "layout": "channels_last"}
    append_rows(ops, [
        {**op, "provider": "eager", "us_p50": 20.0, "gb_per_s": 500.0, "frac_of_copy": 0.166, "speedup_vs_eager": 1.0,
         "status": "ok"},
        {**op, "provider": "cuda", "us_p50": 5.0, "gb_per_s": 2500.0, "frac_of_copy": 0.83, "speedup_vs_eager": 4.0,
         "status": "ok"},
    ], OPS_COLUMNS)
    assert report.main(["--csv", str(csv_path), "--ops-csv", str(ops), "--md", str(md),
                        "--plots-dir", str(tmp_path / "plots")]) == 0
    text = md.read_text()
    assert "### Op benchmarks" in text and "#### H100 · fp16 · channels_last" in text
    assert "| dwconv | 32x96x112x112/k3s2 | 20.0 (500 GB/s, 17%, 1.00x) | 5.0 (2500 GB/s, 83%, 4.00x) |" in text
    assert "dwconv cuda 4.00x (1 shapes)" in text
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["plot_H100_infer_fp16_bs256_20250101T000000Z-aaaaaa.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](../plots/plot_H100_infer_fp16_bs256_20250101T000000Z-aaaaaa.png)" in text


def test_main_without_csv_fails_cleanly(tmp_path, capsys):
    assert report.main(["--csv", str(tmp_path / "nope.csv"), "--ops-csv", str(tmp_path / "nope2.csv")]) == 2
    assert "--csv" in capsys.readouterr().err


def test_readme_section_is_replaced_and_links_follow(csv_path, tmp_path):
    pytest.importorskip("matplotlib")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nMore.\n")
    md = tmp_path / "benchmarks" / "results" / "RESULTS.md"
    argv = ["--csv", str(csv_path), "--ops-csv", str(tmp_path / "none.csv"), "--md", str(md),
            "--plots-dir", str(md.parent), "--readme", str(readme)]
    assert report.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n<!-- results:begin -->\n### Network benchmarks")
    assert text.endswith("<!-- results:end -->\n\nMore.\n") and "old table" not in text
    assert "](benchmarks/results/plot_H100_infer_fp16_bs256_20250101T000000Z-aaaaaa.png)" in text
    assert "](plot_H100_infer_fp16_bs256_20250101T000000Z-aaaaaa.png)" in md.read_text()
    assert report.main(argv) == 0  # idempotent
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    assert report.main(argv) == 2


def test_runs_are_never_mixed(tmp_path):
    """Speedups only against the eager row of the same run; each table names its run; rows
    without a run id get no speedups."""
    from benchmarks.records import read_rows

    old, new = "20250101T000000Z-aaaaaa", "20250202T000000Z-bbbbbb"
    path = tmp_path / "results.csv"
    rows = [
        {**_row("b0", "eager", "channels_last", 1000.0), "run_id": old},
        {**_row("b0", "fused-cuda", "channels_last", 3000.0), "run_id": old},
        {**_row("b0", "eager", "channels_last", 2000.0), "run_id": new},
        {**_row("b0", "fused-cuda", "channels_last", 3000.0), "run_id": new},
        {**_row("b1", "fused-cuda", "channels_last", 3000.0), "run_id": new},  # no eager b1 in this run
        {**_row("b1", "eager", "channels_last", 1500.0), "run_id": old},
        {**_row("b0", "eager", "channels_last", 500.0), "run_id": ""},  # before run ids
        {**_row("b0", "fused-cuda", "channels_last", 3000.0), "run_id": ""},
    ]
    append_rows(path, rows, NETWORK_COLUMNS)
    md = report.network_tables(read_rows(path))
    sections = md.split("#### ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        f"H100 · infer · fp16 · batch 256 · run {new}", f"H100 · infer · fp16 · batch 256 · run {old}",
        "H100 · infer · fp16 · batch 256 · run unrecorded"]  # newest first
    new_md, old_md, legacy_md = sections
    assert f"Run `{new}`: every row of this table" in new_md
    assert "| b0 | 90.0 | 33,333 | 2,000 (1.00x, 6%) | 3,000 (1.50x, 9%) |" in new_md
    assert "| b1 | 90.0 | 33,333 |  | 3,000 (9%) |" in new_md  # b1's eager is from another run: no speedup
    assert "| b0 | 90.0 | 33,333 | 1,000 (1.00x, 3%) | 3,000 (3.00x, 9%) |" in old_md
    assert "| b0 | 90.0 | 33,333 | 500 (2%) | 3,000 (9%) |" in legacy_md
    assert "Run: unrecorded" in legacy_md
    assert report.runs(rows) == [new, old, report.UNRECORDED]
    assert {r["run_id"] for r in report.keep_runs(rows, 1)} == {new}
    ops = [{"gpu": "H100", "op": "se", "shape": "s", "dtype": "fp16", "layout": "channels_last", "provider": p,
            "us_p50": us, "status": "ok", "run_id": run} for p, us, run in
           (("eager", 10.0, old), ("cuda", 5.0, old), ("eager", 20.0, new), ("triton", 5.0, new))]
    text = report.ops_table(ops)
    assert f"channels_last · run {new}" in text and f"channels_last · run {old}" in text
    new_ops = text.split(f"run {new}")[1].split("#### ")[0]
    assert "cuda" not in new_ops  # the old run's cuda row is not in the new run's table


def test_auto_table_never_compares_times_of_different_runs():
    from benchmarks.auto_table import build_table

    base = {"gpu": "H100", "op": "dwconv", "shape": "32x96x112x112/k3s2", "dtype": "fp16", "layout": "channels_last",
            "status": "ok"}
    mixed = [{**base, "provider": "triton", "us_p50": "5", "run_id": "a"},
             {**base, "provider": "cuda", "us_p50": "9", "run_id": "b"}]
    assert build_table(mixed)[0] == {}  # one backend per run: nothing to decide from
    same = mixed + [{**base, "provider": "cuda", "us_p50": "4", "run_id": "a"}]
    (choice,) = build_table(same)[0].values()
    assert choice == "cuda"  # run a has both: cuda 4 < triton 5 (run b's 9 is not compared)
