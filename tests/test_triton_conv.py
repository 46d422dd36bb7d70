"""The Triton ``conv_bn_act`` kernel (the stem, issue #12) on CPU tensors, in Triton's interpreter.

Parity against the fp64 ``F.conv2d`` truth of ``test_ops_conv_bn_act`` by the DESIGN rule
(``plain`` = the same in the input's dtype), every output poisoned with NaN before the
kernel runs: dtype x layout (NCHW, channels_last, a non-contiguous view) x k x stride with
asymmetric (TF "same") padding, awkward shapes (Cin 1/3/5, Cout 1/7/33, H = W = 1, odd
sizes, N = 0/1), several pixel tiles / channel blocks / K chunks, each activation, bias
None / float32 / x's dtype, float32 (and float64, strided) weights with 16-bit x, the 64-bit
offset variant, every GPU candidate config, opcheck, and negative controls (a one-pixel
padding shift, a store vector width that does not divide Cout) that the check must reject.
"""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import ops
from effnet_kernels.ops._checks import ACTIVATIONS

from .defects import planted
from .parity import assert_parity
from .test_ops_conv_bn_act import plain, truth
from .test_ops_parity import make_input
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (module-scoped TRITON_INTERPRET=1)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
CL = torch.channels_last
TF_SAME = (0, 1, 0, 1)  # (left, right, top, bottom): the extra pixel right and bottom


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    """The launcher's output starts as NaN, so an element the kernel fails to write fails the parity check."""
    from effnet_kernels.triton import conv

    real = conv.prepare_conv

    def prepare(*args):
        lp = real(*args)
        lp.y.fill_(float("nan"))
        return lp

    monkeypatch.setattr(conv, "prepare_conv", prepare)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-pixel x 16-channel tiles: tiny shapes span several pixel tiles and channel blocks."""
    from effnet_kernels.triton import _tuning, conv

    monkeypatch.setattr(conv, "INTERPRETER_CONFIG", _tuning.Config(block_a=16, block_b=16, num_warps=1))


def run_case(shape, cout, k, stride, padding, dtype, layout="nchw", activation="silu", bias="fp32",
             weight_dtype=None, weight_std=1.0, weight_view=False):
    """One triton call against the fp64 truth. ``bias``: "fp32", "x" (x's dtype), "strided" (an fp32 view
    of every other element) or None; ``weight_dtype``: the weight's own dtype (default x's); ``weight_view``:
    a non-contiguous weight."""
    n, cin, h, w = shape
    x = make_input(shape, dtype, layout, "cpu")
    wdt = weight_dtype or dtype
    weight = (torch.randn(cout, cin, k, k, dtype=torch.float64) * weight_std / (cin * k * k) ** 0.5).to(wdt)
    if weight_view:
        weight = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [Cout, Cin, k, k], Cin fastest
        assert not weight.is_contiguous()
    if bias == "strided":
        b = torch.randn(2 * cout)[::2]
    else:
        b = None if bias is None else torch.randn(cout).to(torch.float32 if bias == "fp32" else dtype)
    out = ops.conv_bn_act(x, weight, b, stride=stride, padding=padding, activation=activation, backend="triton")
    from effnet_kernels.ops._checks import memory_format_of, normalize_padding, normalize_stride

    pad4 = normalize_padding(padding, k)
    st = normalize_stride(stride)
    want = truth(x, weight, b, st, pad4, activation)
    assert out.dtype == dtype and out.shape == want.shape
    assert out.is_contiguous(memory_format=memory_format_of(x))
    assert_parity(out, want, plain(x, weight, b, st, pad4, activation), dtype, what="y")
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,padding", [(3, 2, TF_SAME), (3, 2, None), (3, 1, (1, 0, 2, 1))],
                         ids=["s2-tf-same", "s2-pad1", "s1-asym"])
def test_stem_grid(k, stride, padding, dtype, layout):
    """The stem (Cin 3, k3) at a small odd size, Cout 33: two channel blocks of the 32-wide BLOCK_N."""
    run_case((2, 3, 9, 11), 33, k, stride, padding, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, (0, 0, 0, 0)), (5, 2, (1, 2, 2, 1)), (7, 1, None),
                                              (7, 2, (2, 4, 3, 3))])
def test_kernel_sizes(k, stride, padding, dtype):
    """k 1/5/7 with Cin 5: K = 5 k^2 up to 245, i.e. several K chunks of 32 with a masked tail."""
    for layout in ("nchw", "channels_last"):
        run_case((1, 5, 10, 9), 7, k, stride, padding, dtype, layout, activation="relu6")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,cout,k,stride,padding",
    [((1, 1, 1, 1), 1, 3, 1, None), ((2, 3, 1, 1), 7, 3, 2, None), ((1, 1, 7, 5), 33, 3, 2, TF_SAME),
     ((2, 5, 3, 2), 1, 3, 1, (1, 1, 0, 2)), ((1, 3, 13, 1), 7, 3, (2, 1), (1, 1, 1, 1)),
     ((1, 64, 4, 5), 16, 3, (1, 2), TF_SAME)],
    ids=["1x1-C1-Cout1", "1x1-s2-Cout7", "Cin1-Cout33", "Cout1", "W1-stride-pair", "Cin64"],
)
def test_awkward_shapes(small_tiles, shape, cout, k, stride, padding, dtype):
    for layout in LAYOUTS if shape[2] * shape[3] > 1 else LAYOUTS[:2]:  # a 1 x 1 view is always contiguous
        run_case(shape, cout, k, stride, padding, dtype, layout, bias="x" if layout == "strided" else "fp32")


def test_several_tiles_and_channel_blocks(small_tiles):
    """Output pixels over 16-pixel tiles (masked last tiles: 9 x 8 = 72, 7 x 5 = 35), Cout 33 over 16-channel
    blocks (a masked last block of one channel), stride 1 and 2."""
    run_case((2, 3, 9, 8), 33, 3, 1, None, torch.float32, "nchw")
    run_case((2, 3, 13, 10), 33, 3, 2, TF_SAME, torch.bfloat16, "channels_last")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation):
    """Each activation's constexpr variant over all its regions (pre-activation values over about [-8, 8])."""
    for dtype in DTYPES:
        run_case((1, 3, 9, 8), 16, 3, 2, TF_SAME, dtype, "channels_last", activation, weight_std=3.0)
        run_case((1, 3, 8, 9), 8, 3, 1, None, dtype, "nchw", activation, bias=None, weight_std=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "fp32", "x", "strided"])
def test_bias_variants(bias, dtype):
    run_case((2, 3, 7, 6), 12, 3, 2, TF_SAME, dtype, "channels_last", bias=bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weight_with_16_bit_x(dtype):
    """An autocast-style fp32 weight is used in x's dtype, as the reference uses it; also a strided one."""
    for layout, view in (("nchw", False), ("channels_last", True)):
        run_case((2, 3, 9, 9), 32, 3, 2, TF_SAME, dtype, layout, weight_dtype=torch.float32, weight_view=view)


def test_fp64_weight_is_refused_by_the_backend_and_cast_by_the_launcher():
    """The triton backend refuses float64 arguments at dispatch (with the reason); the launcher itself casts
    a float64 weight to x's dtype like any other."""
    from effnet_kernels.triton import conv

    x = torch.randn(1, 3, 9, 9).half()
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64) / 5
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        ops.conv_bn_act(x, w, None, stride=2, padding=TF_SAME, backend="triton")
    out = conv.conv_bn_act(x, w, None, (2, 2), TF_SAME, "silu")
    assert_parity(out, truth(x, w, None, (2, 2), TF_SAME, "silu"), plain(x, w, None, (2, 2), TF_SAME, "silu"),
                  torch.float16)


def test_weight_dtype_is_cast_once_in_the_launcher():
    """Weights already in x's dtype are passed as they are (no copy); others are cast to x's dtype."""
    from effnet_kernels.triton import conv

    x = torch.randn(1, 3, 8, 8).half()
    w16, w32 = torch.randn(8, 3, 3, 3).half(), torch.randn(8, 3, 3, 3)
    assert conv.prepare_conv(x, w16, None, (2, 2), TF_SAME, "silu").weight is w16
    cast = conv.prepare_conv(x, w32, None, (2, 2), TF_SAME, "silu").weight
    assert cast.dtype == torch.float16 and torch.equal(cast, w32.half())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(layout):
    x = make_input((0, 3, 8, 8), torch.float16, layout, "cpu")
    out = ops.conv_bn_act(x, torch.randn(4, 3, 3, 3), torch.randn(4), stride=2, backend="triton")
    assert tuple(out.shape) == (0, 4, 4, 4) and out.dtype == torch.float16


def test_batch_one_and_large_batch():
    run_case((1, 3, 12, 12), 32, 3, 2, TF_SAME, torch.float16, "channels_last")
    run_case((9, 3, 5, 4), 16, 3, 2, None, torch.bfloat16, "nchw")


def test_int64_offsets_variant(monkeypatch):
    """The 64-bit-offset specialisation computes the same thing (forced on a small tensor)."""
    from effnet_kernels.triton import conv

    real = conv.prepare_conv

    def forced(*args):
        lp = real(*args)
        lp.int64 = True
        return lp

    monkeypatch.setattr(conv, "prepare_conv", forced)
    for layout in ("nchw", "channels_last"):
        run_case((2, 3, 9, 8), 33, 3, 2, TF_SAME, torch.bfloat16, layout, "hardswish")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_gpu_candidate_config(monkeypatch, layout):
    """Each config of the GPU space computes the right thing (in the interpreter): B0's stem space at batch
    32 (a full grid: no candidate shrunk), run on a 17 x 19 output (masked last tile) with Cout 40."""
    from effnet_kernels.triton import _tuning, conv

    lp = conv.prepare_conv(torch.empty(32, 3, 224, 224), torch.empty(32, 3, 3, 3), None, (2, 2), TF_SAME, "silu")
    candidates = conv._candidates(lp)
    assert [(c.block_a, c.block_b, c.num_warps) for c in candidates] == [(128, 32, 8), (64, 32, 4), (256, 32, 16)]
    for cfg in candidates:
        cfg = _tuning.Config(cfg.block_a, 64, cfg.num_warps)  # BLOCK_N as Cout = 40 gets it
        monkeypatch.setattr(_tuning, "choose", lambda *args, cfg=cfg: cfg)
        run_case((1, 3, 34, 38), 40, 3, 2, TF_SAME, torch.float16, layout)


def test_grid_fills_the_gpu_at_batch_one():
    """Batch 1 at 224 (98 tiles of 128 pixels) shrinks the default tile until two programs per SM."""
    from effnet_kernels.triton import conv

    lp = conv.prepare_conv(torch.empty(1, 3, 224, 224), torch.empty(32, 3, 3, 3), None, (2, 2), TF_SAME, "silu")
    cfg = conv._candidates(lp)[0]
    assert (cfg.block_a, cfg.block_b, cfg.num_warps) == (32, 32, 2)
    assert conv._programs(lp, cfg.block_a, cfg.block_b) >= conv.MIN_PROGRAMS


@pytest.mark.parametrize(
    "cout,dtype,layout,vec",
    [(32, torch.float16, "nhwc", 8), (40, torch.float16, "nhwc", 8), (56, torch.float32, "nhwc", 4),
     (12, torch.float16, "nhwc", 4), (7, torch.bfloat16, "nhwc", 1), (32, torch.float16, "nchw", 8),
     (32, torch.float32, "nchw", 4)],
)
def test_store_vector_choice(cout, dtype, layout, vec):
    """VEC divides the contiguous extent of y (Cout for channels_last, Ho * Wo for NCHW), at most 16 bytes."""
    from effnet_kernels.triton import conv

    x = torch.empty(2, 3, 224, 224, dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    lp = conv.prepare_conv(x, torch.empty(cout, 3, 3, 3), None, (2, 2), TF_SAME, "silu")
    assert lp.layout == layout and conv.out_vector(lp) == vec
    for size, plane_vec in ((16, 16 // x.element_size()), (15, 1)):  # outputs 8 x 8 and 7 x 7
        other = conv.prepare_conv(x[:, :, :size, :size], torch.empty(cout, 3, 3, 3), None, (2, 2), TF_SAME, "silu")
        assert conv.out_vector(other) == (vec if layout == "nhwc" else plane_vec)


@pytest.mark.parametrize("cout", [40, 56])
def test_channel_vector_widths(cout):
    """Cout 40 / 56 (B3, B6): 16-byte channels_last vectors that Triton's divisibility hint does not see."""
    for dtype in DTYPES:
        run_case((2, 3, 7, 6), cout, 3, 2, TF_SAME, dtype, "channels_last")


def test_negative_control_wrong_store_vector_is_caught(monkeypatch):
    """A VEC that does not divide Cout (16 for Cout = 24) rounds Cout down in the kernel: channels 16-23
    stay unwritten (NaN from the poisoning), which the check must reject."""
    from effnet_kernels.triton import conv

    run_case((2, 3, 7, 6), 24, 3, 2, TF_SAME, torch.float16, "channels_last")
    monkeypatch.setattr(conv, "out_vector", lambda lp: 16)
    with pytest.raises(AssertionError):
        run_case((2, 3, 7, 6), 24, 3, 2, TF_SAME, torch.float16, "channels_last")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_padding_shift_is_caught(dtype):
    """The stem's TF "same" padding shifted one pixel (right/bottom -> left/top) must fail the check."""
    case = ((2, 3, 9, 8), 16, 3, 2, TF_SAME, dtype, "channels_last")
    run_case(*case)
    with planted("conv_pad_shift", "triton"), pytest.raises(AssertionError):
        run_case(*case)


def test_negative_control_kernel_tap_shift_is_caught(monkeypatch):
    """A defect inside the launch (pad_left off by one, as a kernel indexing bug would be) is rejected."""
    from effnet_kernels.triton import conv

    real = conv.launch_args
    run_case((1, 3, 9, 8), 16, 3, 2, TF_SAME, torch.float32, "nchw")  # clean: passes

    def shifted(lp, cfg):
        grid, args, consts = real(lp, cfg)
        return grid, args[:-1] + (args[-1] + 1,), consts

    monkeypatch.setattr(conv, "launch_args", shifted)
    with pytest.raises(AssertionError):
        run_case((1, 3, 9, 8), 16, 3, 2, TF_SAME, torch.float32, "nchw")


def test_output_keeps_memory_format():
    for x in (torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7).contiguous(memory_format=CL),
              torch.randn(2, 7, 6, 12)[:, :3, :5, ::2], torch.randn(2, 5, 7, 3).permute(0, 3, 1, 2)):
        y = ek.ops.conv_bn_act(x, torch.randn(6, 3, 3, 3), torch.randn(6), stride=2, backend="triton")
        assert y.is_contiguous(memory_format=ek.ops._checks.memory_format_of(x))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    x = torch.randn(2, 3, 7, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    args = (x, torch.randn(8, 3, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True), [2, 2], [0, 1, 0, 1],
            "silu", "triton")
    torch.library.opcheck(torch.ops.effnet.conv_bn_act.default, args)


def test_backward_is_cudnns(monkeypatch):
    """The triton backend serves the forward and registers the backward: cuDNN's convolution backward
    (``_aten_convs.conv_bn_act_backward``, no Triton kernel), never the float32 reference's."""
    from effnet_kernels import _aten_convs, backends
    from effnet_kernels import triton as ek_triton

    impls = ek_triton._load()
    assert "conv_bn_act" in impls and impls["conv_bn_act_backward"] is _aten_convs.conv_bn_act_backward
    monkeypatch.setattr(backends._REGISTRY["torch"], "impls", lambda: pytest.fail("the torch reference served"))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = ops.conv_bn_act(x, w, b, stride=2, padding=TF_SAME, activation="silu", backend="triton")
    got = torch.autograd.grad(out.sum(), (x, w, b))
    monkeypatch.undo()
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(ops.conv_bn_act(*ref, stride=2, padding=TF_SAME, backend="torch").sum(), ref)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_int64_is_decided_per_sample():
    """The sample base is always 64-bit: B7's stem at batch 1000 (5.8 G output elements) keeps 32-bit
    offsets within a sample; a sample of more than 2^31 elements needs the INT64 variant."""
    from effnet_kernels.triton import conv

    def lp(shape, cout):
        return conv.prepare_conv(torch.empty(shape, device="meta"), torch.empty(cout, 3, 3, 3, device="meta"), None,
                                 (2, 2), TF_SAME, "silu")

    assert not lp((1000, 3, 600, 600), 64).int64
    assert lp((1, 3, 27000, 27000), 8).int64  # x: 2.19 G elements in one sample
    assert lp((1, 3, 12000, 12000), 256).int64  # y: 9.2 G elements in one sample


def test_docstring_arithmetic():
    """The numbers the module docstring argues with (B0's stem at 224 x 224)."""
    from effnet_kernels.triton import conv

    assert conv.compulsory_bytes(1, 3, 224, 224, 32, 112, 112, 3, 2) == 2 * (150_528 + 401_408 + 864) + 128
    assert conv.compulsory_bytes(1, 3, 224, 224, 32, 112, 112, 3, 2, bias_bytes=0) == 1_105_600
    assert conv.flops(1, 3, 32, 112, 112, 3) == 21_676_032
    fp16_us = conv.compulsory_bytes(256, 3, 224, 224, 32, 112, 112, 3, 2) / 4.3e12 * 1e6
    fma_us = conv.flops(256, 3, 32, 112, 112, 3) / 67e12 * 1e6
    assert 65 < fp16_us < 67 and 82 < fma_us < 84
