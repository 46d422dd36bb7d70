"""The kernel audit of the Triton training kernels (``python -m benchmarks.kernel_audit --train``).

* which launches it covers: every MBConv block of B0-B7 makes the training calls its structure
  implies (depthwise forward and backward always, the expand's backward where it has one, the SE's
  where it has one, the projection's backward GEMMs); the compulsory bytes of each op, hand-counted;
* that recording them records the real launchers' kernels (meta tensors, nothing run) and that the
  quick subset compiles for sm_90 without spills;
* the committed audit (``benchmarks/results/kernel_audit_train.csv``): one row per launch of every
  B0-B7 training workload at the target (batch 128, fp16 / bf16, channels_last), no invariant
  broken, and not older than the kernel sources.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks.kernel_audit import train_workloads as tw  # noqa: E402
from benchmarks.kernel_audit.audit import run_audit  # noqa: E402
from benchmarks.kernel_audit.invariants import audit_invariant_violations  # noqa: E402
from benchmarks.kernel_audit.triton_train_audit import capture_training  # noqa: E402
from benchmarks.kernel_audit.workloads import Workload  # noqa: E402
from effnet_kernels import models  # noqa: E402

from .test_kernel_audit import assert_audit_not_older_than_the_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "kernel_audit_train.csv"
#: The kernels a training step's Triton launchers run besides the eval audit's (module-qualified).
TRAINING_KERNELS = {
    "dwconv_train._dwconv_stats_kernel", "_partials._combine_moments_kernel", "dwconv._dwconv_bn_act_kernel",
    "dwconv_backward._grad_u_kernel", "dwconv_backward._dwconv_input_grad_kernel", "dwconv._sum_tiles_kernel",
    "expand_backward._sums_kernel", "expand_backward._dgrad_kernel", "expand_backward._wgrad_kernel",
    "pointwise_backward._dgrad_kernel", "pointwise_backward._wgrad_kernel", "se_backward._rows_times_kernel",
    "se_backward._outer_kernel", "se_backward._se_excite_backward_kernel",
}


def test_every_block_of_b0_to_b7_makes_the_training_calls_its_structure_implies():
    wls = tw.training_workloads()
    have = {(w.op, w.shape_class, w.dtype, w.layout) for w in wls}
    assert {w.dtype for w in wls} == {"fp16", "bf16"} and {w.layout for w in wls} <= {"nhwc", "-"}
    for name in models.MODEL_NAMES:
        for layer in models.layer_shapes(name, batch=128):
            ops = [w.op for w in tw.block_training_calls(layer, "fp16", "nhwc")]
            expect = ["dwconv_bn_act_train", "dwconv_bn_act_train_backward"]
            expect += ["expand_bn_act_train_backward"] if layer.expand_ratio != 1 else []
            expect += ["pointwise_conv_backward"]
            expect += ["se_gate_backward", "se_excite_backward"] if layer.se_reduced else []
            assert ops == expect, (name, layer)
            for w in tw.block_training_calls(layer, "bf16", "nhwc"):
                assert (w.op, w.shape_class, w.dtype, w.layout) in have
    assert all(name in w.used_by for w in wls for name in w.used_by) and any(len(w.used_by) > 1 for w in wls)


def test_training_ops_compulsory_bytes_hand_counted():
    """fp16 (2 bytes), batch 8: B0's block 2 (24 -> 144 at 56x56, k3 stride 1, SE 144 -> 6 -> 144)."""
    n, c, hw, s = 8, 144, 56 * 56, 2
    by_op = {w.op: w for w in tw.quick_training_workloads()}
    assert by_op["dwconv_bn_act_train"].compulsory_bytes() == s * n * c * 2 * hw + 4 * c * 9 + 8 * c + 4 * n * c + 8 * c
    assert by_op["dwconv_bn_act_train_backward"].compulsory_bytes() == (s * n * c * 3 * hw + 4 * n * c + 8 * c * 9
                                                                         + 24 * c)
    # the expand 24 -> 144: x and grad_x [8, 24, 56, 56], grad_a [8, 144, 56, 56], the weight and its gradient
    assert by_op["expand_bn_act_train_backward"].compulsory_bytes() == (s * n * hw * (2 * 24 + 144)
                                                                        + 2 * s * 144 * 24 + 24 * 144)
    # the projection 144 -> 24 with the gate: grad_out [8, 24, ...], x and grad_x [8, 144, ...]
    assert by_op["pointwise_conv_backward"].compulsory_bytes() == (s * n * hw * (2 * 144 + 24) + 2 * s * 24 * 144
                                                                   + 4 * 24 + 8 * n * c)
    assert by_op["se_gate_backward"].compulsory_bytes() == 12 * n * c + 2 * s * (2 * c * 6 + c + 6)
    assert by_op["se_excite_backward"].compulsory_bytes() == 3 * s * n * c * hw + 8 * n * c
    with pytest.raises(ValueError, match="unknown training op 'dwconv_backward'"):
        tw.compulsory_bytes(Workload("dwconv_backward", 1, 8))


def test_recording_the_training_launchers_records_every_training_kernel():
    """On meta tensors, nothing run: the quick subset (one block of every training op) launches each kernel
    of :data:`TRAINING_KERNELS`; an unknown op is refused by name."""
    launched = {launch.kernel for wl in tw.quick_training_workloads() for launch in capture_training(wl)}
    assert launched == TRAINING_KERNELS
    with pytest.raises(ValueError, match="unknown training op 'se_gate'"):
        capture_training(Workload("se_gate", 1, 8, r=2))


def test_the_quick_training_audit_compiles_without_spills(tmp_path):
    """Every launch of the quick subset compiles for sm_90 (a row with registers), keeps every invariant
    (no spills, no local memory) and has its compulsory bytes."""
    rows = run_audit(tw.quick_training_workloads(), ["triton"], tmp_path / "cache", say=lambda msg: None,
                     capture=capture_training)
    assert {r["kernel"] for r in rows} == TRAINING_KERNELS
    assert all(r["regs"] != "" and int(r["compulsory_bytes"]) > 0 for r in rows)
    assert audit_invariant_violations(rows) == []


def test_the_cli_refuses_an_eval_op_for_the_training_audit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_audit", "--train", "--ops", "dwconv_bn_act",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ops ['dwconv_bn_act']" in proc.stderr, proc.stderr
    assert "dwconv_bn_act_train" in proc.stderr


def _committed_rows() -> list[dict]:
    with open(COMMITTED, newline="") as fh:
        return list(csv.DictReader(fh))


def test_committed_training_audit_covers_every_training_launch_and_keeps_every_invariant():
    rows = _committed_rows()
    have = {(r["op"], r["shape_class"], r["dtype"], r["layout"]) for r in rows}
    missing = [w for w in tw.training_workloads() if (w.op, w.shape_class, w.dtype, w.layout) not in have]
    assert not missing, f"{len(missing)} training workloads without rows, e.g. {missing[:3]}"
    assert {r["kernel"] for r in rows} == TRAINING_KERNELS and {r["backend"] for r in rows} == {"triton"}
    assert audit_invariant_violations(rows) == []


def test_committed_training_audit_is_not_older_than_the_kernels():
    md = (ROOT / "benchmarks" / "results" / "kernel_audit_train.md").read_text()
    line = next(ln for ln in md.splitlines() if "kernel sources" in ln)
    assert "uncommitted" not in line, line
    assert_audit_not_older_than_the_kernels("kernel_audit_train.md", "python -m benchmarks.kernel_audit --train")
