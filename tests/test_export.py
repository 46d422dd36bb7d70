"""Export of a converted model without revert: torch.export (fused ops kept, or decomposed to
aten ops), ONNX through onnxruntime, torch.jit.trace.

The model is efficientnet_pytorch B0 (TF "same" padding, SE, residuals) with calibrated
BatchNorm; every output is checked by DESIGN.md's rule against fp64 eager, with the
sensitivity assertion. Negative controls: an export whose decomposition pads one pixel off,
or skips the activation, must fail the same checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import export as ekx
from effnet_kernels import reference

from .model_checks import assert_network_parity, calibrated

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")

# what a converted efficientnet_pytorch B0 calls: every block has SE, whose excite the projection
# conv applies on load (effnet.se_excite is not called)
EFFNET_OPS = {"effnet.dwconv_bn_act.default", "effnet.se_gate.default", "effnet.pointwise_conv.default"}


@pytest.fixture(scope="module")
def b0():
    """(eager, converted, x): calibrated efficientnet_pytorch B0 at 64x64 and its conversion."""
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(EfficientNet.from_name("efficientnet-b0", image_size=64), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch").eval()
    assert len(ek.conversion_report(converted).swapped) == 16
    return eager, converted, x


def _fresh(like: torch.Tensor, n: int | None = None, seed: int = 1) -> torch.Tensor:
    """An input the export never saw (seeded: the network-level rule holds with a margin that
    some draws would eat; block by block is the precise check, see tests/model_checks.py)."""
    shape = (n if n is not None else like.shape[0], *like.shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_export_matches(eager: nn.Module, converted: nn.Module, exported: nn.Module, x: torch.Tensor) -> None:
    """``exported`` computes what ``converted`` does (same arithmetic, to float32 rounding of a
    different op order) and passes the DESIGN rule against fp64 eager on a sensitive model."""
    with torch.no_grad():
        want, got = converted(x), exported(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert_network_parity(eager, exported, x)


def _call_targets(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _pad_shift(x, weight, scale, shift, stride, padding, activation, squeeze, backend):
    """A planted defect: the depthwise padding one pixel off (left/right, top/bottom swapped by one)."""
    left, right, top, bottom = padding
    shifted = (left + 1, right - 1, top, bottom) if right > 0 else (left, right, top + 1, bottom - 1)
    y, mean = reference.dwconv_bn_act(x, weight, scale, shift, stride, shifted, activation, squeeze)
    return y, mean if mean is not None else x.new_empty((0,), dtype=torch.float32)


def _skip_activation(x, weight, scale, shift, stride, padding, activation, squeeze, backend):
    y, mean = reference.dwconv_bn_act(x, weight, scale, shift, stride, padding, "identity", squeeze)
    return y, mean if mean is not None else x.new_empty((0,), dtype=torch.float32)


DEFECTS = {"pad_shift": _pad_shift, "skip_activation": _skip_activation}


# ---------------------------------------------------------------- torch.export
def test_export_keeps_fused_ops_and_matches(b0):
    eager, converted, x = b0
    program = ekx.export_program(converted, x, decompose=False)
    assert EFFNET_OPS <= _call_targets(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), converted(x), rtol=0, atol=0)
    assert_export_matches(eager, converted, program.module(), _fresh(x))


def test_plain_torch_export_works_on_a_converted_model(b0):
    """No helper needed: torch.export.export itself, then run_decompositions(decompositions())."""
    eager, converted, x = b0
    program = torch.export.export(converted, (x,)).run_decompositions(ekx.decompositions())
    assert not any(t.startswith("effnet.") for t in _call_targets(program))
    assert_export_matches(eager, converted, program.module(), x)


def test_decomposed_export_is_aten_only_and_matches(b0):
    eager, converted, x = b0
    program = ekx.export_program(converted, x)
    targets = _call_targets(program)
    assert targets and all(t.startswith("aten.") or t.startswith("<built-in") for t in targets), targets
    assert_export_matches(eager, converted, program.module(), _fresh(x))


def test_decomposed_export_with_a_dynamic_batch(b0):
    eager, converted, x = b0
    batch = torch.export.Dim("batch", min=1, max=64)
    program = ekx.export_program(converted, x, dynamic_shapes={"inputs": {0: batch}})
    for n in (1, 5):
        assert_export_matches(eager, converted, program.module(), _fresh(x, n))


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_negative_control_export_check_rejects_defect(b0, defect, monkeypatch):
    eager, converted, x = b0
    table = ekx.decompositions()
    table[torch.ops.effnet.dwconv_bn_act.default] = DEFECTS[defect]
    monkeypatch.setattr(ekx, "decompositions", lambda: table)
    program = ekx.export_program(converted, x)
    with pytest.raises(AssertionError):
        assert_export_matches(eager, converted, program.module(), x)
    with pytest.raises(AssertionError):  # the DESIGN rule alone rejects it too
        assert_network_parity(eager, program.module(), x)


@pytest.mark.parametrize("activation", ["silu", "identity", "relu", "relu6", "hardswish"])
def test_each_decomposition_equals_its_op(activation):
    """The decompositions compute what the ops compute (the torch backend), for every kind."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, 8)
    w, scale, shift = torch.randn(6, 1, 3, 3), torch.rand(6) + 0.5, torch.randn(6)
    table = ekx.decompositions()
    for squeeze in (False, True):
        args = (x, w, scale, shift, [2, 1], [1, 1, 0, 2], activation, squeeze, "torch")
        want = torch.ops.effnet.dwconv_bn_act.default(*args)
        got = table[torch.ops.effnet.dwconv_bn_act.default](*args)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    pooled = torch.randn(3, 6)
    se = (torch.randn(2, 6), torch.randn(2), torch.randn(6, 2), torch.randn(6))
    for se_act, gate in (("silu", "sigmoid"), ("relu", "hardsigmoid")):
        args = (pooled, *se, se_act, gate, "torch")
        torch.testing.assert_close(table[torch.ops.effnet.se_gate.default](*args),
                                   torch.ops.effnet.se_gate.default(*args), rtol=0, atol=0)
    y, g = torch.randn(2, 6, 4, 4), torch.rand(2, 6)
    torch.testing.assert_close(table[torch.ops.effnet.se_excite.default](y, g, "torch"),
                               torch.ops.effnet.se_excite.default(y, g, "torch"), rtol=0, atol=0)


def test_export_program_rejects_bad_arguments(b0):
    _, converted, x = b0
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ekx.export_program(lambda t: t, x)
    with pytest.raises(TypeError, match="args must be a Tensor or a tuple"):
        ekx.export_program(converted, {"x": x})


# ---------------------------------------------------------------- torch.jit.trace
def test_jit_trace_of_a_converted_model(b0):
    eager, converted, x = b0
    traced = torch.jit.trace(converted, x)
    assert "effnet::dwconv_bn_act" in str(traced.inlined_graph)
    assert_export_matches(eager, converted, traced, _fresh(x))


def test_jit_trace_after_a_forward_does_not_bake_in_the_fold(b0):
    """A warm fold cache must not become constants of the traced graph: a later BN edit shows."""
    eager, converted, x = b0
    e, c = copy.deepcopy(eager), copy.deepcopy(converted)
    with torch.no_grad():
        c(x)  # warms the fold caches
        traced = torch.jit.trace(c, x)
        for model in (e, c):
            bn = model._blocks[3]._bn1
            bn.running_var.mul_(1.5)
            bn.weight.add_(0.25)
    assert_export_matches(e, c, traced, x)


# ---------------------------------------------------------------- ONNX
class OnnxModule(nn.Module):
    """An onnxruntime session as a module (float32 in, float32 logits out)."""

    def __init__(self, path):
        super().__init__()
        ort = pytest.importorskip("onnxruntime")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().numpy()})[0])


@pytest.fixture(scope="module")
def onnx_b0(b0, tmp_path_factory):
    pytest.importorskip("onnxscript")
    _, converted, x = b0
    path = tmp_path_factory.mktemp("onnx") / "b0.onnx"
    ekx.export_onnx(converted, x, path, input_names=["image"], output_names=["logits"])
    return path


def test_onnx_export_runs_in_onnxruntime_and_matches(b0, onnx_b0):
    eager, converted, x = b0
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(onnx_b0)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    assert not any(n.domain.startswith("effnet") for n in graph.node)
    assert_export_matches(eager, converted, OnnxModule(onnx_b0), _fresh(x))


def test_negative_control_onnx_check_rejects_defect(b0, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    eager, converted, x = b0
    table = ekx.decompositions()
    table[torch.ops.effnet.dwconv_bn_act.default] = _pad_shift
    monkeypatch.setattr(ekx, "decompositions", lambda: table)
    ekx.export_onnx(converted, x, tmp_path / "bad.onnx")
    with pytest.raises(AssertionError):
        assert_network_parity(eager, OnnxModule(tmp_path / "bad.onnx"), x)
    with pytest.raises(AssertionError):
        assert_export_matches(eager, converted, OnnxModule(tmp_path / "bad.onnx"), x)


def test_export_onnx_of_an_exported_program_with_the_fused_ops(b0, tmp_path):
    """An ExportedProgram that still has the effnet ops is decomposed before ONNX translation."""
    pytest.importorskip("onnxscript")
    eager, converted, x = b0
    program = ekx.export_program(converted, x, decompose=False)
    ekx.export_onnx(program, x, tmp_path / "p.onnx")
    assert_export_matches(eager, converted, OnnxModule(tmp_path / "p.onnx"), x)
