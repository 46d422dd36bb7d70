"""The real CUDA sources of ``csrc/`` run on the CPU through the host shim (no GPU needed).

``effnet_kernels.cuda_host`` compiles csrc/ (kernels, launchers, binding) with g++ against
``csrc/host_shim/ek_shim.h`` (threads as fibers, real barriers and warp exchanges) and puts
the result in place of the ``cuda`` backend's module, so ``ops.*(backend="cuda")`` on CPU
tensors runs the kernels through the whole op path. Checked here, by DESIGN's parity rule
against fp64 references, with outputs poisoned (NaN) before each call:

* dwconv_bn_act: every dtype x layout x k x stride x padding form, each activation, the
  vector and scalar NHWC paths, misaligned pointers, awkward shapes (C = 1, H = W = 1, H = 0,
  outputs inside the padding, unequal strides, two channel blocks), both squeeze reductions;
* se_gate (each inner activation and gate, mixed dtypes, partial sample tiles, two channel
  blocks, several hidden chunks) and se_excite (vector and scalar, misaligned, odd shapes);
* the grid-stride loops that take over beyond the grid limits, with fewer blocks served than
  asked (``set_grid_cap``), and a negative control that the cap is real;
* the shim itself: barriers, shuffles, votes, half/bfloat16 rounding against torch, launch
  errors, and that a missing barrier (in a test kernel and in the real kernels), a broken
  shuffle or a lost atomic make these checks fail (negative controls).

Threads run in a shuffled order between barriers (reseeded per launch), so a race shows.
"""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import cuda_host

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import (ACTIVATIONS, SE_VARIANTS, dwconv_plain, dwconv_truth, make_input, random_bn,
                              run_dwconv_case, se_plain, se_truth)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
FORWARD, REVERSE, SHUFFLED = 0, 1, 2
NO_SYNC, SHUFFLE_SELF, LOST_ATOMIC = 1, 2, 3  # ekshim::Defect


@pytest.fixture(scope="module")
def host():
    """The host build standing in for the cuda backend (threads shuffled between barriers)."""
    with cuda_host.as_cuda_backend() as mods:
        mods.shim.set_schedule(SHUFFLED, 12345)
        mods.shim.set_defect(0)
        yield mods
        mods.shim.set_defect(0)


def case(shape, k, stride, padding, dtype, layout, activation="silu", squeeze=True, weight_std=0.3):
    run_dwconv_case("cuda", "cpu", shape, k, stride, padding, dtype, layout, activation, squeeze, weight_std)


# ------------------------------------------------------------------ dwconv_bn_act
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwconv_k_stride_padding(host, dtype, layout):
    """k 3/5/7 x stride 1/2 x symmetric, none, asymmetric (TF same) and 4-sided padding."""
    for k in (3, 5, 7):
        for stride, padding in ((1, None), (2, 0), (2, (0, 1, 0, 1)), (1, (2, 1, 3, 0))):
            case((2, 12, 9, 11), k, stride, padding, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dwconv_activations(host, activation, dtype, layout):
    """Each activation instance, BN output over about [-8, 8], with and without the squeeze."""
    case((2, 16, 7, 9), 3, 1, None, dtype, layout, activation, squeeze=True, weight_std=1.0)
    case((1, 9, 6, 5), 5, 2, (1, 2, 2, 1), dtype, layout, activation, squeeze=False, weight_std=1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (2, 13, 1, 1), (1, 136, 6, 7), (3, 8, 4, 17), (1, 20, 2, 33)],
                         ids=str)
def test_dwconv_awkward_shapes(host, shape, dtype, layout):
    """C = 1, H = W = 1, C = 13 (scalar path), 136 (two channel blocks), 8 (one pack), long rows."""
    case(shape, 3, 1, None, dtype, layout)
    case(shape, 7, 2, (3, 3, 3, 3), dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv_unequal_strides_and_misaligned_input(host, layout):
    x = make_input((2, 16, 9, 8), torch.float16, layout, "cpu")
    flat = torch.randn(x.numel() + 2).half()[2:]  # data pointer 4 bytes past a 16-byte boundary
    xm = flat.view(2, 9, 8, 16).permute(0, 3, 1, 2) if layout == "channels_last" else flat.view(2, 16, 9, 8)
    assert xm.data_ptr() % 16 != 0
    for inp, stride in ((x, (2, 1)), (x, (1, 2)), (xm, 1)):
        c = inp.shape[1]
        weight = torch.randn(c, 1, 3, 3) * 0.3
        bn = random_bn(c)
        scale, shift = (t.detach().float() for t in ek.nn.fold_batchnorm(bn))
        y, mean = ek.ops.dwconv_bn_act(inp, weight, scale, shift, stride=stride, padding=1, squeeze=True, backend="cuda")
        y_ref, mean_ref = dwconv_truth(inp, weight, bn, stride, (1, 1, 1, 1))
        y_plain, mean_plain = dwconv_plain(inp, weight, scale, shift, stride, (1, 1, 1, 1))
        assert_parity(y, y_ref, y_plain, torch.float16, what="y")
        assert_parity(mean, mean_ref, mean_plain, torch.float16, what="mean")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwconv_deterministic_squeeze(host, dtype, layout):
    """The two-stage squeeze (partials + reduce_partials_kernel) and its bitwise reproducibility."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        case((2, 24, 13, 10), 5, 1, None, dtype, layout)
        x = make_input((2, 24, 13, 10), dtype, layout, "cpu")
        args = (x, torch.randn(24, 1, 3, 3), torch.rand(24) + 0.5, torch.randn(24))
        first = ek.ops.dwconv_bn_act(*args, squeeze=True, backend="cuda")[1]
        host.shim.set_schedule(REVERSE, 1)
        again = ek.ops.dwconv_bn_act(*args, squeeze=True, backend="cuda")[1]
        assert torch.equal(first, again)
    finally:
        host.shim.set_schedule(SHUFFLED, 12345)
        torch.use_deterministic_algorithms(prev)


# (n, c, h, w), k, stride, (left, right, top, bottom): shapes whose edges a kernel gets wrong first
ODD_CASES = [
    ((2, 13, 7, 9), 3, (1, 1), (1, 1, 1, 1)),     # C not a multiple of any pack, Wo % 4 != 0
    ((1, 1, 5, 6), 5, (2, 2), (2, 2, 2, 2)),      # C = 1
    ((2, 16, 1, 1), 3, (1, 1), (1, 1, 1, 1)),     # H = W = 1
    ((1, 24, 9, 8), 5, (2, 2), (1, 2, 1, 2)),     # TF-same asymmetric padding, stride 2
    ((1, 8, 6, 11), 7, (1, 2), (2, 1, 0, 3)),     # unequal strides, 4-sided padding, right halo
    ((1, 8, 4, 4), 3, (2, 1), (0, 0, 0, 0)),      # no padding at all
    ((1, 136, 3, 5), 3, (1, 1), (1, 1, 1, 1)),    # two channel blocks (16-bit: 128 + 8)
    ((1, 4, 2, 3), 3, (1, 1), (3, 0, 0, 4)),      # outputs entirely inside the padding
    ((2, 5, 0, 3), 3, (1, 1), (1, 1, 2, 1)),      # H = 0: padding alone covers the kernel
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k,stride,pad4", ODD_CASES,
                         ids=["x".join(map(str, c[0])) + f"-k{c[1]}s{c[2][0]}{c[2][1]}" for c in ODD_CASES])
def test_dwconv_odd_shapes(host, shape, k, stride, pad4, dtype, layout, deterministic):
    """Each odd shape with both squeeze reductions (the atomic one and partials + reduce_partials_kernel)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        case(shape, k, stride, pad4, dtype, layout)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv_loops_beyond_the_grid_limit(host, layout):
    """Launches served with 1 block along the strips and the batch (ekshim::set_grid_cap, standing in
    for the 65535 clamp of grid.y / grid.z): each block's strip and batch loops cover the rest.
    (3, 12, 30, 40) at stride 1 has 300 strips: NCHW 2 blocks of 256 along them, fp32 NHWC (3
    threads along C, 85 strips per block) 4, and 3 samples. Atomic squeeze only: the deterministic
    one has one partial row per launched grid.y, so a served grid smaller than the computed one
    leaves rows unwritten (its row count is checked against dwconv_shape in test_cuda_geometry.py)."""
    try:
        for cap in ((0, 1, 1), (0, 2, 2)):
            host.shim.set_grid_cap(*cap)
            case((3, 12, 30, 40), 3, 1, None, torch.float32, layout)
            case((3, 12, 30, 40), 5, 2, (1, 2, 1, 2), torch.float16, layout, activation="hardswish", weight_std=1.0)
    finally:
        host.shim.set_grid_cap(0, 0, 0)


# ------------------------------------------------------------------ se_gate, se_excite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_se_gate(host, activation, gate, dtype):
    for n, c, r in ((3, 37, 5), (1, 1, 1), (2, 96, 40)):
        pooled = torch.randn(n, c).to(dtype)
        wr, br = (torch.randn(r, c) / c**0.5).to(dtype), torch.randn(r).to(dtype)
        we, be = (torch.randn(c, r) / r**0.5).to(dtype), (torch.randn(c) * 3).to(dtype)
        out = ek.ops.se_gate(pooled, wr, br, we, be, activation=activation, gate=gate, backend="cuda")
        assert out.dtype == torch.float32 and tuple(out.shape) == (n, c)
        truth = se_truth(pooled, wr, br, we, be, activation, gate)
        assert_parity(out, truth, se_plain(pooled, wr, br, we, be, activation, gate), dtype, what="gate")


def se_gate_case(n, c, r, dtype=torch.float32, activation="silu", gate="sigmoid"):
    pooled = torch.randn(n, c).to(dtype)
    wr, br = (torch.randn(r, c) / c**0.5).to(dtype), torch.randn(r).to(dtype)
    we, be = (torch.randn(c, r) / r**0.5).to(dtype), (torch.randn(c) * 3).to(dtype)
    out = ek.ops.se_gate(pooled, wr, br, we, be, activation=activation, gate=gate, backend="cuda")
    truth = se_truth(pooled, wr, br, we, be, activation, gate)
    assert_parity(out, truth, se_plain(pooled, wr, br, we, be, activation, gate), dtype, what="gate")


@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
@pytest.mark.parametrize("n,c,r", [(17, 300, 3), (1, 9, 260), (9, 40, 520), (8, 256, 31), (20, 33, 257)], ids=str)
def test_se_gate_tiles_channel_blocks_and_hidden_chunks(host, n, c, r, activation, gate):
    """N = 17 / 20 leave a partial sample tile (8 samples), C = 300 two channel blocks of 256,
    R = 260 / 257 / 520 two and three hidden chunks of 256 (the last one short), R = 31 a dense
    staging of 8 rows that do not fill whole warps."""
    se_gate_case(n, c, r, torch.float32, activation, gate)
    se_gate_case(n, c, r, torch.float16, activation, gate)


def test_se_gate_loops_beyond_the_grid_limit(host):
    """se_reduce_kernel's warp loop (blocks_for caps grid.x at 2^20) and se_expand_kernel's tile
    loop (grid.y clamped at 65535) with 1 and 3 blocks served (ekshim::set_grid_cap); C <= 256, so
    se_expand's grid.x (one block per 256 channels, not a loop) is 1 anyway."""
    try:
        for cap in ((1, 1, 0), (3, 2, 0)):
            host.shim.set_grid_cap(*cap)
            se_gate_case(17, 37, 6)
            se_gate_case(33, 200, 260, activation="relu", gate="hardsigmoid")
    finally:
        host.shim.set_grid_cap(0, 0, 0)


def test_se_gate_mixed_dtypes(host):
    """fp16 pooled with fp32 weights, and weights of different dtypes (read as fp32)."""
    pooled = torch.randn(2, 40).half()
    wr, br, we, be = torch.randn(8, 40) / 6, torch.randn(8), torch.randn(40, 8) / 3, torch.randn(40)
    out = ek.ops.se_gate(pooled, wr, br.half(), we, be, backend="cuda")
    truth = se_truth(pooled, wr, br.half(), we, be)
    assert_parity(out, truth, None, torch.float32, what="gate")


@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [(7, 7), (4, 4), (1, 3)], ids=str)
def test_se_excite(host, hw, dtype, layout):
    """Vector path (HW or C a multiple of the pack) and the scalar fallback."""
    for c in (16, 13):
        y = make_input((2, c, *hw), dtype, layout, "cpu")
        gate = torch.rand(2, c)
        out = ek.ops.se_excite(y, gate, backend="cuda")
        truth = y.double() * gate.double()[:, :, None, None]
        assert_parity(out, truth, (y * gate.to(dtype)[:, :, None, None]), dtype, what="excite")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (3, 24, 3, 5), (1, 8, 14, 14), (1, 3, 3, 3), (2, 16, 1, 1)], ids=str)
def test_se_excite_odd_shapes_misaligned_and_grid_loop(host, shape, dtype, layout):
    """Odd shapes; y 4 bytes past a 16-byte boundary (the scalar path); 2 blocks served (grid-stride)."""
    n, c, h, w = shape
    gate = torch.rand(n, c)
    flat = torch.randn(n * c * h * w + 2).to(dtype)[2:]
    ym = flat.view(n, h, w, c).permute(0, 3, 1, 2) if layout == "channels_last" else flat.view(n, c, h, w)
    assert ym.data_ptr() % 16 != 0
    try:
        for cap in (0, 2):
            host.shim.set_grid_cap(cap, 0, 0)
            for y in (make_input(shape, dtype, layout, "cpu"), ym):
                out = ek.ops.se_excite(y, gate, backend="cuda")
                truth = y.double() * gate.double()[:, :, None, None]
                assert_parity(out, truth, (y * gate.to(dtype)[:, :, None, None]), dtype, what="excite")
    finally:
        host.shim.set_grid_cap(0, 0, 0)


# ------------------------------------------------------------------ negative controls
@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "squeeze_skew"])
def test_negative_control_dwconv_check_rejects_defect(host, defect):
    args = ((3, 13, 9, 8), 3, 2, (0, 1, 0, 1), torch.float16, "channels_last")
    case(*args)
    with planted(defect, "cuda"), pytest.raises(AssertionError):
        case(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_negative_control_missing_barrier_in_real_kernels(host, layout):
    """__syncthreads made a no-op: the NHWC weight staging / the squeeze sums race and fail."""
    args = ((2, 16, 9, 8), 3, 1, None, torch.float32, layout)
    case(*args)
    host.shim.set_defect(NO_SYNC)
    try:
        with pytest.raises(AssertionError):
            case(*args)
    finally:
        host.shim.set_defect(0)


@pytest.mark.parametrize("defect", [SHUFFLE_SELF, LOST_ATOMIC])
def test_negative_control_broken_machine(host, defect):
    """A shuffle that returns the lane's own value breaks se_gate; a lost atomic the squeeze."""
    pooled, wr, br, we, be = torch.randn(2, 40), torch.randn(8, 40) / 6, torch.randn(8), torch.randn(40, 8) / 3, torch.randn(40)

    def check():
        test_se_gate_mixed_dtypes(host) if defect == SHUFFLE_SELF else case((2, 16, 6, 6), 3, 1, None, torch.float32, "nchw")
        out = ek.ops.se_gate(pooled, wr, br, we, be, backend="cuda")
        assert_parity(out, se_truth(pooled, wr, br, we, be), None, torch.float32, what="gate")

    check()
    host.shim.set_defect(defect)
    try:
        with pytest.raises(AssertionError):
            check()
    finally:
        host.shim.set_defect(0)


def test_negative_control_grid_cap_serves_fewer_blocks(host):
    """The cap is real: capping a dimension the kernel does not loop over (grid.x, the channel
    blocks of NHWC dwconv and se_expand) leaves outputs unwritten, and the checks fail."""
    try:
        host.shim.set_grid_cap(1, 0, 0)
        with pytest.raises(AssertionError):
            case((1, 136, 3, 5), 3, 1, None, torch.float16, "channels_last")
        with pytest.raises(AssertionError):
            se_gate_case(3, 300, 5)
    finally:
        host.shim.set_grid_cap(0, 0, 0)
    case((1, 136, 3, 5), 3, 1, None, torch.float16, "channels_last")
    se_gate_case(3, 300, 5)


def test_negative_control_write_outside_an_output_is_caught(host):
    """The canaries around every output: a write one element past the end fails the call."""

    def overrun():
        y = cuda_host._guarded(torch.empty(2, 3, 4, 5), "y", poison=True)
        y.as_strided((1,), (1,), y.storage_offset() + y.numel()).fill_(0.0)
        return y

    with pytest.raises(AssertionError, match="outside its output 'y'"):
        cuda_host._checked(overrun)()


# ------------------------------------------------------------------ the shim itself
@pytest.mark.parametrize("dynamic", [False, True], ids=["static_smem", "dynamic_smem"])
def test_block_reduction_through_shared_memory(host, dynamic):
    """With barriers: exact in every order. Without: wrong in forward and shuffled order (reverse
    order happens to be sequentially consistent for this tree)."""
    n, threads = 1000, 256
    x = torch.randint(-50, 50, (n,)).float()
    want = torch.stack([c.sum() for c in x.split(threads)])
    try:
        for mode in (FORWARD, REVERSE, SHUFFLED):
            host.shim.set_schedule(mode, 7)
            out = torch.full((4,), float("nan"))
            assert host.shim.block_sum(x.data_ptr(), out.data_ptr(), n, threads, dynamic, True) is None
            assert torch.equal(out, want), mode
        for mode in (FORWARD, SHUFFLED):
            host.shim.set_schedule(mode, 7)
            out = torch.full((4,), float("nan"))
            assert host.shim.block_sum(x.data_ptr(), out.data_ptr(), n, threads, dynamic, False) is None
            assert not torch.equal(out, want), mode
    finally:
        host.shim.set_schedule(SHUFFLED, 12345)


@pytest.mark.parametrize("threads", [64, 96, 256])
def test_shuffles_ballot_and_syncthreads_count(host, threads):
    out = torch.full((7 * threads,), -1, dtype=torch.int32)
    launches, barriers = host.shim.counters()
    assert host.shim.shuffles(out.data_ptr(), threads) is None
    assert host.shim.counters()[0] == launches + 1 and host.shim.counters()[1] > barriers
    tid = torch.arange(threads)
    lane, warp = tid % 32, tid // 32
    v = 100 * warp + lane

    def at(src_lane):
        return 100 * warp + src_lane

    got = out.view(7, threads)
    assert torch.equal(got[0], at(torch.full_like(lane, 3)).int())
    assert torch.equal(got[1], at(lane ^ 5).int())
    assert torch.equal(got[2], torch.where(lane + 4 < 32, at(lane + 4), v).int())
    assert torch.equal(got[3], torch.where(lane >= 2, at(lane - 2), v).int())
    assert torch.equal(got[4], at(lane ^ 1).int())  # width 8: xor 1 stays inside the segment
    ballot = sum(1 << i for i in range(32) if i % 2 == 1)
    assert torch.equal(got[5], torch.full((threads,), ballot - 2**32 if ballot >= 2**31 else ballot).int())
    assert torch.equal(got[6], torch.full((threads,), (threads + 2) // 3).int())


def test_warp_op_with_exited_lanes_and_deadlock_are_errors(host):
    out = torch.zeros(64)
    assert "exited" in host.shim.exited_lane(out.data_ptr())
    assert "deadlock" in host.shim.deadlock(out.data_ptr())
    # the machine is usable afterwards
    assert host.shim.shuffles(torch.zeros(7 * 32, dtype=torch.int32).data_ptr(), 32) is None


@pytest.mark.parametrize("kind,message", [(0, "invalid configuration"), (1, "invalid configuration"),
                                          (2, "invalid argument"), (3, "misaligned address"), (4, None)])
def test_invalid_launches_fail_as_on_a_gpu(host, kind, message):
    buf = torch.zeros(64)
    assert buf.data_ptr() % 16 == 0
    err = host.shim.bad_launch(kind, buf.data_ptr())
    assert err is None if message is None else message in err


def test_half_and_bfloat16_rounding_match_torch(host):
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    back = torch.empty(halves.shape, dtype=torch.float32)
    host.shim.half_to_float(halves.data_ptr(), back.data_ptr(), halves.numel())
    assert torch.equal(back.isnan(), halves.float().isnan())
    ok = ~back.isnan()
    assert torch.equal(back[ok], halves.float()[ok])
    # random floats over the whole half range, ties, subnormals, overflow and specials
    f = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)).float(),
                   (halves.float()[ok][:-1] + halves.float()[ok][1:]) / 2,  # exact ties between neighbours
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 5.96e-8, 2.98e-8, 2.99e-8,
                                 float("inf"), -float("inf")])])
    f = f[torch.isfinite(f) | f.isinf()]
    h = torch.empty(f.shape, dtype=torch.float16)
    host.shim.float_to_half(f.data_ptr(), h.data_ptr(), f.numel())
    assert torch.equal(h.view(torch.int16), f.half().view(torch.int16))
    b = torch.empty(f.shape, dtype=torch.bfloat16)
    host.shim.float_to_bf16(f.data_ptr(), b.data_ptr(), f.numel())
    assert torch.equal(b.view(torch.int16), f.bfloat16().view(torch.int16))


def test_build_is_cached_by_source_hash(host):
    assert cuda_host.build() == host.path  # no rebuild: the same file
    assert host.C.build_info()["archs"] == "host"


def test_rewrite_touches_only_launches_and_shared_declarations():
    from effnet_kernels._host_rewrite import RewriteError, rewrite

    src = ("ns::k<T, Foo<int>><<<dim3(g, 2),\n    kThreads, s.smem, stream>>>(p,\n q);\n"
           "plain<<<1, 32>>>();\nint a = b < c && d > e;\n"
           "extern __shared__ __align__(16) unsigned char raw[];\n__shared__ float tile[4][33];\n"
           "__shared__ __align__(16) float h_s[8 * 256];\n")
    out = rewrite(src, "x.cu")
    assert out.count("\n") == src.count("\n") + 1  # one #line, every other line where it was
    assert "::ekshim::launch(ns::k<T, Foo<int>>, ::ekshim::LaunchCfg(dim3(g, 2),\n    kThreads, s.smem, stream), p,\n q);" in out
    assert "::ekshim::launch(plain, ::ekshim::LaunchCfg(1, 32));" in out
    assert "int a = b < c && d > e;" in out
    assert "unsigned char* raw = ::ekshim::dynamic_smem<unsigned char>();" in out
    assert "float (&tile)[4][33] = ::ekshim::static_smem<float[4][33]>(&ek_smem_site_1);" in out
    assert "float (&h_s)[8*256] = ::ekshim::static_smem<float[8*256]>(&ek_smem_site_2, 16);" in out
    with pytest.raises(RewriteError, match="line 1"):
        rewrite("k<<<1, 2>>>;\n", "y.cu")
