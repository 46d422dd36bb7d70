"""The Triton ``dwconv_bn_act`` kernel on CPU tensors, in Triton's interpreter.

Parity against the independent fp64 nn-module references of ``test_ops_parity`` over
op x dtype x kernel x stride x padding x layout at tiny shapes, awkward shapes, both
squeeze reductions (atomic and the deterministic two-stage one), several tiles and
channel blocks, the 64-bit offset variant, and ``opcheck``. The interpreter runs one
fixed config (no tuning); tests that need many tiles shrink it.
"""

from __future__ import annotations


import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import backends

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import LAYOUTS, dwconv_truth, run_dwconv_case

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from effnet_kernels.ops._checks import ACT_CODES  # noqa: E402
from effnet_kernels.triton._activation import activate  # noqa: E402
from effnet_kernels.triton._jit import device_kernel  # noqa: E402

from .environments import triton_interpreted  # noqa: E402
from .test_ops_parity import ACT_F  # noqa: E402

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """``TRITON_INTERPRET=1`` for this module only (lets the triton backend take CPU tensors).

    The kernels choose compiled vs interpreted per launch (see ``effnet_kernels.triton._jit``),
    so the variable can be set late: triton itself was imported at collection
    (``importorskip`` above) in compiled mode, which later GPU tests and torch.compile's
    own Triton kernels need, and the variable is restored afterwards.
    """
    with triton_interpreted():
        yield


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the interpreter's config so tiny shapes span several tiles and channel blocks."""
    from effnet_kernels.triton import _tuning, dwconv

    cfg = _tuning.Config(block_a=16, block_b=8)
    monkeypatch.setattr(dwconv, "INTERPRETER_CONFIG", cfg)
    return cfg


@pytest.fixture
def tile_sums(monkeypatch):
    """Count launches of the deterministic squeeze's second stage (the per-tile sum)."""
    from effnet_kernels.triton import dwconv

    launches = []
    real = dwconv._sum_tiles_kernel

    class Spy:
        def on(self, t):
            launches.append(t.device)
            return real.on(t)

    monkeypatch.setattr(dwconv, "_sum_tiles_kernel", Spy())
    return launches


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The outputs the Triton launchers allocate (dwconv's y, se_excite's out) start as NaN, so an
    element a kernel fails to write (a vector store masked too far) fails the parity check."""
    from effnet_kernels.triton import dwconv, se_excite

    def poisoning(module, name, attr):
        real = getattr(module, name)

        def prepare(*args):
            lp = real(*args)
            getattr(lp, attr).fill_(float("nan"))
            return lp

        monkeypatch.setattr(module, name, prepare)

    poisoning(dwconv, "prepare_dwconv", "y")
    poisoning(se_excite, "prepare_se_excite", "out")


def asym_padding(k: int) -> tuple[int, int, int, int]:
    """A 4-sided padding (left, right, top, bottom) with four different sides."""
    p = k // 2
    return (p, p + 1, max(p - 1, 0), p + 2)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad", ["same", "asym"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_parity_grid(k, stride, pad, dtype, layout):
    padding = None if pad == "same" else asym_padding(k)
    run_dwconv_case("triton", "cpu", (1, 13, 9, 8), k, stride, padding, dtype, layout, "silu", squeeze=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,k,stride,padding",
    [((1, 1, 5, 7), 5, 2, None), ((2, 4, 1, 1), 3, 2, None), ((2, 4, 1, 1), 7, 1, None),
     ((1, 3, 7, 4), 3, (1, 2), (0, 1, 0, 1)), ((1, 24, 6, 5), 3, 1, (0, 0, 0, 0))],
    ids=["C1", "1x1-s2", "1x1-k7", "stride-pair-tf-same", "no-padding"],
)
def test_awkward_shapes(shape, k, stride, padding, dtype):
    for layout in LAYOUTS:
        act_and_squeeze = layout != "channels_last"  # each layout once, identity/SiLU and squeeze both ways
        run_dwconv_case("triton", "cpu", shape, k, stride, padding, dtype, layout,
                        "silu" if act_and_squeeze else "identity", act_and_squeeze)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "hardswish"])
def test_activations(activation, dtype):
    """Each activation's constexpr variant over all its regions (BN output over about [-8, 8]), both layouts."""
    for layout, stride, padding in (("channels_last", 1, None), ("nchw", 2, (0, 1, 0, 1))):
        run_dwconv_case("triton", "cpu", (1, 13, 7, 6), 3, stride, padding, dtype, layout, activation, True,
                        weight_std=1.0)


@device_kernel
def _apply_activation(u_ptr, o_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < N
    tl.store(o_ptr + i, activate(tl.load(u_ptr + i, mask=ok, other=0.0), ACT), mask=ok)


def test_negative_control_activation_check_rejects_skipped_activation():
    with planted("skip_silu", "triton"), pytest.raises(AssertionError, match="y: "):
        test_activations("relu6", torch.float32)


def test_activation_codes_match_pytorch():
    """activate(u, code) for every code of ACT_CODES equals PyTorch's function (fp32, NaN kept)."""
    u = torch.cat([torch.linspace(-9, 9, 181), torch.tensor([-3.0, 3.0, 0.0, 6.0, float("nan")])])
    for name, code in ACT_CODES.items():
        out = torch.empty_like(u)
        _apply_activation.on(u)[(1,)](u, out, u.numel(), ACT=code, BLOCK=256)
        torch.testing.assert_close(out, ACT_F[name](u), rtol=1e-6, atol=1e-7, equal_nan=True, msg=name)


@pytest.mark.parametrize("squeeze", [False, True])
def test_empty_batch(squeeze):
    x = torch.randn(0, 8, 6, 6).contiguous(memory_format=CL)
    w, s, b = torch.randn(8, 1, 3, 3), torch.rand(8) + 0.5, torch.randn(8)
    out = ek.ops.dwconv_bn_act(x, w, s, b, stride=2, squeeze=squeeze, backend="triton")
    y = out[0] if squeeze else out
    assert tuple(y.shape) == (0, 8, 3, 3)
    if squeeze:
        assert tuple(out[1].shape) == (0, 8) and out[1].dtype == torch.float32


def test_large_batch():
    """Samples are folded into grid axis 0 with the tiles: many samples, several tiles each."""
    run_dwconv_case("triton", "cpu", (19, 3, 5, 5), 3, 1, None, torch.float16, "channels_last", "silu", True)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_several_tiles_and_channel_blocks(small_tiles, tile_sums, layout, deterministic):
    """C = 10 over blocks of 8, 36 and 25 output pixels over tiles of 16: masks, atomics, two-stage sum."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for hw, stride in ((6, 1), (9, 2)):
            run_dwconv_case("triton", "cpu", (2, 10, hw, hw), 3, stride, asym_padding(3), torch.float32, layout,
                            "silu", squeeze=True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert len(tile_sums) == (2 if deterministic else 0)


def test_deterministic_squeeze_is_bitwise_reproducible(small_tiles, tile_sums):
    """19 tiles of 16 pixels per sample: the second stage loops over more than one block of tiles."""
    x = torch.randn(2, 5, 17, 17).contiguous(memory_format=CL)
    w, s, b = torch.randn(5, 1, 3, 3), torch.rand(5) + 0.5, torch.randn(5)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="triton") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert len(tile_sums) == 2, "the two-stage reduction did not run"
    (y0, m0), (y1, m1) = runs
    assert torch.equal(m0, m1) and torch.equal(y0, y1)
    y_ref, m_ref = dwconv_truth_from_scale(x, w, s, b)
    assert_parity(m0, m_ref, None, torch.float32, what="mean")
    assert_parity(y0, y_ref, None, torch.float32, what="y")


def dwconv_truth_from_scale(x, w, scale, shift, stride=1, padding=None):
    """fp64 truth for an already-folded (scale, shift), via a BatchNorm2d that reproduces them."""
    c, k = x.shape[1], w.shape[-1]
    bn = torch.nn.BatchNorm2d(c, eps=0.0).double().eval()
    with torch.no_grad():
        bn.running_var.fill_(1.0)
        bn.running_mean.zero_()
        bn.weight.copy_(scale.double())
        bn.bias.copy_(shift.double())
    pad4 = (k // 2,) * 4 if padding is None else padding
    return dwconv_truth(x, w, bn, stride, pad4, "silu")


# C with 16-byte pixels that Triton's divisibility-16 specialisation does not see (24, 40, 56: B1-B6),
# C = 12 and 20 (8-byte vectors in fp16) and C = 13 (none): the kernel's VEC and, in the 8-pixel x
# 32-channel single-warp tile, the weights and shift loaded in the tile's layout (WEIGHT_TILE)
CHANNEL_VECTOR_CASES = [24, 40, 56, 12, 20, 13]


@pytest.mark.parametrize("tile", ["default", "weight-tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CHANNEL_VECTOR_CASES)
def test_channel_vector_widths(poisoned_outputs, monkeypatch, c, dtype, tile):
    """channels_last (and a strided view, which the launcher copies) at C not a multiple of 16, every
    output poisoned first; k5 s2 with asymmetric padding: halo masks on every side."""
    from effnet_kernels.triton import _tuning, dwconv

    if tile == "weight-tile":
        cfg = _tuning.Config(block_a=8, block_b=32, num_warps=1)
        monkeypatch.setattr(dwconv, "INTERPRETER_CONFIG", cfg)
    for layout in ("channels_last", "strided"):
        run_dwconv_case("triton", "cpu", (2, c, 7, 6), 5 if layout == "channels_last" else 3, 2,
                        asym_padding(5) if layout == "channels_last" else None, dtype, layout, "silu", True)


def test_negative_control_wrong_channel_vector_is_caught(poisoned_outputs, monkeypatch):
    """A VEC that does not divide C (16 for C = 24) rounds C down in the kernel: channels 16-23 stay
    unwritten (NaN from the poisoning), which the check above must reject."""
    from effnet_kernels.triton import dwconv

    run_dwconv_case("triton", "cpu", (2, 24, 7, 6), 3, 1, None, torch.float32, "channels_last", "silu", True)  # clean
    monkeypatch.setattr(dwconv, "channel_vector", lambda lp: 16)
    with pytest.raises(AssertionError):
        run_dwconv_case("triton", "cpu", (2, 24, 7, 6), 3, 1, None, torch.float32, "channels_last", "silu", True)


@pytest.mark.parametrize(
    "c,dtype,vec",
    [(24, torch.float16, 8), (40, torch.bfloat16, 8), (56, torch.float32, 4), (144, torch.float16, 8),
     (12, torch.float16, 4), (20, torch.float32, 4), (13, torch.float16, 1), (1, torch.float32, 1),
     (6, torch.float32, 2)],
)
def test_channel_vector_choice(c, dtype, vec):
    """VEC divides C and the pixel strides, at most 16 bytes; NCHW (taps shift W by one element) gets 1."""
    from effnet_kernels._launch import prepare_dwconv
    from effnet_kernels.triton import _tuning, dwconv

    for layout, expect in (("channels_last", vec), ("nchw", 1)):
        x = torch.empty(2, c, 9, 9, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=CL)
        lp = prepare_dwconv(x, torch.empty(c, 1, 3, 3), torch.empty(c), torch.empty(c), (1, 1), (1, 1, 1, 1),
                            "silu", True)
        assert dwconv.channel_vector(lp) == expect, layout
        # weights in the tile's layout only where a channel row has at least as many elements as threads
        assert dwconv.weight_tile(lp, _tuning.Config(8, 64, 2)) == (lp.layout == "nhwc")  # C = 1: NCHW
        assert not dwconv.weight_tile(lp, _tuning.Config(64, 64, 4))


def test_int64_offsets_variant(monkeypatch):
    """The 64-bit-offset specialisation computes the same thing (forced on a small tensor)."""
    from effnet_kernels.triton import dwconv

    real = dwconv.prepare_dwconv

    def forced(*args):
        lp = real(*args)
        lp.int64 = True
        return lp

    monkeypatch.setattr(dwconv, "prepare_dwconv", forced)
    for layout in ("nchw", "channels_last"):
        run_dwconv_case("triton", "cpu", (2, 13, 9, 8), 3, 2, (0, 1, 0, 1), torch.bfloat16, layout, "hardswish", True)


def test_b0_sized_channels():
    """B0's widest depthwise layer (C = 1152, k = 3, 7 x 7) exercises many channel blocks."""
    run_dwconv_case("triton", "cpu", (1, 1152, 7, 7), 3, 1, None, torch.float16, "channels_last", "silu", True)


def test_output_keeps_memory_format_and_has_no_nans():
    for x in (torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7).contiguous(memory_format=CL),
              torch.randn(2, 7, 6, 12)[:, :6, :5, ::2]):
        w, s, b = torch.randn(6, 1, 3, 3), torch.rand(6) + 0.5, torch.randn(6)
        y = ek.ops.dwconv_bn_act(x, w, s, b, backend="triton")
        assert y.is_contiguous(memory_format=ek.ops._checks.memory_format_of(x))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout, squeeze):
    x = torch.randn(2, 6, 7, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    args = (x, torch.randn(6, 1, 3, 3, requires_grad=True), torch.rand(6) + 0.5, torch.randn(6),
            [2, 1], [1, 0, 2, 1], "relu6" if squeeze else "silu", squeeze, "triton")
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act.default, args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    backends._reset_caches()
    try:
        x, w, s, b = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.rand(4) + 0.5, torch.randn(4)
        with pytest.raises(ek.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            ek.ops.dwconv_bn_act(x, w, s, b, backend="triton")
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backends._reset_caches()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-stage"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_gpu_candidate_config(monkeypatch, layout, deterministic):
    """Each config of the GPU tuning space computes the right thing (here in the interpreter).

    C = 72 and 13 x 13 = 169 output pixels are multiples of no BLOCK_C / BLOCK_P in the
    space (masks on both axes; several tiles per sample, so the atomic or two-stage squeeze).
    """
    from effnet_kernels._launch import prepare_dwconv
    from effnet_kernels.triton import _tuning, dwconv

    x = torch.empty(32, 72, 13, 13)  # the space at a batch that fills the GPU (batch 1 shrinks the tiles)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    lp = prepare_dwconv(x, torch.empty(72, 1, 3, 3), torch.empty(72), torch.empty(72), (1, 1), (1, 1, 1, 1), "silu", True)
    candidates = dwconv._candidates(lp)
    assert len(candidates) == (5 if layout == "channels_last" else 4), "the clamp must not shrink this space"
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for cfg in candidates:
            monkeypatch.setattr(_tuning, "choose", lambda *args, cfg=cfg: cfg)
            run_dwconv_case("triton", "cpu", (1, 72, 13, 13), 3, 1, None, torch.float16, layout, "silu", True)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_tap_major_weight_is_prepared_once_and_never_stale(monkeypatch):
    """The folded [k*k, C] weight is made once per (weight, scale) and remade after any in-place edit."""
    from effnet_kernels.triton import _weights

    _weights.clear_cache()
    folds = []
    real = _weights.fold_tap_major
    monkeypatch.setattr(_weights, "fold_tap_major", lambda w, s: folds.append(1) or real(w, s))
    x = torch.randn(2, 24, 7, 6).contiguous(memory_format=CL)
    w, s, b = torch.randn(24, 1, 5, 5), torch.rand(24) + 0.5, torch.randn(24)

    def check():
        y = ek.ops.dwconv_bn_act(x, w, s, b, backend="triton")
        torch.testing.assert_close(y, ek.ops.dwconv_bn_act(x, w, s, b, backend="torch"), rtol=1e-5, atol=1e-5)

    check()
    check()
    assert len(folds) == 1, "a second call with the same tensors re-folded the weight"
    with torch.no_grad():
        w.mul_(-2.0)
    check()
    with torch.no_grad():
        s[3] = 7.0
    check()
    assert len(folds) == 3
    w2 = w.clone()  # equal values, another tensor: never served from w's entry by address
    y2 = ek.ops.dwconv_bn_act(x, w2, s, b, backend="triton")
    assert len(folds) == 4 and torch.isfinite(y2).all()


def test_negative_control_stale_weight_cache_is_caught(monkeypatch):
    """A cache that ignores the version counter serves the pre-edit weight: the check above must fail."""
    from effnet_kernels.triton import _weights

    monkeypatch.setattr(_weights, "_key", lambda t: (t.data_ptr(), t.dtype, t.device, tuple(t.shape)))
    with pytest.raises(AssertionError):
        test_tap_major_weight_is_prepared_once_and_never_stale(monkeypatch)
