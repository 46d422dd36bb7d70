"""Shared checks for convert() on the real torchvision / timm / transformers models, and the
adapters' never-raise rule on real library modules.

The per-library model suites (``test_convert_torchvision.py``, ``test_convert_timm.py``,
``test_convert_huggingface.py``) import :func:`check_model`, :func:`check_train_step` and
:func:`check_blockwise_train_step` from here. These libraries import in the second CI environment (``.ci/run``, torch 2.14.1 +
torchvision 0.29.1 + timm + transformers, ``-m adapters``) and on the GPU machine; elsewhere
the tests skip.

Expected counts are explicit per model, as block *signatures* (depthwise activation, SE
activation and gate, or a structural reason the block cannot fuse) with how many blocks of
each the model has.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import testing

from .model_checks import assert_converted_matches, assert_train_parity, calibrated, folded_expand_calls

pytestmark = pytest.mark.adapters


# ---------------------------------------------------------------- expectations
@dataclass(frozen=True)
class Sig:
    """A kind of block in a model: its depthwise activation and SE (activation, gate), or None,
    or a structural reason it is left alone (``unfusable``: a regex the report's reason matches)."""

    dw: str = "silu"
    se: Optional[tuple[str, str]] = ("silu", "sigmoid")
    unfusable: Optional[str] = None

    def fusable(self) -> bool:
        return self.unfusable is None

    def reason(self) -> str:
        """A regex the report's reason for leaving such a block alone must match."""
        assert self.unfusable is not None, f"{self} fuses"
        return self.unfusable


EFFNET = Sig()  # SiLU depthwise, SE with SiLU and sigmoid


def expected(signatures: dict[Sig, int]) -> tuple[int, int]:
    """(blocks that must fuse, blocks that must be left alone)."""
    fused = sum(n for s, n in signatures.items() if s.fusable())
    return fused, sum(signatures.values()) - fused


def _block_names(model: nn.Module, block_types: tuple[type, ...]) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if type(m) in block_types}


def _output(out) -> torch.Tensor:
    """The tensor a model returns (transformers: ``logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out[0]


def check_model(model: nn.Module, block_types: tuple[type, ...], signatures: dict[Sig, int], *, size: int = 64,
                dtypes=(torch.float32, torch.bfloat16), x: Optional[torch.Tensor] = None) -> nn.Module:
    """Convert a calibrated ``model`` and check everything the adapters promise; returns the converted model.

    * ``convert`` raises nothing; every block of ``block_types`` is either fused or listed in
      the report with a reason; as many fuse as ``signatures`` say, and each one left alone
      has the reason its signature says;
    * same ``state_dict`` keys (in order), the same Parameter objects;
    * DESIGN-rule parity end to end (fp32, with the sensitivity assertion) and block by
      block in each of ``dtypes`` (every fused block compared);
    * ``revert`` gives back the original classes and outputs.
    """
    if x is None:
        x = torch.randn(2, 3, size, size)
    model = calibrated(model, x)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    blocks = _block_names(model, block_types)
    assert sum(signatures.values()) == len(blocks), f"the model has {len(blocks)} blocks, signatures count {sum(signatures.values())}"
    with torch.no_grad():
        ref = _output(model(x))
    ek.convert(model, backend="torch")
    report = ek.conversion_report(model)
    want_fused, want_left = expected(signatures)
    assert set(report.swapped) | set(report.skipped) == set(blocks), report
    assert len(report.swapped) == want_fused and len(report.skipped) == want_left, report
    reasons = [s.reason() for s in signatures if not s.fusable()]
    for name, why in report.skipped.items():
        assert why and any(re.search(r, why) for r in reasons), f"{name}: unexpected reason {why!r} (expected one of {reasons})"
    for name in report.swapped:
        assert isinstance(model.get_submodule(name), ek.MBConv)
    for name in report.skipped:
        assert type(model.get_submodule(name)) is blocks[name]
    assert list(model.state_dict()) == keys
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(params[k] is p for k, p in model.named_parameters())
    if want_fused:
        assert_converted_matches(eager, model, x, dtypes=dtypes, expect_blocks=want_fused)
    converted = copy.deepcopy(model)
    ek.revert(model)
    assert not any(isinstance(m, ek.MBConv) for m in model.modules())
    assert _block_names(model, block_types) == blocks
    with torch.no_grad():
        torch.testing.assert_close(_output(model(x)), ref)
    return converted


def check_train_step(model: nn.Module, size: int = 32, batch: int = 4, steps: int = 2,
                     autocast: Optional[torch.dtype] = None) -> None:
    """A calibrated model and its converted twin in train mode, every converted block training fused:
    ``steps`` SGD steps by the parity rule against an fp64 twin (outputs, every gradient, the
    parameters and running statistics after the steps; worst tensor of each kind, see
    :func:`effnet_kernels.testing.train_step_parity`), and in fp32 the same stochastic-depth /
    dropout draws as the original (:func:`check_same_draws`). With ``autocast`` (a half dtype) the
    steps run under CPU autocast against eager's autocast error, and every block with an expand conv
    runs it as the folded GEMM (``_train_block._folded_expand_forward``, counted)."""
    x = torch.randn(batch, 3, size, size)
    ref_model = calibrated(model, x).train()
    fused = ek.convert(copy.deepcopy(ref_model), backend="torch").train()
    names = testing.fused_block_names(fused)
    assert names, "nothing fused: the train step would compare a model with itself"
    eager_trained = {n: fused.get_submodule(n).train_unfused_reason() for n in names}
    assert not any(eager_trained.values()), {n: r for n, r in eager_trained.items() if r}
    forward = lambda m, t: _output(m(t))  # noqa: E731
    testing.assert_sensitive(copy.deepcopy(ref_model).train(), x, testing.FP32_RELATIVE[testing.BACKWARD_FACTOR])
    if autocast is not None:
        expanding = [n for n in names if fused.get_submodule(n).plan.pre]
        assert expanding, "no fused block with an expand conv"
        with folded_expand_calls() as calls:
            assert_train_parity(ref_model, fused, x, steps=steps, per_tensor=False, dtype=autocast,
                                context=lambda: torch.autocast("cpu", dtype=autocast), forward=forward)
        assert len(calls) >= steps * len(expanding), (len(calls), len(expanding))
        return
    check_same_draws(ref_model, fused, x)
    assert_train_parity(ref_model, fused, x, steps=steps, per_tensor=False, forward=forward)


def check_blockwise_train_step(model: nn.Module, size: int = 64, batch: int = 4,
                               autocast: Optional[torch.dtype] = None) -> None:
    """Every converted block, training fused, takes one SGD step by the parity rule per tensor against
    an fp64 twin of its original on the input the original saw in the calibrated model (eval forward).

    The check for ReLU / hard-swish networks: in a whole network their training check is ruled by
    pre-activations that rounding moves across a kink in one run and not in another, amplified through
    every later block's batch statistics (torchvision's MNASNet at 64x64: eager fp32's own worst
    gradient 0.2-8x its scale; timm's MobileNetV3 under fp16 autocast 0.4-0.8x), which
    :func:`effnet_kernels.testing.train_step_parity` reports as blind. With ``autocast`` (a half
    dtype) the steps run under CPU autocast and every block with an expand conv runs it as the folded
    GEMM (counted)."""
    x = torch.randn(batch, 3, size, size)
    ref_model = calibrated(model, x).train()
    fused = ek.convert(copy.deepcopy(ref_model), backend="torch").train()
    names = testing.fused_block_names(fused)
    assert names, "nothing fused: the train step would compare a model with itself"
    inputs = {n: args[0] for n, (args, _) in testing.block_inputs(ref_model.eval(), x, names).items()}
    kwargs = {} if autocast is None else dict(dtype=autocast, context=lambda: torch.autocast("cpu", dtype=autocast))
    with folded_expand_calls() as calls:
        for name in names:
            block = fused.get_submodule(name)
            assert block.train_unfused_reason(inputs[name]) is None, name
            testing.assert_sensitive(copy.deepcopy(ref_model.get_submodule(name)).train(), inputs[name],
                                     testing.FP32_RELATIVE[testing.BACKWARD_FACTOR])
            assert_train_parity(copy.deepcopy(ref_model.get_submodule(name)), copy.deepcopy(block), inputs[name],
                                steps=1, **kwargs)
    if autocast is not None:
        expanding = [n for n in names if fused.get_submodule(n).plan.pre]
        assert expanding and len(calls) >= len(expanding), (len(calls), len(expanding))


def check_same_draws(eager: nn.Module, fused: nn.Module, x: torch.Tensor, seed: int = 7) -> None:
    """Under one seed, the converted model in training draws the same stochastic-depth samples (and
    dropout elements) as the original: fp32 outputs agree far closer than one dropped sample allows."""
    outs = []
    for m in (copy.deepcopy(eager).train(), copy.deepcopy(fused).train()):
        torch.manual_seed(seed)
        outs.append(_output(m(x)).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3 * float(outs[0].abs().max()))


# ---------------------------------------------------------------- never raise
def test_timm_mixnet_blocks_are_left_alone_not_raised():
    """timm's MixedConv2d (an nn.ModuleDict of convs, no ``.padding``) used to raise AttributeError."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("mixnet_s", pretrained=False)
    ek.convert(model)
    report = ek.conversion_report(model)
    assert report.skipped and all("MixedConv2d" in why for why in report.skipped.values()), report
    assert not any("adapter error" in why for why in report.skipped.values()), report


def test_unexpected_exception_in_a_planner_is_a_skipped_block(monkeypatch):
    """The safety net: any exception inside an adapter's plan() leaves that block alone with the reason."""
    tvm = pytest.importorskip("torchvision.models")
    from effnet_kernels.integrations import torchvision as adapter

    def broken(block):
        raise KeyError("surprise")

    monkeypatch.setattr(adapter, "plan", broken)
    model = tvm.mobilenet_v3_small()
    ek.convert(model)
    report = ek.conversion_report(model)
    assert not report.swapped and len(report.skipped) == 11
    assert set(report.skipped.values()) == {"adapter error: KeyError: 'surprise'"}
    assert not any(isinstance(m, ek.MBConv) for m in model.modules())


def test_activation_kinds_of_library_classes():
    """Each library's activation / gate classes map to the kernels' names."""
    timm_layers = pytest.importorskip("timm.layers")
    from effnet_kernels.integrations._common import activation_kind

    assert activation_kind(timm_layers.get_act_layer("silu")()) == "silu"
    assert activation_kind(timm_layers.get_act_layer("relu6")()) == "relu6"
    assert activation_kind(timm_layers.get_act_layer("hard_swish")()) == "hardswish"
    assert activation_kind(timm_layers.get_act_layer("hard_sigmoid")()) == "hardsigmoid"
    from timm.layers import activations, activations_me

    for cls, kind in ((activations.Swish, "silu"), (activations.HardSwish, "hardswish"),
                      (activations.HardSigmoid, "hardsigmoid"), (activations.Sigmoid, "sigmoid"),
                      (activations_me.SwishMe, "silu"), (activations_me.HardSwishMe, "hardswish"),
                      (activations_me.HardSigmoidMe, "hardsigmoid")):
        assert activation_kind(cls()) == kind, cls
    assert activation_kind(activations.GELU()) is None and activation_kind(nn.GELU()) is None
    assert activation_kind(nn.LeakyReLU()) is None and activation_kind(nn.Hardtanh(-1, 1)) is None
    transformers_act = pytest.importorskip("transformers.activations")
    assert activation_kind(transformers_act.ACT2FN["swish"]) == "silu"
    assert activation_kind(transformers_act.ACT2FN["silu"]) == "silu"
    assert activation_kind(transformers_act.ACT2FN["relu6"]) == "relu6"
    assert activation_kind(transformers_act.ACT2FN["gelu"]) is None


def test_sync_batchnorm_blocks_still_fuse():
    """``SyncBatchNorm.convert_sync_batchnorm`` before convert(): eval with running stats is the same op."""
    tvm = pytest.importorskip("torchvision.models")
    x = torch.randn(2, 3, 64, 64)  # 64 px: the last stages keep 2x2 maps, so calibrated statistics are not degenerate
    model = calibrated(tvm.mobilenet_v3_small(), x)
    eager = copy.deepcopy(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    ek.convert(model, backend="torch")
    want, _ = expected({Sig("relu", ("relu", "hardsigmoid")): 1, Sig("relu", None): 2,
                        Sig("hardswish", ("relu", "hardsigmoid")): 8})
    assert len(ek.conversion_report(model).swapped) == want
    assert_converted_matches(eager, model, x, expect_blocks=want)
