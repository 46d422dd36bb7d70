"""The Triton ``pointwise_conv_backward`` GEMMs (dgrad with the gate fused, split-K wgrad) in Triton's interpreter.

Every gradient (x, weight, bias, gate, residual) against the fp64 autograd truth of the reference by the
backward rule of DESIGN.md (fp16/bf16: at most 3x the error of eager PyTorch's autograd in that dtype,
``F.conv2d`` of ``se_excite``'s output; fp32: relative 1e-4), the input's gradient poisoned with NaN so an
unwritten element fails: every dtype x layout (NCHW, channels_last, a strided view) x gate / bias / residual,
awkward shapes (K or Cout = 1 and not multiples of 8, H = W = 1, odd H x W, batch 1, several pixel tiles,
K tiles, Cout steps and wgrad splits with a short last chunk), the weight in float32 with half inputs, a
float32 gradient with half inputs, determinism, which path serves which call (the GEMMs without activation
or pool; cuDNN's backward otherwise), opcheck, and negative controls (planted defects the check rejects).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import reference

from .parity import assert_parity
from .test_ops_parity import LAYOUTS, make_input
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (fixture)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- the check


def _never(*args):
    raise AssertionError("the cuDNN fallback served a call the Triton GEMMs take")


def triton_backward(fallback=_never):
    """The triton backend's ``pointwise_conv_backward`` built on ``fallback`` (default: one that fails)."""
    from effnet_kernels.triton.pointwise_backward import pointwise_conv_backward_with

    return pointwise_conv_backward_with(fallback)


def _inputs(shape, cout, dtype, layout, *, gate=True, bias=True, residual=True, weight_dtype=None,
            grad_dtype=None, device="cpu"):
    """x ~ N(0, 1) in ``layout``, weight ~ N(0, 1/K), bias ~ N(0, 1) float32, gate in (0, 1) float32, residual and
    the output's gradient ~ N(0, 1) (the gradient in ``grad_dtype``, default x's)."""
    n, k, h, w = shape
    x = make_input(shape, dtype, layout, device)
    wt = (torch.randn(cout, k, device=device) / max(k, 1) ** 0.5).to(weight_dtype or dtype)
    b = torch.randn(cout, device=device) if bias else None
    g = torch.rand(n, k, device=device) if gate else None
    r = make_input((n, cout, h, w), dtype, layout, device) if residual else None
    go = make_input((n, cout, h, w), grad_dtype or dtype, layout, device)
    return go, x, wt, b, g, r


def _autograd(cast, fn, go, x, w, b, g, r):
    ins = [cast(t).detach().requires_grad_() if t is not None else None for t in (x, w, b, g, r)]
    out = fn(*ins)
    return torch.autograd.grad(out, [t for t in ins if t is not None], go.to(out.dtype))


def _truth(x, w, b, g, r):
    return reference.pointwise_conv(x, w, b, g, r, "identity", False)


def _plain(x, w, b, g, r):
    """Eager PyTorch in x's dtype: F.conv2d of se_excite's output (+ bias) + residual."""
    xin = reference.se_excite(x, g) if g is not None else x
    y = F.conv2d(xin, w.to(x.dtype)[:, :, None, None], b.to(x.dtype) if b is not None else None)
    return y + r if r is not None else y


def check_backward(backward, go, x, w, b, g, r, what="pointwise backward"):
    """``backward``'s gradients of the present inputs vs the fp64 truth by the backward rule, with their dtypes,
    shapes and memory formats (x's gradient in x's, the residual's in its own, the weight's contiguous)."""
    from effnet_kernels.ops._checks import memory_format_of

    got = backward(go, x, w, b, g, r, "identity", False)
    present = [(i, t) for i, t in enumerate((x, w, b, g, r)) if t is not None]
    for i, t in enumerate((x, w, b, g, r)):
        if t is None:
            assert got[i].numel() == 0, f"{what}: an absent input's gradient must be empty"
    wd = lambda t: t.to(x.dtype) if t is not None else None  # noqa: E731  (the weight as the op uses it)
    ref = _autograd(lambda t: t.double(), lambda x_, w_, *rest: _truth(x_, w_, *rest), go, x, wd(w), b, g, r)
    base = _autograd(lambda t: t, _plain, go, x, w, b, g, r)
    for (i, leaf), rr, pp in zip(present, ref, base):
        out = got[i]
        assert out.dtype == leaf.dtype and out.shape == leaf.shape, f"{what}: grad #{i} {out.dtype} {out.shape}"
        assert_parity(out.cpu(), rr.cpu(), pp.to(leaf.dtype).cpu(), x.dtype, kind="backward", what=f"{what}: grad #{i}")
    assert got[0].is_contiguous(memory_format=memory_format_of(x)) and got[1].is_contiguous()
    return got


@pytest.fixture(autouse=True)
def poisoned_grad_x(monkeypatch):
    """The input gradient the launcher allocates starts as NaN: an element the dgrad does not write fails."""
    from effnet_kernels.triton import pointwise_backward

    real = pointwise_backward.prepare

    def prepare(*args):
        lp = real(*args)
        lp.grad_x.fill_(float("nan"))
        return lp

    monkeypatch.setattr(pointwise_backward, "prepare", prepare)


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles, 16-wide Cout steps and 16-pixel wgrad tiles: small shapes span several of each, and the
    wgrad splits its pixel tiles over several programs."""
    from effnet_kernels.triton import _tuning, pointwise_backward as pb

    monkeypatch.setattr(pb, "_dgrad_candidates", lambda lp: [_tuning.Config(16, 16, 1)])
    monkeypatch.setattr(pb, "_wgrad_candidates", lambda lp: [_tuning.Config(16, 16, 1)])
    monkeypatch.setattr(pb, "_dgrad_block_c", lambda lp: 16)
    monkeypatch.setattr(pb, "_pixel_tile", lambda lp, widest: 16)


# ----------------------------------------------------------------------------- cases

GBR = [(g, b, r) for g in (False, True) for b in (False, True) for r in (False, True)]


@pytest.mark.parametrize("gate,bias,residual", GBR, ids=lambda v: "yn"[not v])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_grid(dtype, layout, gate, bias, residual):
    check_backward(triton_backward(), *_inputs((2, 24, 5, 6), 20, dtype, layout, gate=gate, bias=bias,
                                               residual=residual))


@pytest.mark.parametrize("shape,cout", [((2, 1, 3, 3), 5), ((2, 7, 3, 5), 1), ((1, 13, 1, 1), 9),
                                        ((1, 40, 7, 7), 24), ((3, 9, 2, 3), 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_awkward_shapes(shape, cout, dtype):
    """The weight in float32 here: a half-precision gradient of a few values (K = 1, Cout = 1) is one rounding
    each, and one value landing on the other side of a rounding boundary than eager's would fail the rule by
    luck (seen once in 200 draws at K = 7, Cout = 1: both within half an ulp of the exact sum of the rounded
    excited products); the grid above checks the half-precision weight's gradient."""
    check_backward(triton_backward(), *_inputs(shape, cout, dtype, "channels_last", weight_dtype=torch.float32))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_tiles_steps_and_splits(small_tiles, dtype, layout):
    """40 pixels per sample over 16-pixel tiles (a short last tile), K = 40 over three K tiles, Cout = 37 over
    three 16-wide steps and output tiles; the wgrad's 9 pixel tiles split in chunks with a short last one."""
    from effnet_kernels.triton import pointwise_backward as pb

    go, x, w, b, g, r = _inputs((3, 40, 5, 8), 37, dtype, layout)
    lp = pb.prepare(go, x, w, g)
    bm, tiles, splits, chunk = pb.wgrad_tiles(lp, pb._wgrad_candidates(lp)[0])
    assert (bm, tiles) == (16, 9) and splits > 1 and splits * chunk >= tiles > (splits - 1) * chunk
    check_backward(triton_backward(), go, x, w, b, g, r)


def test_a_short_last_split(small_tiles, monkeypatch):
    """Tiles not a multiple of the chunk: the last split's loop runs past the last tile, masked."""
    from effnet_kernels.triton import pointwise_backward as pb

    real = pb.wgrad_tiles

    def four_per_split(lp, cfg):
        bm, tiles, _, _ = real(lp, cfg)
        return bm, tiles, -(-tiles // 4), 4

    monkeypatch.setattr(pb, "wgrad_tiles", four_per_split)
    go, x, w, b, g, r = _inputs((3, 24, 5, 8), 20, torch.float16, "channels_last")  # 9 tiles: 4, 4, 1
    check_backward(triton_backward(), go, x, w, b, g, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weight_and_gradient_with_half_input(dtype):
    """The weight in float32 (used in x's dtype; its gradient returned in float32) and the output's gradient in
    float32 (used in x's dtype, as eager's conv backward uses it)."""
    check_backward(triton_backward(), *_inputs((2, 16, 4, 3), 12, dtype, "channels_last",
                                               weight_dtype=torch.float32, grad_dtype=torch.float32))


def test_is_deterministic(small_tiles):
    """No atomics: two runs are bitwise equal."""
    args = _inputs((3, 40, 5, 8), 37, torch.float16, "channels_last")
    first = triton_backward()(*args, "identity", False)
    second = triton_backward()(*args, "identity", False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation,pool", [("silu", False), ("identity", True), ("relu", True)])
def test_activation_or_pool_takes_the_cudnn_path(activation, pool):
    """An activation's derivative needs the conv output: those calls go to the fallback, untouched."""
    seen = []

    def fallback(*args):
        seen.append(args[-2:])
        return "fallback"

    go, x, w, b, g, _ = _inputs((2, 8, 3, 3), 6, torch.float16, "channels_last", residual=False)
    go = go.float().mean(dim=(2, 3)) if pool else go
    assert triton_backward(fallback)(go, x, w, b, g, None, activation, pool) == "fallback"
    assert seen == [(activation, pool)]


def test_empty_inputs_take_the_fallback():
    seen = []

    def fallback(*args):
        seen.append(tuple(args[1].shape))
        return "fallback"

    go, x, w, b, g, r = _inputs((0, 8, 3, 3), 6, torch.float16, "channels_last")
    assert triton_backward(fallback)(go, x, w, b, g, r, "identity", False) == "fallback"
    assert seen == [(0, 8, 3, 3)]


def test_the_backend_serves_the_op_with_the_gemms(monkeypatch):
    """Through the op's autograd with ``backend="triton"``: both GEMM kernels run once each, neither cuDNN's
    convolution backward nor the torch reference serves, and the gradients keep the rule."""
    from effnet_kernels import _aten_convs, backends, ops
    from effnet_kernels.triton import pointwise_backward as pb

    launches = []
    for name in ("_dgrad_kernel", "_wgrad_kernel"):
        real = getattr(pb, name)

        class Spy:
            def on(self, t, _real=real, _name=name):
                launches.append(_name)
                return _real.on(t)

        monkeypatch.setattr(pb, name, Spy())
    monkeypatch.setattr(_aten_convs, "pointwise_conv_backward", lambda *a, **k: pytest.fail("cuDNN's backward ran"))
    monkeypatch.setattr(backends._REGISTRY["torch"], "impls", lambda: pytest.fail("the torch reference served"))
    go, x, w, b, g, r = _inputs((2, 24, 5, 6), 20, torch.float16, "channels_last")

    def through_autograd(go, x, w, b, g, r, activation, pool):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, g, r)]
        out = ops.pointwise_conv(leaves[0], leaves[1], leaves[2], gate=leaves[3], residual=leaves[4],
                                 activation=activation, pool=pool, backend="triton")
        return torch.autograd.grad(out, leaves, go)

    check_backward(through_autograd, go, x, w, b, g, r)
    assert sorted(launches) == ["_dgrad_kernel", "_wgrad_kernel"]


def test_opcheck():
    go, x, w, b, g, r = _inputs((2, 8, 3, 4), 12, torch.float16, "channels_last")
    torch.library.opcheck(torch.ops.effnet.pointwise_conv_backward.default,
                          (go, x, w, b, g, r, "identity", False, "triton"))


# ----------------------------------------------------------------------------- negative controls


def _planted(monkeypatch, change):
    """A kernel defect: the launch the kernels receive, changed by ``change(lp)``."""
    from effnet_kernels.triton import pointwise_backward as pb

    real = pb.prepare

    def prepare(*args):
        lp = real(*args)
        change(lp)
        return lp

    monkeypatch.setattr(pb, "prepare", prepare)


def _drop_gate(lp):
    lp.gate = torch.ones_like(lp.gate)


def _skew_gate(lp):
    lp.gate = lp.gate * 1.01


def _shift_pixels(lp):  # the input read one pixel off: the weight's gradient pairs g with the wrong y
    lp.x = torch.roll(lp.x, 1, dims=3)


def _transpose_weight_rows(lp):
    lp.weight = lp.weight.flip(0).contiguous()


@pytest.mark.parametrize("defect", [_drop_gate, _skew_gate, _shift_pixels, _transpose_weight_rows],
                         ids=lambda f: f.__name__[1:])
def test_negative_control_planted_defects_are_rejected(monkeypatch, defect):
    """A backward that drops the gate, skews it by 1%, reads y one pixel off or mixes up the weight's rows fails."""
    args = _inputs((2, 24, 5, 6), 20, torch.float16, "channels_last")
    _planted(monkeypatch, defect)
    with pytest.raises(AssertionError, match="pointwise backward"):
        check_backward(triton_backward(), *args)


def test_negative_control_a_split_left_out_is_seen(small_tiles, monkeypatch):
    """A wgrad grid one split short leaves pixel tiles out of the weight's gradient: the check fails."""
    from effnet_kernels.triton import pointwise_backward as pb

    real = pb.wgrad_tiles
    monkeypatch.setattr(pb, "wgrad_tiles", lambda lp, cfg: (lambda t: (t[0], t[1], t[2] - 1, t[3]))(real(lp, cfg)))
    with pytest.raises(AssertionError, match="grad #1"):
        check_backward(triton_backward(), *_inputs((3, 40, 5, 8), 37, torch.float16, "channels_last"))


def test_negative_control_unwritten_elements_are_seen(monkeypatch):
    """A dgrad grid one pixel short leaves NaN (the poison) in the input's gradient: the check fails."""
    from effnet_kernels.triton import pointwise_backward as pb

    real = pb._launch_dgrad

    def short(lp, part, cfg):
        w = lp.w
        lp.w = w - 1  # the kernel now covers H (W - 1) pixels: the last ones stay unwritten
        real(lp, part, cfg)
        lp.w = w

    monkeypatch.setattr(pb, "_launch_dgrad", short)
    with pytest.raises(AssertionError, match="non-finite"):
        check_backward(triton_backward(), *_inputs((2, 24, 5, 6), 20, torch.float16, "nchw"))
