"""The CUDA C++ backend on a GPU (``pytest -m gpu``; skipped elsewhere).

The op x dtype x k x stride x padding x layout grid, awkward shapes, empty batch and
backward run for ``cuda`` in ``test_ops_parity`` (its ``cuda-cuda`` parameter). Here: what
is specific to these kernels - the 16-byte vector path and its scalar fallbacks (C not a
multiple of the pack, misaligned pointers), many channel blocks and tiles, the batch and
grid-limit loops, 64-bit offsets, both squeeze reductions (atomic and the deterministic
two-stage one, bitwise reproducible), every depthwise layer of B0-B7 at its native
resolution, side streams, CUDA graphs, and ``opcheck`` with backend "cuda". Every check
is against an fp64 reference built from nn/F modules, under the parity rule of DESIGN.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels as ek
from effnet_kernels import cuda as cuda_backend
from effnet_kernels.models import MODEL_NAMES, layer_shapes

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import (ACT_MODULES, ACTIVATIONS, SE_VARIANTS, dwconv_plain, make_input, random_bn,
                              run_dwconv_case, se_truth)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def cuda_backend_available():
    status = ek.available_backends()["cuda"]
    assert status.available, f"the cuda backend must be available on a GPU machine: {status.reasons}"


def folded_bn(c: int):
    from effnet_kernels.nn import fold_batchnorm

    bn = random_bn(c)
    scale, shift = fold_batchnorm(bn)
    return bn, scale.detach().to(DEV, torch.float32), shift.detach().to(DEV, torch.float32)


def gpu_truth(x, weight, bn, stride, pad4, activation="silu"):
    """fp64 ground truth on the GPU (large shapes): F.pad -> F.conv2d -> BatchNorm2d -> activation, all float64."""
    z = F.conv2d(F.pad(x.double(), pad4), weight.double(), stride=stride, groups=x.shape[1])
    u = bn.to(z.device)(z)
    y = ACT_MODULES[activation]()(u)
    return y, y.mean(dim=(2, 3))


def gate_truth(pooled, wr, br, we, be, activation="silu", gate="sigmoid"):
    """se_truth (fp64 1x1 nn.Conv2d modules, CPU) for tensors on the GPU."""
    return se_truth(*(t.cpu() for t in (pooled, wr, br, we, be)), activation, gate)


def check_dwconv(x, k, stride, pad4, squeeze=True, activation="silu", weight_std=0.3):
    """Run the cuda op on ``x`` (any layout/view) and check y and mean against fp64 truth on the GPU."""
    c = x.shape[1]
    weight = torch.randn(c, 1, k, k, device=DEV) * weight_std
    bn, scale, shift = folded_bn(c)
    out = ek.ops.dwconv_bn_act(x, weight, scale, shift, stride=stride, padding=pad4,
                               activation=activation, squeeze=squeeze, backend="cuda")
    y, mean = out if squeeze else (out, None)
    y_ref, mean_ref = gpu_truth(x, weight, bn, stride, pad4, activation)
    y_plain, mean_plain = dwconv_plain(x, weight, scale, shift, stride, pad4, activation)
    assert y.dtype == x.dtype
    assert y.is_contiguous(memory_format=ek.ops._checks.memory_format_of(x))
    assert_parity(y, y_ref, y_plain, x.dtype, what="y")
    if squeeze:
        assert_parity(mean, mean_ref, mean_plain, x.dtype, what="mean")
    return y, mean


def misaligned(shape, dtype, layout):
    """A dense tensor (in ``layout``) whose data pointer is 2 elements past a 16-byte boundary."""
    n, c, h, w = shape
    numel = n * c * h * w
    flat = torch.randn(numel + 2, device=DEV).to(dtype)[2:]
    if layout == "channels_last":
        x = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=CL)
    else:
        x = flat.view(n, c, h, w)
    assert x.data_ptr() % 16 != 0
    return x


# ------------------------------------------------------------------ vector path and fallbacks
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [8, 12, 13, 136])
def test_vector_and_scalar_paths(c, dtype, layout):
    """C = 8 (a 16-byte pack in every dtype), 12 (packs for fp32 only), 13 (scalar), 136 (two channel blocks)."""
    for k, stride in ((3, 1), (5, 2), (7, 1)):
        run_dwconv_case("cuda", DEV, (2, c, 11, 10), k, stride, None, dtype, layout, "silu", squeeze=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_on_every_path(activation, dtype, layout):
    """Each activation's template instance: vector (C = 136) and scalar (C = 13) paths, k x stride,
    the BN output over about [-8, 8] (every region of relu6 / hardswish), both squeeze reductions."""
    for c, k, stride in ((136, 3, 1), (13, 5, 2), (136, 7, 2)):
        run_dwconv_case("cuda", DEV, (2, c, 11, 10), k, stride, None, dtype, layout, activation, True, weight_std=1.0)
    prev = _deterministic(True)
    try:
        run_dwconv_case("cuda", DEV, (2, 40, 57, 61), 3, 1, None, dtype, layout, activation, True, weight_std=1.0)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_misaligned_pointers_take_the_scalar_path(dtype, layout):
    x = misaligned((2, 16, 9, 7), dtype, layout)
    check_dwconv(x, 3, 2, (0, 1, 0, 1))
    y = misaligned((2, 16, 5, 8), dtype, layout)
    gate = torch.rand(2, 16, device=DEV)
    out = ek.ops.se_excite(y, gate, backend="cuda")
    truth = y.double() * gate.double()[:, :, None, None]
    assert_parity(out, truth, y * gate.to(dtype)[:, :, None, None], dtype, what="excite")


@pytest.mark.parametrize("stride", [(1, 2), (2, 1)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_unequal_strides(stride, layout):
    run_dwconv_case("cuda", DEV, (2, 24, 13, 12), 5, stride, (2, 1, 0, 3), torch.float16, layout, "silu", True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_tiles_and_odd_widths(layout):
    """Wo not a multiple of the 4-wide strip, many strips per block row, stride 2 from odd sizes."""
    for shape, k, stride in (((2, 40, 57, 61), 3, 1), ((1, 32, 113, 113), 5, 2), ((3, 8, 1, 9), 3, 1)):
        run_dwconv_case("cuda", DEV, shape, k, stride, None, torch.bfloat16, layout, "silu", True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_beyond_the_grid_limit(layout):
    """N > 65535: the NHWC kernel loops over samples, the NCHW grid over planes is large."""
    x = torch.randn(66000, 8, 2, 3, device=DEV).to(torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    check_dwconv(x, 3, 1, (1, 1, 1, 1))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_64bit_offsets(layout):
    """More than 2**31 elements: check the last output rows (which need 64-bit offsets) against a crop."""
    n, c, h, w = 1, 8, 16392, 16392
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~9 GB of GPU memory")
    x = torch.empty(n, c, h, w, device=DEV, dtype=torch.float16,
                    memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    x.normal_()
    assert x.numel() > 2**31
    weight = torch.randn(c, 1, 3, 3, device=DEV) * 0.3
    bn, scale, shift = folded_bn(c)
    y = ek.ops.dwconv_bn_act(x, weight, scale, shift, stride=1, padding=1, backend="cuda")
    crop = x[:, :, h - 5:, :].float()  # input rows feeding the last 4 output rows (+1 row of bottom padding)
    y_ref, _ = gpu_truth(crop, weight, bn, 1, (1, 1, 0, 1))
    y_plain, _ = dwconv_plain(crop.half(), weight, scale, shift, 1, (1, 1, 0, 1), "silu")
    del x
    assert_parity(y[:, :, -4:, :], y_ref, y_plain, torch.float16, what="last rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_height_covered_by_padding(dtype):
    """H = 0 (or W = 0) with padding >= k: every output is act(shift); the kernels read no input."""
    check_dwconv(torch.randn(2, 5, 0, 3, device=DEV).to(dtype), 3, 1, (1, 1, 2, 1))
    check_dwconv(torch.randn(1, 16, 4, 0, device=DEV).to(dtype).contiguous(memory_format=CL), 3, 2, (2, 1, 1, 1))


# ------------------------------------------------------------------ squeeze reductions
def _deterministic(flag: bool):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    return prev


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_squeeze_both_reductions(layout, deterministic):
    prev = _deterministic(deterministic)
    try:
        for shape in ((2, 40, 57, 61), (4, 1152, 7, 7), (1, 3, 1, 1)):
            run_dwconv_case("cuda", DEV, shape, 3, 1, None, torch.float32, layout, "silu", True)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic_squeeze_is_bitwise_reproducible(layout):
    """Many blocks per (n, c): atomics would add in varying order; the two-stage sum must not."""
    x = torch.randn(2, 48, 160, 160, device=DEV).to(torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    w = torch.randn(48, 1, 3, 3, device=DEV)
    s, b = torch.rand(48, device=DEV) + 0.5, torch.randn(48, device=DEV)
    C = cuda_backend.extension()
    assert C.dwconv_partials_numel(1, layout == "channels_last", 2, 48, 160, 160, 3, 1, True, True) > 0
    prev = _deterministic(True)
    try:
        runs = [ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="cuda") for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for y, m in runs[1:]:
        assert torch.equal(m, runs[0][1]) and torch.equal(y, runs[0][0])
    atomic = ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="cuda")[1]
    torch.testing.assert_close(atomic, runs[0][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ EfficientNet B0-B7 at native resolution
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_efficientnet_layers(name):
    """Every distinct depthwise (+SE) layer of the network: fp16 channels_last (the fast path), batch 2."""
    seen = set()
    for layer in layer_shapes(name, batch=2):
        key = (layer.mid_channels, layer.H, layer.W, layer.kernel, layer.stride, layer.padding, layer.se_reduced)
        if key in seen:
            continue
        seen.add(key)
        c = layer.mid_channels
        x = torch.randn(2, c, layer.H, layer.W, device=DEV).to(torch.float16).contiguous(memory_format=CL)
        y, mean = check_dwconv(x, layer.kernel, layer.stride, (layer.padding,) * 4)
        assert tuple(y.shape[2:]) == (layer.Ho, layer.Wo)
        if layer.se_reduced:
            r = layer.se_reduced
            wr, br = torch.randn(r, c, device=DEV) / c**0.5, torch.randn(r, device=DEV)
            we, be = torch.randn(c, r, device=DEV) / r**0.5, torch.randn(c, device=DEV)
            gate = ek.ops.se_gate(mean, wr, br, we, be, backend="cuda")
            assert_parity(gate.cpu(), gate_truth(mean, wr, br, we, be), None, torch.float32, what=f"{name} gate C={c}")
            out = ek.ops.se_excite(y, gate, backend="cuda")
            assert out.is_contiguous(memory_format=CL)
            truth = y.double() * gate.double()[:, :, None, None]
            assert_parity(out, truth, y * gate.half()[:, :, None, None], torch.float16, what=f"{name} excite C={c}")


# ------------------------------------------------------------------ SE specifics
@pytest.mark.parametrize("pooled_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["same", "mixed"])
def test_se_gate_dtypes(pooled_dtype, weights):
    """Pooled in any dtype; weights sharing a dtype are read as is, mixed ones as fp32."""
    n, c, r = 3, 3840, 160
    pooled = torch.randn(n, c, device=DEV).to(pooled_dtype)
    wdt = torch.bfloat16 if weights == "same" else torch.float16
    wr, br = (torch.randn(r, c, device=DEV) / c**0.5).to(wdt), torch.randn(r, device=DEV).to(wdt)
    we, be = (torch.randn(c, r, device=DEV) / r**0.5).to(wdt), torch.randn(c, device=DEV)
    if weights == "same":
        be = be.to(wdt)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="cuda")
    # The kernel reads every input exactly and accumulates in fp32: the fp32 rule applies.
    assert_parity(gate.cpu(), gate_truth(pooled, wr, br, we, be), None, torch.float32, what="gate")


@pytest.mark.parametrize("weights", ["same", "mixed"])
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_se_gate_functions(activation, gate, weights):
    """Each (activation, gate) template pair at B7's width, fp16 pooled; b_expand over about [-6, 6]."""
    n, c, r = 5, 3840, 160
    pooled = torch.randn(n, c, device=DEV).half()
    wdt = torch.float16 if weights == "same" else torch.float32
    wr, br = (torch.randn(r, c, device=DEV) / c**0.5).to(wdt), torch.randn(r, device=DEV).to(wdt)
    we, be = (torch.randn(c, r, device=DEV) / r**0.5).to(wdt), (torch.randn(c, device=DEV) * 3).half()
    out = ek.ops.se_gate(pooled, wr, br, we, be, activation=activation, gate=gate, backend="cuda")
    truth = gate_truth(pooled, wr, br, we, be, activation, gate)
    # the kernel reads every input exactly and accumulates in fp32: the fp32 rule applies
    assert_parity(out.cpu(), truth, None, torch.float32, what="gate")


def test_se_gate_beyond_the_block_cap():
    """N * C > 2**20 blocks x 8 warps: the gate kernels must loop over warps (the grid is capped)."""
    n, c, r = 4400, 2000, 8
    assert n * c > (1 << 20) * 8
    pooled = torch.randn(n, c, device=DEV)
    wr, br = torch.randn(r, c, device=DEV) / c**0.5, torch.randn(r, device=DEV)
    we, be = torch.randn(c, r, device=DEV) / r**0.5, torch.randn(c, device=DEV)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="cuda")
    p64, wr64, br64, we64, be64 = (t.double() for t in (pooled, wr, br, we, be))
    truth = torch.sigmoid(F.silu(p64 @ wr64.T + br64) @ we64.T + be64)
    assert_parity(gate, truth, None, torch.float32, what="gate (all rows)")
    assert_parity(gate[-64:], truth[-64:], None, torch.float32, what="gate (last rows)")


def test_ops_on_another_gpu_keep_the_current_device():
    """The extension switches to the tensors' device for a call and switches back (torch must not see it)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    dev1 = torch.device("cuda", 1)
    x = torch.randn(2, 8, 6, 6, device=dev1)
    w, s, b = torch.randn(8, 1, 3, 3, device=dev1), torch.rand(8, device=dev1) + 0.5, torch.randn(8, device=dev1)
    y, mean = ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="cuda")
    assert torch.cuda.current_device() == 0
    ek.ops.se_excite(y, torch.sigmoid(mean), backend="cuda")
    assert torch.cuda.current_device() == 0
    ref = ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="torch")
    torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_se_excite_vector_and_scalar(hw, dtype, layout):
    """NCHW packs need H*W % pack == 0 (16 does, 15 does not); NHWC packs need C % pack == 0 (C = 24 does)."""
    y = make_input((3, 24, *hw), dtype, layout, DEV)
    gate = torch.rand(3, 24, device=DEV)
    out = ek.ops.se_excite(y, gate, backend="cuda")
    truth = y.double() * gate.double()[:, :, None, None]
    assert_parity(out, truth, y * gate.to(dtype)[:, :, None, None], dtype, what="excite")


# ------------------------------------------------------------------ streams, graphs, errors, opcheck
def test_runs_on_the_current_stream():
    x = torch.randn(4, 64, 56, 56, device=DEV).to(torch.float16).contiguous(memory_format=CL)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, mean = check_dwconv(x, 5, 2, (2, 2, 2, 2))
    side.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(mean).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_and_replay(deterministic):
    c = 32
    x = torch.randn(2, c, 28, 28, device=DEV).to(torch.float16).contiguous(memory_format=CL)
    w = torch.randn(c, 1, 3, 3, device=DEV)
    s, b = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)
    prev = _deterministic(deterministic)
    try:
        def step():
            y, m = ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="cuda")
            return ek.ops.se_excite(y, torch.sigmoid(m), backend="cuda")

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
    finally:
        torch.use_deterministic_algorithms(prev)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_unsupported_kernel_size_names_the_alternatives():
    x = torch.randn(1, 8, 9, 9, device=DEV)
    w, s, b = torch.randn(8, 1, 9, 9, device=DEV), torch.rand(8, device=DEV) + 0.5, torch.randn(8, device=DEV)
    with pytest.raises(ek.BackendUnavailableError, match="kernel sizes .*got 9.*backend='torch'"):
        ek.ops.dwconv_bn_act(x, w, s, b, backend="cuda")


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_dwconv(layout, squeeze):
    x = torch.randn(2, 16, 7, 5, device=DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    args = (x, torch.randn(16, 1, 3, 3, device=DEV, requires_grad=True), torch.rand(16, device=DEV) + 0.5,
            torch.randn(16, device=DEV), [2, 1], [1, 0, 2, 1], "hardswish" if squeeze else "relu6", squeeze, "cuda")
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act.default, args)


def test_opcheck_se():
    n, c, r = 2, 24, 6
    pooled = torch.randn(n, c, device=DEV, requires_grad=True)
    params = (torch.randn(r, c, device=DEV, requires_grad=True), torch.randn(r, device=DEV, requires_grad=True),
              torch.randn(c, r, device=DEV, requires_grad=True), torch.randn(c, device=DEV, requires_grad=True))
    torch.library.opcheck(torch.ops.effnet.se_gate.default, (pooled, *params, "silu", "sigmoid", "cuda"))
    torch.library.opcheck(torch.ops.effnet.se_gate.default, (pooled, *params, "relu", "hardsigmoid", "cuda"))
    y = torch.randn(n, c, 5, 4, device=DEV).contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(torch.ops.effnet.se_excite.default, (y, torch.rand(n, c, device=DEV), "cuda"))


def test_prebuilt_module_is_current_and_covers_this_gpu():
    assert cuda_backend.extension_problems() == []
    major, minor = torch.cuda.get_device_capability()
    info = cuda_backend.extension().build_info()
    from effnet_kernels import _build

    assert _build.archs_cover(info["archs"], major * 10 + minor), info


# ------------------------------------------------------------------ negative controls
@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "squeeze_skew"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_negative_control_dwconv_check_rejects_defect(defect, layout):
    """check_dwconv must reject a cuda backend with a planted defect (both kernel families)."""
    x = make_input((2, 144, 56, 56), torch.float16, layout, DEV)
    check_dwconv(x, 5, 2, (1, 2, 1, 2))
    with planted(defect, "cuda"), pytest.raises(AssertionError):
        check_dwconv(x, 5, 2, (1, 2, 1, 2))


@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish"])
def test_negative_control_activation_check_rejects_skipped_activation(activation):
    x = make_input((2, 144, 28, 28), torch.float16, "channels_last", DEV)
    check_dwconv(x, 3, 1, (1, 1, 1, 1), activation=activation, weight_std=1.0)
    with planted("skip_silu", "cuda"), pytest.raises(AssertionError, match="y: "):
        check_dwconv(x, 3, 1, (1, 1, 1, 1), activation=activation, weight_std=1.0)


def test_negative_control_se_gate_functions_check_rejects_swapped_functions():
    with planted("se_act_swap", "cuda"), pytest.raises(AssertionError, match="gate"):
        test_se_gate_functions("relu", "hardsigmoid", "same")


def test_negative_control_se_gate_check_rejects_defect():
    n, c, r = 3, 3840, 160
    pooled = torch.randn(n, c, device=DEV)
    wr, br = torch.randn(r, c, device=DEV) / c**0.5, torch.randn(r, device=DEV)
    we, be = torch.randn(c, r, device=DEV) / r**0.5, torch.randn(c, device=DEV)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="cuda")  # clean: passes
    assert_parity(gate.cpu(), gate_truth(pooled, wr, br, we, be), None, torch.float32, what="gate")
    with planted("gate_skew", "cuda"), pytest.raises(AssertionError, match="gate"):
        gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="cuda")
        assert_parity(gate.cpu(), gate_truth(pooled, wr, br, we, be), None, torch.float32, what="gate")
