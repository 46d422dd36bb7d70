"""Kernel audit without a GPU: every Triton and CUDA kernel launch of EfficientNet B0-B7 compiled for sm_90
(the MBConv blocks' depthwise, SE and 1x1 convs, the head, and the stem's ``conv_bn_act``).

``python -m benchmarks.kernel_audit`` writes ``benchmarks/results/kernel_audit.csv`` (one row per
launch: registers, spills, shared memory, CTAs/SM, waves at 132 SMs, global load/store
instructions by width, fences and atomics from the SASS, simulated bank conflicts, compulsory
bytes and the time they imply at the H200's peak) and ``kernel_audit.md`` (one row per
compiled variant). :func:`audit_invariant_violations` lists what breaks the properties
issue #10's fixes must establish.

Modules: ``workloads`` (what B0-B7 launch), ``triton_audit`` / ``cuda_audit`` (capture and
compile), ``cuda_geometry`` (the CUDA launch and shared-memory index formulas, shared with
tests/test_cuda_geometry.py), ``sass`` (parsers), ``banks`` (bank-conflict simulator and the
CUDA shared accesses), ``hardware`` (sm_90 limits, occupancy), ``rows``, ``invariants``, ``report``.
"""

from .audit import run_audit
from .invariants import MIN_WARPS_PER_SM, audit_invariant_violations

__all__ = ["run_audit", "audit_invariant_violations", "MIN_WARPS_PER_SM"]
