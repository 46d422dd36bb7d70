"""The kernel audit's pointwise GEMM rows (benchmarks/kernel_audit): the workloads (every expand, projection
and head 1x1 conv of B0-B7) and their bytes, the captured launch and its config, the SASS counts a GEMM
needs (LDGSTS copies, HGMMA / HMMA), and the GEMM invariants, each shown to fail as well as to pass.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks.kernel_audit import sass, triton_audit  # noqa: E402
from benchmarks.kernel_audit.compiled import stats_from_json  # noqa: E402
from benchmarks.kernel_audit.invariants import MIN_GEMM_WARPS_PER_SM, audit_invariant_violations  # noqa: E402
from benchmarks.kernel_audit.rows import COLUMNS, make_row  # noqa: E402
from benchmarks.kernel_audit.workloads import Workload, head_channels, network_workloads, quick_workloads  # noqa: E402
from effnet_kernels import models  # noqa: E402

needs_cuobjdump = pytest.mark.skipif(sass.find_tool("cuobjdump") is None,
                                     reason="cuobjdump not installed (pip install -r requirements-dev.txt)")


def _pw(wls, **kw):
    return [w for w in wls if w.op == "pointwise_conv" and all(getattr(w, k) == v for k, v in kw.items())]


def test_workloads_cover_every_1x1_conv_of_b0_to_b7():
    wls = network_workloads(dtypes=("fp16",), layouts=("nhwc",))
    for name in models.MODEL_NAMES:
        layers = models.layer_shapes(name, batch=256)
        mine = [w for w in _pw(wls, n=256) if name in w.used_by]
        for layer in layers:
            project = (layer.mid_channels, layer.out_channels, layer.Ho, layer.Wo, bool(layer.se_reduced),
                       layer.has_residual)
            assert any((w.c, w.cout, w.h, w.w, w.gate, w.residual) == project and not w.pool for w in mine), project
            if layer.expand_ratio != 1:
                expand = (layer.in_channels, layer.mid_channels, layer.H, layer.W)
                assert any((w.c, w.cout, w.h, w.w) == expand and w.activation == "silu" for w in mine), expand
        (head,) = [w for w in mine if w.pool]
        assert (head.c, head.cout, head.h) == (layers[-1].out_channels, head_channels(name), layers[-1].Ho)
    assert head_channels("b0") == 1280 and head_channels("b7") == 2560


def test_pointwise_bytes_follow_the_kernel_docstring():
    """B0's expand 24 -> 144 at 56 x 56 and gated project 1152 -> 320 at 7 x 7, batch 256, fp16 (pointwise.py)."""
    wls = network_workloads(("b0",), batches=(256,), dtypes=("fp16",), layouts=("nhwc",))
    (expand,) = _pw(wls, c=24, cout=144, h=56)
    (project,) = _pw(wls, c=1152, cout=320)
    assert expand.shape_class == "256,24->144,56,56,silu" and project.shape_class == "256,1152->320,7,7,identity,gate"
    assert round(expand.compulsory_bytes() / 1e5) == 2698  # 269.8 MB
    assert round(project.compulsory_bytes() / 1e5) == 388  # 38.8 MB
    (head,) = _pw(wls, pool=True)
    assert head.compulsory_bytes() == 2 * 256 * 320 * 49 + 4 * 256 * 1280 + 2 * 1280 * 320 + 4 * 1280
    assert _pw(quick_workloads())


def test_captured_pointwise_launch_carries_its_gemm_config():
    wl = Workload("pointwise_conv", 256, 1152, 7, 7, 7, 7, k=1, dtype="bf16", layout="nhwc", cout=320, gate=True,
                  activation="identity")
    (launch,) = triton_audit.capture(wl)
    cfg = triton_audit.config_of(launch)
    assert launch.kernel == "_pointwise_kernel"
    for part in ("BLOCK_M=", "BLOCK_N=", "BLOCK_K=", "VEC_X=8", "VEC_O=8", "stages="):
        assert part in cfg, cfg
    c = launch.constexprs
    assert c["HAS_GATE"] and not c["HAS_RES"] and not c["POOL"]
    assert triton_audit.outputs_per_thread(launch) == c["BLOCK_M"] * c["BLOCK_N"] / (32 * launch.num_warps)
    pooled = Workload("pointwise_conv", 1, 320, 7, 7, 7, 7, k=1, dtype="fp16", layout="nchw", cout=1280, pool=True,
                      activation="silu")
    (launch,) = triton_audit.capture(pooled)
    assert launch.constexprs["POOL"] and launch.grid[0] == 1280 // launch.constexprs["BLOCK_N"]


def _dot(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK, BLOCK], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK):
        a = tl.load(a_ptr + i[:, None] * K + (k0 + i)[None, :])
        b = tl.load(b_ptr + (k0 + i)[:, None] * BLOCK + i[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], acc)


@needs_cuobjdump
def test_gemm_sass_counts_ldgsts_copies_and_tensor_core_ops():
    """A pipelined fp16 dot: its cp.async tiles (LDGSTS.128) count as 128-bit global loads, its wgmma as MMA."""
    rec = triton_audit.compile_function(_dot, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"},
                                        {"BLOCK": 64}, aligned=("a_ptr", "b_ptr", "c_ptr", "K"))
    st = stats_from_json(rec["stats"])
    assert st.source == "sass" and st.mma > 0 and st.ldg.get(128, 0) > 0, (st.mma, st.ldg)
    pst = sass.ptx_stats(_ptx_of_dot())  # the PTX fallback counts them too (cp.async 0x10, wgmma.mma_async)
    assert pst.mma > 0 and pst.ldg.get(128, 0) > 0, (pst.mma, pst.ldg)


def _ptx_of_dot() -> str:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    jf = JITFunction(_dot)
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    src = triton.compiler.ASTSource(fn=jf, signature=sig, constexprs={(4,): 64}, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": 4})
    return triton.compile(src, target=target, options=opts.__dict__).asm["ptx"]


def _gemm_row(**edit) -> dict:
    wl = Workload("pointwise_conv", 256, 144, 28, 28, 28, 28, k=1, dtype=edit.pop("dtype", "fp16"), layout="nhwc",
                  cout=40, gate=True, activation="identity")
    row = make_row(wl, "triton", "_pointwise_kernel", "", "", 128, (1, 1, 1), None, 0, None, [], [])
    row.update(regs="128", spill_store_B="0", spill_load_B="0", local_ld_st="0", warps_per_sm="16", ctas_per_sm="4",
               ldg_by_bits="128:24 64:8", stg_by_bits="128:4", ldg_128="24", stg_128="4", mma="4", loops="2",
               membar="0", cctl_invalidate="0", ordering_ops="", bank_max_ways="")
    row.update(edit)
    assert list(row) == list(COLUMNS)
    return row


def test_gemm_invariants_pass_a_good_row_and_reject_each_defect():
    assert audit_invariant_violations([_gemm_row()]) == []
    assert audit_invariant_violations([_gemm_row(dtype="fp32", mma="0")]) == []
    cases = {
        "without 128-bit tile loads": _gemm_row(ldg_by_bits="32:40", ldg_128="0"),
        "without 128-bit output stores": _gemm_row(stg_by_bits="16:8", stg_128="0"),
        "without tensor-core": _gemm_row(mma="0"),
        "on the tensor cores": _gemm_row(dtype="fp32", mma="8"),
        f"< {MIN_GEMM_WARPS_PER_SM}": _gemm_row(warps_per_sm="4", ctas_per_sm="1"),
        "spills": _gemm_row(spill_store_B="12", spill_load_B="12"),
    }
    for kind, row in cases.items():
        found = audit_invariant_violations([row])
        assert any(kind in v for v in found), (kind, found)
    pooled = _gemm_row(stg_by_bits="32:1", stg_128="0")
    pooled["shape_class"] += ",pool"
    assert audit_invariant_violations([pooled]) == []  # a pooled head stores [N, Cout] fp32: no vector rule
