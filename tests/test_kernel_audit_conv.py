"""The kernel audit's stem rows (benchmarks/kernel_audit): the ``conv_bn_act`` workloads (the stem of each of
B0-B7: 3 x R x R at the native resolution R, 3x3 stride 2 pad 1 -> Cout, folded BN, SiLU) and their bytes, the
captured Triton launch and its config, no CUDA launch (the cuda backend runs the stem in cuDNN), the ``--ops``
filter, and the conv invariants, each shown to fail on a doctored row as well as to pass on the real one.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from benchmarks.kernel_audit import __main__ as cli  # noqa: E402
from benchmarks.kernel_audit import cuda_audit, sass, triton_audit  # noqa: E402
from benchmarks.kernel_audit.audit import triton_rows  # noqa: E402
from benchmarks.kernel_audit.cache import DiskCache  # noqa: E402
from benchmarks.kernel_audit.invariants import MIN_CONV_WARPS_PER_SM, audit_invariant_violations  # noqa: E402
from benchmarks.kernel_audit.rows import COLUMNS  # noqa: E402
from benchmarks.kernel_audit.workloads import (  # noqa: E402
    OPS, DTYPES, LAYOUTS, BATCHES, Workload, network_workloads, quick_workloads, stem_workload)
from effnet_kernels import models  # noqa: E402
from effnet_kernels.triton import conv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AFTER = ROOT / "benchmarks" / "results" / "kernel_audit.csv"

needs_cuobjdump = pytest.mark.skipif(sass.find_tool("cuobjdump") is None,
                                     reason="cuobjdump not installed (pip install -r requirements-dev.txt)")


def _stems(wls):
    return [w for w in wls if w.op == "conv_bn_act"]


def _stem_cout(name: str) -> int:
    with torch.device("meta"):
        return models.efficientnet(name).stem.conv.out_channels


def test_workloads_cover_the_stem_of_b0_to_b7():
    wls = _stems(network_workloads())
    assert len(wls) == len(models.MODEL_NAMES) * len(BATCHES) * len(DTYPES) * len(LAYOUTS)
    for name in models.MODEL_NAMES:
        r = models.native_resolution(name)
        first = models.layer_shapes(name)[0]
        mine = [w for w in wls if name in w.used_by]
        assert {(w.n, w.dtype, w.layout) for w in mine} == {(n, d, l) for n in BATCHES for d in DTYPES for l in LAYOUTS}
        for w in mine:
            assert (w.c, w.cout, w.h, w.w, w.k, w.stride, w.pad, w.activation) == (
                3, _stem_cout(name), r, r, 3, 2, 1, "silu"), (name, w)
            assert (w.ho, w.wo) == (first.H, first.W) == ((r - 1) // 2 + 1,) * 2  # what the first block sees
    assert [_stem_cout(n) for n in models.MODEL_NAMES] == [32, 32, 32, 40, 48, 48, 56, 64]
    assert _stems(quick_workloads()) and all(w.used_by == ("b0",) for w in _stems(quick_workloads()))


def test_stem_bytes_follow_the_kernel_docstring():
    """B0's stem at 224, fp16: 1,105,728 B per image (conv.compulsory_bytes' docstring)."""
    wl = stem_workload("b0", 1, "fp16", "nhwc")
    assert wl.shape_class == "1,3->32,224,224,k3,s2,silu"
    assert wl.compulsory_bytes() == 1_105_728
    b7 = stem_workload("b7", 256, "fp32", "nchw")
    assert b7.compulsory_bytes() == 4 * (256 * 3 * 600 * 600 + 256 * 64 * 300 * 300 + 64 * 27) + 4 * 64


def test_captured_conv_launch_carries_its_config_and_cuda_has_none():
    wl = stem_workload("b0", 256, "fp16", "nhwc")
    (launch,) = triton_audit.capture(wl)
    assert launch.kernel == "_conv_bn_act_kernel"
    cfg = triton_audit.config_of(launch)
    for part in ("BLOCK_M=128", "BLOCK_N=32", "BLOCK_K=32", "VEC=8", "warps=8"):
        assert part in cfg, cfg
    assert "stages=" not in cfg  # the launcher does not set a pipeline depth (K = 27: one chunk)
    c = launch.constexprs
    assert c["CHANNELS_LAST"] and c["HAS_BIAS"] and not c["DOT_F32"] and not c["INT64"] and c["K"] == 3
    assert launch.grid == (256 * triton.cdiv(112 * 112, 128), 1, 1)
    assert triton_audit.outputs_per_thread(launch) == 128 * 32 / (32 * 8)
    assert triton_audit.channel_slots(launch) == 32
    (fp32,) = triton_audit.capture(stem_workload("b0", 256, "fp32", "nchw"))
    assert fp32.constexprs["DOT_F32"] and not fp32.constexprs["CHANNELS_LAST"]
    (b3,) = triton_audit.capture(stem_workload("b3", 1, "bf16", "nhwc"))  # Cout 40 in one 64-wide channel block
    assert b3.constexprs["BLOCK_N"] == 64 and triton_audit.channel_slots(b3) == 64
    # the same launch the hooks the kernel's author left describe (grid and constexprs of launch_args)
    x = torch.empty(256, 3, 224, 224, device="meta").to(torch.float16).contiguous(memory_format=torch.channels_last)
    lp = conv.prepare_conv(x, torch.empty(32, 3, 3, 3, dtype=torch.float16, device="meta"),
                           torch.empty(32, device="meta"), (2, 2), (1,) * 4, "silu")
    grid, _, consts = conv.launch_args(lp, conv._candidates(lp)[0])
    assert tuple(grid) + (1,) == launch.grid and consts.pop("num_warps") == launch.num_warps
    assert {k: launch.constexprs[k] for k in consts} == consts
    for layout in LAYOUTS:
        assert cuda_audit.launches(stem_workload("b0", 256, "fp16", layout)) == []


def test_ops_filter_accepts_conv_bn_act(monkeypatch, tmp_path):
    seen = {}

    def fake_run_audit(wls, *args, **kwargs):
        seen["ops"] = {w.op for w in wls}
        return []

    monkeypatch.setattr(cli, "run_audit", fake_run_audit)
    assert "conv_bn_act" in OPS
    assert cli.main(["--quick", "--ops", "conv_bn_act", "--out-dir", str(tmp_path)]) == 0
    assert seen["ops"] == {"conv_bn_act"}
    assert cli.main(["--quick", "--ops", "conv_bn_act,pointwise_conv", "--out-dir", str(tmp_path)]) == 0
    assert seen["ops"] == {"conv_bn_act", "pointwise_conv"}
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--ops", "conv_bn_ac", "--out-dir", str(tmp_path)])
    assert "conv_bn_act" in (tmp_path / "kernel_audit.md").read_text()  # the report names the stem's floor


# ------------------------------------------------------------------ the invariants on real and doctored rows

def _committed_conv_rows() -> list[dict]:
    with open(AFTER, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["op"] == "conv_bn_act"]


def _real(rows, dtype, layout) -> dict:
    return dict(next(r for r in rows if r["dtype"] == dtype and r["layout"] == layout))


def test_committed_audit_covers_every_stem_launch_and_keeps_the_conv_invariants():
    rows = _committed_conv_rows()
    assert len(rows) == len(_stems(network_workloads())) and {r["backend"] for r in rows} == {"triton"}
    assert all(list(r) == list(COLUMNS) for r in rows)
    assert audit_invariant_violations(rows) == []
    for r in rows:
        where = f"{r['shape_class']} {r['dtype']} {r['layout']}"
        assert r["kernel"] == "_conv_bn_act_kernel" and r["code_source"] == "sass", where
        assert int(r["spill_store_B"]) == int(r["spill_load_B"]) == 0 and int(r["regs"]) <= 255, where
        assert (int(r["mma"]) > 0) == (r["dtype"] != "fp32"), where
        assert int(r["warps_per_sm"]) >= MIN_CONV_WARPS_PER_SM, where
        if r["layout"] == "nhwc":
            assert int(r["stg_128"]) > 0, where


def _check_defects(fp16: dict, fp32: dict) -> None:
    """Real fp16 / fp32 NHWC rows pass; each doctored copy fails with its own message."""
    assert audit_invariant_violations([fp16, fp32]) == []
    cases = {
        "NHWC conv without 128-bit output stores": dict(fp16, stg_by_bits="16:32", stg_128="0"),
        "16-bit conv without tensor-core instructions": dict(fp16, mma="0"),
        "fp32 conv on the tensor cores": dict(fp32, mma="4"),
        f"< {MIN_CONV_WARPS_PER_SM}": dict(fp16, warps_per_sm="4", ctas_per_sm="1"),
        "spills": dict(fp16, spill_store_B="16", spill_load_B="16"),
        "not compiled": dict(fp16, regs=""),
    }
    for kind, row in cases.items():
        found = audit_invariant_violations([row])
        assert any(kind in v for v in found), (kind, found)
    # the store rule is NHWC where Cout * bytes % 16 == 0 only: not on NCHW, nor for a Cout of 36 halves (72 B)
    assert audit_invariant_violations([dict(fp16, layout="nchw", stg_by_bits="16:32", stg_128="0")]) == []
    assert audit_invariant_violations([dict(fp16, Cout="36", stg_by_bits="16:32", stg_128="0")]) == []
    # no vector-load rule: the im2col gather of a 3-channel image has no 16-byte runs
    assert audit_invariant_violations([dict(fp16, ldg_by_bits="16:32", ldg_128="0")]) == []


def test_conv_invariants_pass_the_committed_rows_and_reject_each_defect():
    rows = _committed_conv_rows()
    _check_defects(_real(rows, "fp16", "nhwc"), _real(rows, "fp32", "nhwc"))


@needs_cuobjdump
def test_conv_invariants_on_freshly_compiled_rows(tmp_path):
    """B0's stem at batch 256, compiled here for sm_90 (not read from the committed CSV): wgmma for fp16,
    none for fp32, 128-bit NHWC stores, no spills; the doctored copies fail."""
    wls = [stem_workload("b0", 256, dtype, "nhwc") for dtype in ("fp16", "fp32")]
    fp16, fp32 = triton_rows(wls, DiskCache(tmp_path), say=lambda msg: None)
    assert int(fp16["mma"]) > 0 and int(fp32["mma"]) == 0 and int(fp16["stg_128"]) > 0 and int(fp32["stg_128"]) > 0
    _check_defects({k: str(v) for k, v in fp16.items()}, {k: str(v) for k, v in fp32.items()})


def test_workload_fields_round_trip_into_rows():
    """Ho, Wo and stride are filled for the stem (a strided op), Cout is the conv's output channels."""
    from benchmarks.kernel_audit.rows import make_row

    wl = stem_workload("b3", 1, "bf16", "nhwc")
    row = make_row(wl, "triton", "_conv_bn_act_kernel", "", "", 256, (352, 1, 1), None, 0, None, [], [],
                   channel_slots=64)
    assert (row["C"], row["Cout"], row["H"], row["Ho"], row["k"], row["stride"]) == (3, 40, 300, 150, 3, 2)
    assert row["channel_utilization"] == 0.625  # 40 of the 64 channels one BLOCK_N = 64 program column covers
    assert isinstance(wl, Workload)
