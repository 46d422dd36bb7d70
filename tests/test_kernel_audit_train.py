"""The kernel audit of the Triton and CUDA training kernels (``python -m benchmarks.kernel_audit --train``).

* which launches it covers: every MBConv block of B0-B7 makes the training calls its structure
  implies (depthwise forward and backward always, the expand's backward where it has one, the SE's
  where it has one, the projection's backward GEMMs); the compulsory bytes of each op, hand-counted;
* that recording them records the real launchers' kernels (meta tensors, nothing run), that the CUDA
  launches follow csrc/'s launch code (hand-counted grids; the chunking itself is checked against the
  sources in tests/test_cuda_geometry.py) and that the quick subset compiles for sm_90 without spills;
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

from benchmarks.kernel_audit import cuda_train_audit  # noqa: E402
from benchmarks.kernel_audit import train_workloads as tw  # noqa: E402
from benchmarks.kernel_audit.audit import cuda_rows, run_audit  # noqa: E402
from benchmarks.kernel_audit.cache import DiskCache  # noqa: E402
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
#: The CUDA kernels of a training step besides the eval audit's (names without template arguments); the
#: forward's apply pass is the eval depthwise kernel. The 1x1 convs' backward runs in cuDNN: no CUDA rows.
CUDA_TRAINING_KERNELS = {
    "stats_kernel", "stats_combine_kernel", "dwconv_nhwc_kernel", "bwd_reduce_kernel", "sum_rows_kernel", "gz_kernel",
    "input_grads_kernel", "se_excite_bwd_kernel", "se_gate_bwd_sample_kernel", "at_b_kernel",
}
CUDNN_TRAINING_OPS = {"expand_bn_act_train_backward", "pointwise_conv_backward"}


def _base_name(kernel: str) -> str:
    return kernel.split("<")[0].split("(")[0]


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


def test_cuda_training_launches_follow_the_launch_code():
    """B0's 144-channel block at batch 8, fp16, NHWC, hand-counted from csrc/dwconv_train.cu and se_train.cu:
    the reduction kernels' tile is 32 channels x 8 rows, 5 channel groups; 8 * 56 * 56 = 25088 positions in
    chunks of 128 (at least 16 per thread of a row of 8 bounds the chunks at 196, below the 2112 / 5 that fill
    the GPU), gz's pass too; the combines one thread per item; the SE gate's backward one block per sample."""
    by_op = {w.op: cuda_train_audit.launches(w) for w in tw.quick_training_workloads()}
    fwd = by_op["dwconv_bn_act_train"]
    assert [_base_name(l.kernel.split("::")[-1]) for l in fwd] == ["stats_kernel", "stats_combine_kernel",
                                                                    "dwconv_nhwc_kernel"]
    assert fwd[0].kernel.endswith("stats_kernel<__half, 3>") and (fwd[0].grid, fwd[0].block) == ((5, 196, 1),
                                                                                                 (32, 8, 1))
    assert fwd[0].note == "chunks of 128 positions" and fwd[0].channel_slots == 160 and fwd[1].grid == (1, 1, 1)
    bwd = by_op["dwconv_bn_act_train_backward"]
    assert [_base_name(l.kernel.split("::")[-1]) for l in bwd] == [
        "bwd_reduce_kernel", "sum_rows_kernel", "sum_rows_kernel", "gz_kernel", "input_grads_kernel",
        "sum_rows_kernel"]
    assert [l.grid for l in bwd] == [(5, 196, 1), (1, 1, 1), (1, 1, 1), (5, 196, 1), (5, 196, 1),
                                     (-(-9 * 144 // 256), 1, 1)]
    # B0's stride-2 k5 block (144 channels, 56 -> 28): the input pass has 4x the positions and 4x the chunks
    s2 = next(w for w in tw.training_workloads(["b0"], batches=[8], dtypes=["fp16"])
              if w.op == "dwconv_bn_act_train_backward" and w.stride == 2 and w.c == 144)
    assert [l.grid[1] for l in cuda_train_audit.launches(s2) if "reduce" in l.kernel or "input" in l.kernel] == [49, 196]
    (excite,) = by_op["se_excite_backward"]
    assert excite.kernel.endswith("se_excite_bwd_kernel<__half>") and excite.grid == (5, 8, 1)
    gate = by_op["se_gate_backward"]
    assert gate[0].kernel.endswith("se_gate_bwd_sample_kernel<1, 5>") and gate[0].grid == (8, 1, 1)
    assert gate[0].dynamic_smem == 4 * 3 * 6 and [l.grid[0] for l in gate[1:]] == [4, 1, 4, 1]
    assert all(not cuda_train_audit.launches(w) for w in tw.quick_training_workloads() if w.op in CUDNN_TRAINING_OPS)
    with pytest.raises(ValueError, match="unknown training op 'dwconv_bn_act'"):
        cuda_train_audit.launches(Workload("dwconv_bn_act", 1, 8, 4, 4, 4, 4, k=3))


def test_the_quick_cuda_training_audit_finds_every_kernel_in_the_build(tmp_path):
    """The training sources compiled for sm_90 (nvcc, as CI has it): every CUDA training launch of the quick subset
    has its kernel in the build, registers and no spills. The apply pass (the eval kernel, whose 16-bit instances
    take 25 s of nvcc) is left to the eval audit's quick run (tests/test_kernel_audit.py): here it is not found."""
    rows = cuda_rows(tw.quick_training_workloads(), DiskCache(tmp_path / "cache"), ("fp16",), say=lambda msg: None,
                     sources=("dwconv_train.cu", "se_train.cu"))
    assert {_base_name(r["kernel"]) for r in rows} == CUDA_TRAINING_KERNELS
    apply = [r for r in rows if r["kernel"].startswith("dwconv_nhwc_kernel")]
    assert apply and all(r["notes"].startswith("kernel not found") for r in apply)
    training = [r for r in rows if r not in apply]
    assert all(r["regs"] != "" and not r["notes"].startswith("kernel not found") for r in training)
    assert audit_invariant_violations(training) == []
    with pytest.raises(FileNotFoundError, match="no kernel sources named"):
        cuda_rows(tw.quick_training_workloads(), DiskCache(None), sources=("dwconv_traim.cu",), say=lambda msg: None)


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
    assert {r["kernel"] for r in rows if r["backend"] == "triton"} == TRAINING_KERNELS
    assert {_base_name(r["kernel"]) for r in rows if r["backend"] == "cuda"} == CUDA_TRAINING_KERNELS
    assert {r["backend"] for r in rows} == {"triton", "cuda"}
    cuda = {(r["op"], r["shape_class"], r["dtype"], r["layout"]) for r in rows if r["backend"] == "cuda"}
    missing = [w for w in tw.training_workloads()
               if w.op not in CUDNN_TRAINING_OPS and (w.op, w.shape_class, w.dtype, w.layout) not in cuda]
    assert not missing, f"{len(missing)} training workloads without CUDA rows, e.g. {missing[:3]}"
    assert not any(r["notes"].startswith("kernel not found") for r in rows)
    assert audit_invariant_violations(rows) == []


def test_committed_training_audit_is_not_older_than_the_kernels():
    md = (ROOT / "benchmarks" / "results" / "kernel_audit_train.md").read_text()
    line = next(ln for ln in md.splitlines() if "kernel sources" in ln)
    assert "uncommitted" not in line, line
    assert_audit_not_older_than_the_kernels("kernel_audit_train.md", "python -m benchmarks.kernel_audit --train")
