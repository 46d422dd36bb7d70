"""The kernel audit (benchmarks/kernel_audit): its detectors on small kernels compiled here, the occupancy
formula and the bank-conflict simulator on hand-worked cases, the CLI in --quick mode, and the invariants
against the committed "before" audit (which must violate them: the kernels there are not fixed yet).

Each detector is shown to fail as well as to pass (default vs relaxed atomic, spilling vs not, vector vs
scalar loads), so a parser that silently finds nothing cannot pass.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks.kernel_audit import banks, cuda_geometry, hardware, sass, triton_audit  # noqa: E402
from benchmarks.kernel_audit.invariants import MIN_WARPS_PER_SM, audit_invariant_violations  # noqa: E402
from benchmarks.kernel_audit.report import variant_table  # noqa: E402
from benchmarks.kernel_audit.rows import COLUMNS, make_row  # noqa: E402
from benchmarks.kernel_audit.workloads import Workload, network_workloads  # noqa: E402
from effnet_kernels import _build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "benchmarks" / "results" / "kernel_audit_before.csv"
needs_cuobjdump = pytest.mark.skipif(sass.find_tool("cuobjdump") is None,
                                     reason="cuobjdump not installed (pip install -r requirements-dev.txt)")


# ------------------------------------------------------------------ small Triton kernels

def atomic_default(ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(ptr + offs, tl.full([BLOCK], 1.0, tl.float32))


def atomic_relaxed(ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(ptr + offs, tl.full([BLOCK], 1.0, tl.float32), sem="relaxed")


def copy_strided(src, dst, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs * stride, tl.load(src + offs * stride))


def _compile(fn, types, consts, aligned=(), num_warps=4):
    return triton_audit.compile_function(fn, types, consts, aligned, num_warps)


def _stats(rec):
    from benchmarks.kernel_audit.compiled import stats_from_json

    return stats_from_json(rec["stats"])


def _row(rec, op="dwconv_bn_act", layout="nhwc", threads=128, outputs=8.0):
    wl = Workload(op, 1, 64, 8, 8, 8, 8, k=3, stride=1, pad=1, dtype="fp16", layout=layout)
    return make_row(wl, "triton", "test", "", "", threads, (1, 1, 1), rec, rec["dynamic_smem"], outputs, [], [])


@needs_cuobjdump
def test_atomic_fence_detector_default_vs_relaxed():
    """tl.atomic_add's default (acq_rel) fences and invalidates L1 around the atomic; sem="relaxed" is a bare RED."""
    strong = _stats(_compile(atomic_default, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",)))
    relaxed = _stats(_compile(atomic_relaxed, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",)))
    assert strong.source == relaxed.source == "sass"
    assert strong.membars >= 1 and strong.l1_invalidations >= 1, strong.ordering
    assert relaxed.membars == 0 and relaxed.l1_invalidations == 0, relaxed.ordering
    assert sum(relaxed.red.values()) + sum(relaxed.atom.values()) >= 1
    # the invariant sees the same difference
    assert any("squeeze fences" in v for v in audit_invariant_violations(
        [_row(_compile(atomic_default, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",)))]))
    assert not any("squeeze fences" in v for v in audit_invariant_violations(
        [_row(_compile(atomic_relaxed, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",)))]))


def test_without_a_disassembler_the_audit_falls_back_to_ptx_and_says_so(monkeypatch):
    """No cuobjdump / nvdisasm: counts come from PTX, the record says so, and the acq_rel atomic still shows."""
    monkeypatch.setattr(sass, "find_tool", lambda name: None)
    strong = _compile(atomic_default, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",))
    relaxed = _compile(atomic_relaxed, {"ptr": "*fp32"}, {"BLOCK": 128}, ("ptr",))
    assert any("from PTX" in n for n in strong["notes"])
    assert _stats(strong).source == "ptx" and _stats(strong).l1_invalidations >= 1 and _stats(strong).membars >= 1
    assert _stats(relaxed).l1_invalidations == 0 and _stats(relaxed).membars == 0


def test_cuobjdump_and_nvdisasm_listings_agree(tmp_path):
    """The two disassemblers' formats (addresses vs labels as branch targets) give the same statistics."""
    tools = {t: sass.find_tool(t) for t in sass.TOOLS}
    if None in tools.values():
        pytest.skip(f"needs both disassemblers: {tools}")
    _, cubin = _nvcc_cubin(tmp_path, [])
    a = subprocess.run([tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    b = subprocess.run([tools["nvdisasm"], "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    (fa,), (fb,) = sass.split_functions(a).values(), sass.split_functions(b).values()
    sa, sb = sass.sass_stats(fa), sass.sass_stats(fb)
    assert (sa.ldg, sa.stg, sa.loops, sa.instructions) == (sb.ldg, sb.stg, sb.loops, sb.instructions)
    assert sa.instructions > 10 and sa.ldg


@needs_cuobjdump
def test_vector_width_detector():
    """Aligned unit-stride fp32 loads are LDG.E.128 (4 per thread here); a runtime stride makes them scalar."""
    types = {"src": "*fp32", "dst": "*fp32", "stride": "i32"}
    vec = _stats(_compile(copy_strided, types, {"BLOCK": 512, "stride": 1}, ("src", "dst")))
    scalar = _stats(_compile(copy_strided, types, {"BLOCK": 512}, ("src", "dst")))
    assert vec.ldg == {128: 1} and vec.stg == {128: 1}, (vec.ldg, vec.stg)
    assert 128 not in scalar.ldg and scalar.ldg[32] == 4, scalar.ldg
    assert vec.loops == scalar.loops == 0


_SPILL_CU = r"""
__global__ void many_live(const float* __restrict__ x, float* __restrict__ y, int n) {
  float v[48];
#pragma unroll
  for (int i = 0; i < 48; ++i) v[i] = x[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int r = 0; r < 8; ++r)
#pragma unroll
    for (int i = 0; i < 48; ++i) s = fmaf(v[i], v[(i * 7 + r) % 48], s);
  y[threadIdx.x] = s;
}
"""


def _nvcc_cubin(tmp_path: Path, extra: list[str]) -> tuple[str, Path]:
    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.fail("nvcc is needed for the CUDA half of the audit (the README's CPU setup has it)")
    src = tmp_path / "k.cu"
    src.write_text(_SPILL_CU)
    out = tmp_path / f"k{len(extra)}.cubin"
    proc = subprocess.run([nvcc, "-cubin", "-O3", "-gencode=arch=compute_90,code=sm_90", "-Xptxas=-v", *extra,
                           str(src), "-o", str(out)], capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr, out


def test_spill_detector(tmp_path):
    """48 live floats under -maxrregcount=24 spill (ptxas -v and STL/LDL in the SASS); without the cap they do not."""
    log, cubin = _nvcc_cubin(tmp_path, ["-maxrregcount=24"])
    (res,) = sass.parse_ptxas_log(log).values()
    assert res.spill_store_bytes > 0 and res.spill_load_bytes > 0 and res.regs <= 24, res
    log_free, cubin_free = _nvcc_cubin(tmp_path, [])
    (free,) = sass.parse_ptxas_log(log_free).values()
    assert free.spill_store_bytes == free.spill_load_bytes == 0 and free.regs > 24, free
    if sass.find_tool("cuobjdump") is not None:
        spilled = sass.sass_stats(next(iter(sass.split_functions(sass.disassemble(cubin)).values())))
        clean = sass.sass_stats(next(iter(sass.split_functions(sass.disassemble(cubin_free)).values())))
        assert spilled.local_stores > 0 and clean.local_stores == 0


def test_ptxas_log_and_opcode_parsers():
    log = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 230 registers
"""
    got = sass.parse_ptxas_log(log)
    assert got["_Z1kPf"] == sass.Resources(40, 16, 12, 8, 2048)
    assert got["k2"] == sass.Resources(230, 0, 0, 0, 0)
    assert [sass.access_bits(op) for op in ("LDG.E.128", "LDG.E.64.CONSTANT", "LDG.E", "LDG.E.U16", "STG.E.U8")] == \
        [128, 64, 32, 16, 8]
    ptx = "ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n@%p1 ld.global.b16 %rs1, [%rd2];\nst.global.v2.f32 [%rd3], {%f1,%f2};\n" \
          "atom.global.gpu.acq_rel.add.f32 %f3, [%rd4], %f4;\nfence.acq_rel.gpu;\n"
    st = sass.ptx_stats(ptx)
    assert st.ldg == {128: 1, 16: 1} and st.stg == {64: 1} and sum(st.atom.values()) == 1
    assert st.membars == 2 and st.l1_invalidations == 1  # the fence, and the acq_rel atomic (both halves)


# ------------------------------------------------------------------ occupancy

@pytest.mark.parametrize("regs,threads,smem,ctas,limiter", [
    (128, 256, 0, 2, "registers"),        # 4096 regs/warp: 4 warps per sub-partition -> 16 warps -> 2 CTAs of 8
    (230, 128, 0, 2, "registers"),        # 7360 -> 7424 regs/warp: 2 warps/sub-partition -> 8 warps -> 2 CTAs of 4
    (32, 256, 0, 8, "registers+threads"),  # 1024 regs/warp: 64 warps fit; 64 / 8 warps per CTA
    (32, 128, 100 * 1024, 2, "shared memory"),  # 102400 + 1024 reserved: 233472 // 103424 = 2
    (32, 128, 228 * 1024, 0, "shared memory"),  # more than the 227 KB a CTA may have: none fits
    (16, 32, 0, 32, "CTA limit"),           # 1-warp CTAs: the 32-CTA cap
    (255, 1024, 0, 0, "registers"),         # 8192 regs/warp x 32 warps > 65536 per CTA
    (64, 1024, 0, 1, "registers"),          # 2048 regs/warp: 8 per sub-partition = 32 warps = 1 CTA (of 32 warps)
])
def test_occupancy_hand_worked(regs, threads, smem, ctas, limiter):
    occ = hardware.occupancy(regs, threads, smem)
    assert occ.ctas_per_sm == ctas, occ
    assert occ.limiter == limiter, occ


def test_occupancy_rejects_bad_input_and_waves():
    with pytest.raises(ValueError):
        hardware.occupancy(32, 0, 0)
    with pytest.raises(ValueError):
        hardware.occupancy(32, 2048, 0)
    assert hardware.waves(264, 2) == 1.0 and hardware.waves(10, 0) == float("inf")


# ------------------------------------------------------------------ bank conflicts

@pytest.mark.parametrize("stride,expect", [(1, 1), (2, 2), (8, 8), (9, 1), (16, 16), (32, 32), (33, 1), (0, 1)])
def test_bank_conflicts_of_strided_words(stride, expect):
    """Lane i at word i*stride: ways = 32 / (distinct banks) = gcd(stride, 32); stride 0 is a broadcast."""
    assert banks.ways([4 * i * stride for i in range(32)], 4) == expect


def test_bank_conflicts_of_wide_accesses_and_inactive_lanes():
    assert banks.ways([16 * i for i in range(32)], 16) == 1  # contiguous 16-byte: 4 phases of 8 lanes, no conflict
    assert banks.ways([32 * i for i in range(32)], 16) == 2  # stride 32 B: two lanes per bank quad in a phase
    assert banks.ways([4 * 32 * i if i % 2 else None for i in range(32)], 4) == 16  # 16 active lanes, one bank
    with pytest.raises(ValueError):
        banks.ways([2], 4)


def test_nhwc_weight_staging_conflicts_match_the_issue():
    """Negative control: the old CUDA NHWC weight staging w_s[tap*CB + ch] (fp16: 16 x 16 threads, CB = 128):
    mean 9 / ~22 / ~27 ways; the staging store of the current kernels at the same geometry: 1."""
    means = []
    for k in (3, 5, 7):
        geo = dict(k=k, bx=16, by=16, v=8, cb=128, threads=256)
        means.append(round(banks.simulate(banks.OLD_NHWC_STAGE_STORE, geo).mean_ways))
        assert all(c.max_ways == 1 for c in banks.cuda_conflicts("dwconv_nhwc", geo, True)), k
    assert means == [9, 22, 27]


def test_se_expand_hidden_staging_is_conflict_free_for_every_width():
    """se_expand stages each hidden chunk unit-major (element e = k * 8 + t at word e): its stores are
    1-way for every R, one chunk or several (R = 1..520; B0-B7 have R = 2..160), and its float4
    broadcast reads too. Negative control: the old row-major h_s[t * 256 + k] put the rows of R < 32
    that share a warp in the same banks (R = 4: 8-way, R = 16: 2-way, R = 3: 8 rows in 24 lanes, 8-way)."""
    for r in [*range(1, 40), 64, 100, 160, 255, 256, 257, 300, 520]:
        geo = dict(threads=256, chunks=cuda_geometry.hidden_chunks(r))
        got = {c.access.name: c.max_ways for c in banks.cuda_conflicts("se_expand", geo, True)}
        assert got == {"hidden staging store": 1, "hidden read": 1}, (r, got)
    old = {r: banks.simulate(banks.OLD_SE_EXPAND_STAGE_STORE, dict(threads=256, chunks=[r])).max_ways
           for r in (3, 4, 16, 32, 64)}
    assert old == {3: 8, 4: 8, 16: 2, 32: 1, 64: 1}


def test_se_expand_staging_fills_the_words_the_reads_take():
    """Staging element e lands on word e (a bijection onto [0, 8 * len) inside the kernel's
    h_s[kSampleTile * kHiddenChunk]), and the reads of unit k take words 8k .. 8k + 7: samples 0..7."""
    cg = cuda_geometry
    for n in (1, 5, 31, 160, 256):
        assert [cg.hidden_word(*cg.hidden_stage_unit(e)) for e in range(cg.SAMPLE_TILE * n)] == \
            list(range(cg.SAMPLE_TILE * n))
        assert all(cg.hidden_word(t, k) == 8 * k + t for k in range(n) for t in range(8))
    assert max(cg.hidden_chunks(1000)) <= cg.HIDDEN_CHUNK and sum(cg.hidden_chunks(1000)) == 1000


# ------------------------------------------------------------------ workloads and bytes

def test_workloads_cover_b0_to_b7_and_bytes_follow_the_readme():
    wls = network_workloads()
    dw = [w for w in wls if w.op == "dwconv_bn_act"]
    assert {w.dtype for w in dw} == {"fp16", "bf16", "fp32"} and {w.layout for w in dw} == {"nhwc", "nchw"}
    assert {w.n for w in dw} == {1, 256} and "b7" in {u for w in dw for u in w.used_by}
    # README example: B0's 144-channel 56x56 -> 28x28 k5 s2 layer at batch 256 in fp16 moves 289 MB
    (ex,) = [w for w in dw if (w.n, w.c, w.h, w.k, w.stride, w.dtype, w.layout) == (256, 144, 56, 5, 2, "fp16", "nhwc")]
    assert round(ex.compulsory_bytes() / 1e6) == 289


def test_captured_launches_carry_the_launchers_vector_config():
    """The audit captures the launcher's constexprs, so its config column shows what changes the code:
    VEC (C = 24 fp16 NHWC: 8, NCHW: 1), WEIGHT_TILE (batch-1 tiles of one vector per thread), and
    outputs per thread from the dwconv tile (BLOCK_H x BLOCK_W x BLOCK_C over the threads)."""
    def dwconv_launch(n, c, h, k, s, layout):
        wl = Workload("dwconv_bn_act", n, c, h, h, h // s, h // s, k, s, k // 2, dtype="fp16", layout=layout)
        (launch,) = [l for l in triton_audit.capture(wl) if l.kernel.startswith("_dwconv")]
        return launch

    nhwc, nchw = dwconv_launch(256, 24, 56, 3, 1, "nhwc"), dwconv_launch(256, 24, 56, 3, 1, "nchw")
    assert "VEC=8" in triton_audit.config_of(nhwc) and "VEC=1" in triton_audit.config_of(nchw)
    assert "WEIGHT_TILE=False" in triton_audit.config_of(nhwc)
    assert "WEIGHT_TILE=True" in triton_audit.config_of(dwconv_launch(1, 144, 56, 5, 2, "nhwc"))
    c = nhwc.constexprs
    assert triton_audit.outputs_per_thread(nhwc) == c["BLOCK_H"] * c["BLOCK_W"] * c["BLOCK_C"] / (32 * nhwc.num_warps)
    se = triton_audit.capture(Workload("se_excite", 256, 40, 28, 28, 28, 28, dtype="bf16", layout="nhwc"))
    assert se and "VEC=8" in triton_audit.config_of(se[0])


# ------------------------------------------------------------------ the CLI, --quick

@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_audit", "--quick", "--out-dir", str(out),
                           "--cache-dir", str(out / "cache")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "kernel_audit.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, (out / "kernel_audit.md").read_text(), out


def test_markdown_redrawn_from_the_csv(quick_rows, tmp_path):
    """--md-from writes the same variant table from the CSV alone (nothing compiled)."""
    from benchmarks.kernel_audit.__main__ import main

    _, md, out = quick_rows
    assert main(["--md-from", str(out / "kernel_audit.csv"), "--md", str(tmp_path / "again.md")]) == 0
    table = lambda text: text[text.index("## Compiled variants"):]  # noqa: E731
    assert table((tmp_path / "again.md").read_text()) == table(md)


def test_quick_audit_writes_well_formed_rows(quick_rows):
    rows, md, _ = quick_rows
    assert rows and list(rows[0]) == list(COLUMNS)
    assert md.count("\n| ") == len(variant_table(rows)) + 1  # header + one line per compiled variant
    assert {(r["backend"], r["op"]) for r in rows} >= {(b, o) for b in ("triton", "cuda")
                                                        for o in ("dwconv_bn_act", "se_gate", "se_excite")}
    for r in rows:
        where = f"{r['backend']} {r['kernel']} {r['shape_class']} {r['layout']}"
        assert not r["notes"].startswith("kernel not found"), where
        assert int(r["regs"]) > 0 and int(r["threads"]) > 0, where
        gx, gy, gz = map(int, r["grid"].split("x"))
        assert gx * gy * gz == int(r["ctas"]) >= 1, where
        assert int(r["ctas_per_sm"]) == hardware.occupancy(int(r["regs"]), int(r["threads"]),
                                                           int(r["static_smem_B"]) + int(r["dynamic_smem_B"])).ctas_per_sm
        assert float(r["waves_132sm"]) == pytest.approx(int(r["ctas"]) / (int(r["ctas_per_sm"]) * 132), abs=1e-3)
        assert r["code_source"] == "sass" and int(r["ldg"]) > 0 and int(r["stg"]) > 0, where
        assert float(r["implied_us_at_4.8TBps"]) == pytest.approx(int(r["compulsory_bytes"]) / 4.8e6, abs=1e-3)
    assert "| backend | kernel |" in md and "not measured" in md


# ------------------------------------------------------------------ invariants on the committed "before" audit

def _before_rows() -> list[dict]:
    with open(BEFORE, newline="") as fh:
        return list(csv.DictReader(fh))


def test_before_audit_violates_every_invariant():
    """At main 37ea15f every invariant is violated somewhere; after the fixes this list must be empty."""
    violations = audit_invariant_violations(_before_rows())
    for kind in ("squeeze fences", "narrow global loads outnumber", "bank conflicts", f"< {MIN_WARPS_PER_SM}",
                 "spills"):
        assert any(kind in v for v in violations), f"no '{kind}' violation in the before audit"


def test_before_audit_shows_the_issues_findings():
    """The committed audit of 37ea15f agrees with issue #10's reading of the compiler output (static file:
    the live kernels are being fixed, so this is not asserted on a fresh audit)."""
    rows = _before_rows()
    tri = [r for r in rows if r["backend"] == "triton" and r["op"] == "dwconv_bn_act"]
    atomic = [r for r in tri if r["shape_class"] == "256,144,56,56,k5,s2"]  # 28 x 28 outputs: the atomic squeeze
    single = [r for r in tri if r["shape_class"] == "256,672,14,14,k5,s2"]  # 7 x 7: one tile stores its sums
    assert atomic and all("MEMBAR" in r["ordering_ops"] and "CCTL.IVALL" in r["ordering_ops"] for r in atomic)
    assert single and all(r["ordering_ops"] == "" and r["atomics"] == "" for r in single)
    fp16_nhwc = {r["k"]: r["ldg_by_bits"] for r in atomic + tri if r["dtype"] == "fp16" and r["layout"] == "nhwc"
                 and r["C"] == "144"}
    assert fp16_nhwc["5"] == "128:54 32:200"  # 200 scalar fp32 weight loads at k5
    assert {r["regs"] for r in atomic if r["layout"] == "nchw" and r["dtype"] != "fp32"} == {"230"}
    cuda = [r for r in rows if r["backend"] == "cuda" and r["kernel"].startswith("dwconv_nhwc")
            and r["C"] == "144" and r["dtype"] == "fp16"]
    assert cuda and all("4 of 32 lanes" in r["notes"] for r in cuda)
    assert {r["bank_max_ways"] for r in cuda if r["k"] == "5"} == {"25.0"}
    gate = [r for r in rows if r["backend"] == "triton" and r["op"] == "se_gate" and r["C"] == "3840"]
    assert gate and all(int(r["spill_store_B"]) > 1600 for r in gate)  # B7's ~1.7 KB per thread


def test_invariants_pass_rows_that_keep_them():
    """Rows edited to have the fixed kernels' properties pass: the check is not violated by construction."""
    fixed = []
    for r in _before_rows():
        r = dict(r, spill_store_B="0", spill_load_B="0", local_ld_st="0", membar="0", cctl_invalidate="0",
                 ordering_ops="", bank_max_ways="1" if r["bank_max_ways"] else "", warps_per_sm="32",
                 ldg_by_bits="128:4", stg_by_bits="128:2", ldg_128="4", stg_128="2")
        fixed.append(r)
    assert audit_invariant_violations(fixed) == []


# ------------------------------------------------------------------ invariants on the committed "after" audit

AFTER = ROOT / "benchmarks" / "results" / "kernel_audit.csv"
# kernel sources the committed audit must follow: a change to any of them needs `python -m benchmarks.kernel_audit`
AUDITED_SOURCES = ("csrc", "effnet_kernels/triton", "effnet_kernels/_folded_weights.py")


def _after_rows() -> list[dict]:
    with open(AFTER, newline="") as fh:
        return list(csv.DictReader(fh))


def test_committed_audit_keeps_every_invariant():
    """After issue #10: no spills, no L1-invalidating fence in a squeeze, 128-bit NHWC accesses where C
    allows, conflict-free staging and >= MIN_WARPS_PER_SM warps/SM on every one of B0-B7's launches."""
    rows = _after_rows()
    assert len(rows) >= len(_before_rows()) * 0.9, "the committed audit covers fewer launches than the before one"
    assert {r["backend"] for r in rows} == {"triton", "cuda"}
    assert audit_invariant_violations(rows) == []


def test_committed_audit_covers_every_triton_launch_of_b0_to_b7():
    """Every B0-B7 workload (each op, batch 1 and 256, fp16/bf16/fp32, NHWC and NCHW) has its Triton row, and
    fits sm_90's shared memory: the full sweep that the live compile tests (tests/test_triton_*compile.py)
    sample; with the staleness test, a kernel change cannot land without these rows recompiled."""
    rows = _after_rows()
    have = {(r["op"], r["shape_class"], r["dtype"], r["layout"]) for r in rows if r["backend"] == "triton"}
    wls = network_workloads()
    assert {w.op for w in wls} == {"dwconv_bn_act", "se_gate", "se_excite", "pointwise_conv", "conv_bn_act"}
    assert {w.n for w in wls} == {1, 256} and {w.dtype for w in wls} == {"fp16", "bf16", "fp32"}
    missing = [w for w in wls if (w.op, w.shape_class, w.dtype, w.layout) not in have]
    assert not missing, f"{len(missing)} workloads without a Triton row, first {missing[0]}"
    for r in rows:
        smem = int(r["static_smem_B"] or 0) + int(r["dynamic_smem_B"] or 0)
        assert smem <= hardware.SMEM_PER_CTA, f"{r['kernel']} {r['shape_class']}: {smem} B shared"


def assert_audit_not_older_than_the_kernels(md_name: str, rerun: str) -> None:
    """The committed audit ``benchmarks/results/<md_name>`` records the commit its kernel sources are from;
    no audited source changed since (git; skipped without git history). ``rerun``: the command that
    regenerates it, named in the failure."""
    md = (ROOT / "benchmarks" / "results" / md_name).read_text()
    line = next(ln for ln in md.splitlines() if "kernel sources" in ln)
    commit = line.split("as of")[-1].strip().rstrip(".").split()[0]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "diff", "--stat", commit, "HEAD", "--", *AUDITED_SOURCES],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # a source tarball without git history
        pytest.skip(f"no git history to compare the audit's commit {commit} with: {exc}")
    assert out.strip() == "", f"kernel sources changed since the committed audit {md_name} ({commit}); rerun " \
                              f"{rerun}:\n{out}"


def test_committed_audit_is_not_older_than_the_kernels():
    """The audit records the commit its kernel sources are from; no audited source changed since (git)."""
    assert_audit_not_older_than_the_kernels("kernel_audit.md", "python -m benchmarks.kernel_audit")
