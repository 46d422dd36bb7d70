"""Stems and heads of model attributes (second CI env, ``-m adapters``): timm's ``conv_stem`` + ``bn1``
and ``conv_head`` + ``bn2`` (``forward_features``), efficientnet_pytorch's ``_conv_stem`` + ``_bn0`` +
``_swish`` and ``_conv_head`` + ``_bn1`` + ``_swish`` (``extract_features``), transformers' stem
container (``EfficientNetEmbeddings``: zero pad, conv, BN, activation) and its head (``top_conv`` +
``top_bn`` + ``top_activation``, ``EfficientNetEncoder.forward``); timm's ``features_only`` stems (with
``feature_location="expansion"``: the feature hooks still collect).

Calibrated models at random init: each chain is one op (counted at dispatch), its output by the
DESIGN rule against fp64 in fp32 and bf16 (chain by chain: the precise check; the network end to end
is in the adapters' own suites), the modules the same objects and the keys unchanged; a replaced
module is honoured; training with batch statistics runs the modules (running statistics as eager);
gradient checkpointing, convert twice, revert, deepcopy, pickle, filter_fn, float64, a subclass that
overrides the method, torch.compile(fullgraph=True), ``nn.DataParallel``'s replicas (PyTorch's replicate
with the broadcast emulated on the CPU). Negative controls: the stem one pixel off, the head without its
activation, TF "same" on the wrong side, replicas sharing the original's fused methods.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sys
import zlib
from unittest import mock

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import testing
from effnet_kernels.sibling_stems import FusedMethod, fused_methods

from .defects import planted
from .model_checks import calibrated
from .test_ops_pointwise import _calls

pytestmark = pytest.mark.adapters

timm = pytest.importorskip("timm")
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
transformers = pytest.importorskip("transformers")
from timm.models.efficientnet import EfficientNet as TimmEfficientNet  # noqa: E402

from .test_convert_huggingface import b0_config, build as build_hf  # noqa: E402

# name -> (builder, method, {chain: conv attribute}, input size)
MODELS = {
    "timm_b0": (lambda: timm.create_model("efficientnet_b0"), "forward_features",
                {"stem": "conv_stem", "head": "conv_head"}, 64),
    "timm_tf_b0": (lambda: timm.create_model("tf_efficientnet_b0"), "forward_features",  # Conv2dSame stem
                   {"stem": "conv_stem", "head": "conv_head"}, 64),
    "timm_mobilenetv3": (lambda: timm.create_model("mobilenetv3_large_100"), "forward_features",
                         {"stem": "conv_stem"}, 64),  # + its last stage's ConvBnAct block (CONV_BN_ACT)
    "timm_mixnet_s": (lambda: timm.create_model("mixnet_s"), "forward_features",
                      {"stem": "conv_stem", "head": "conv_head"}, 64),
    "ep_b0_static": (lambda: efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0"), "extract_features",
                     {"stem": "_conv_stem", "head": "_conv_head"}, 64),
    "ep_b0_dynamic": (lambda: efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", image_size=None),
                      "extract_features", {"stem": "_conv_stem", "head": "_conv_head"}, 46),  # even: the stem pads (0, 1)
}
#: timm ConvBnAct blocks (conv + BatchNormAct2d, fused in their forward) -> their conv's name
CONV_BN_ACT = {"timm_mobilenetv3": ["blocks.6.0.conv"]}


def _pair(name: str, seed: int = 0):
    build, method, chains, size = MODELS[name]
    torch.manual_seed(seed)
    x = torch.randn(2, 3, size, size)
    eager = calibrated(build(), x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch"), x


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _pair(name)
        return cache[name]

    return get


def _chain_input(model: nn.Module, chain: str, x: torch.Tensor) -> torch.Tensor:
    """What the chain sees in the model's forward: the image (stem), the last block's output (head)."""
    if chain == "stem":
        return x
    with torch.no_grad():
        if hasattr(model, "_blocks"):  # efficientnet_pytorch: the head's input is the last block's output
            feats = {}
            handle = model._blocks[-1].register_forward_hook(lambda m, i, o: feats.setdefault("h", o))
            model(x)
            handle.remove()
            return feats["h"]
        return model.blocks(model.bn1(model.conv_stem(x)))


class _Chain(nn.Module):
    """One chain of a model as a module: the fused method's op, or the modules in sequence (unconverted)."""

    def __init__(self, model: nn.Module, method: str, chain: str) -> None:
        super().__init__()
        self.model, self.method, self.chain = model, method, chain

    def forward(self, x):
        fused = fused_methods(self.model).get(self.method)
        if fused is not None:
            return fused.run_chain(self.chain, x)
        from effnet_kernels.convert import _adapters, _method_specs

        spec = next(s for s in _method_specs(list(_adapters())) if s.matches(self.model))
        return spec.chain(self.chain).run_unfused(self.model, x)


def _chain_parity(eager, converted, name: str, chain: str, x, dtype=torch.float32) -> testing.ParityResult:
    method = MODELS[name][1]
    h = _chain_input(eager, chain, x)
    e, c = _Chain(eager, method, chain), _Chain(converted, method, chain)
    ref = copy.deepcopy(e).to(torch.float64)
    if dtype != torch.float32:
        e, c = copy.deepcopy(e).to(dtype), copy.deepcopy(c).to(dtype)
    return testing.model_parity(e, c, h.to(dtype), dtype=dtype, reference=ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_chain_is_one_op_and_the_modules_stay(name, pairs):
    eager, converted, x = pairs(name)
    _, method, chains, _ = MODELS[name]
    report = ek.conversion_report(converted)
    assert report.fused_convs == list(chains.values()) + CONV_BN_ACT.get(name, []), report
    assert all(k.startswith(("blocks.", "_blocks.")) for k in report.skipped), report  # MixNet's MixedConv2d blocks
    assert list(converted.state_dict()) == list(eager.state_dict())
    fused = vars(converted)[method]
    assert isinstance(fused, FusedMethod) and fused.model is converted and method not in vars(eager)
    for chain, conv in chains.items():
        assert fused.unfused_reason(chain, x) is None
        assert type(getattr(converted, conv)) is type(getattr(eager, conv))  # the modules are not swapped
        names, _ = _calls(_Chain(converted, method, chain), _chain_input(eager, chain, x))
        assert names == ["effnet.conv_bn_act" if chain == "stem" else "effnet.pointwise_conv"], names
    if not report.skipped:
        names, _ = _calls(converted, x)
        assert not [n for n in names if "batch_norm" in n], names  # every BatchNorm is inside an op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_chain_parity(name, dtype, pairs):
    eager, converted, x = pairs(name)
    for chain in MODELS[name][2]:
        result = _chain_parity(eager, converted, name, chain, x, dtype)
        assert result.ok, f"{chain}: {result}"


@pytest.mark.parametrize("name, chain, defect", [
    ("timm_b0", "stem", "conv_pad_shift"), ("ep_b0_static", "stem", "conv_pad_shift"),
    ("timm_b0", "head", "pointwise_skip_act"), ("ep_b0_dynamic", "head", "pointwise_skip_act"),
    ("timm_tf_b0", "stem", "tf_same_swap"), ("ep_b0_dynamic", "stem", "tf_same_swap"),
])
def test_negative_control_chain_check_rejects_defect(name, chain, defect, pairs):
    eager, converted, x = pairs(name)
    assert _chain_parity(eager, converted, name, chain, x).ok
    with planted(defect):
        result = _chain_parity(eager, converted, name, chain, x)
    assert not result.ok, result


@pytest.fixture(scope="module")
def hf_pair():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(build_hf(b0_config()), x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch"), x


def _dtype_parity(e: nn.Module, c: nn.Module, h: torch.Tensor, dtype: torch.dtype) -> testing.ParityResult:
    ref = copy.deepcopy(e).double()
    if dtype != torch.float32:
        e, c = copy.deepcopy(e).to(dtype), copy.deepcopy(c).to(dtype)
    return testing.model_parity(e, c, h.to(dtype), dtype=dtype, reference=ref)


def test_huggingface_stem_is_one_op(hf_pair):
    eager, converted, x = hf_pair
    assert ek.conversion_report(converted).fused_convs == ["efficientnet.embeddings", "efficientnet.encoder.top_conv"]
    stem, eager_stem = converted.efficientnet.embeddings, eager.efficientnet.embeddings
    assert isinstance(stem, ek.FusedConvBNAct) and stem.padding.padding == (0, 1, 0, 1) and stem.out_dim == 32
    assert _calls(stem, x)[0] == ["effnet.conv_bn_act"]
    assert list(converted.state_dict()) == list(eager.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        result = _dtype_parity(eager_stem, stem, x, dtype)
        assert result.ok, result
    with planted("conv_pad_shift"):
        assert not testing.model_parity(eager_stem, stem, x).ok
    back = ek.revert(copy.deepcopy(converted))
    assert type(back.efficientnet.embeddings).__name__ == "EfficientNetEmbeddings"


def _hf_head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's input: the last block's output."""
    feats = {}
    handle = model.efficientnet.encoder.blocks[-1].register_forward_hook(lambda m, i, o: feats.setdefault("h", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return feats["h"]


def test_huggingface_head_is_one_op_in_the_encoders_forward(hf_pair):
    """top_conv + top_bn + top_activation: siblings the encoder's forward runs, fused through it."""
    eager, converted, x = hf_pair
    encoder, eager_encoder = converted.efficientnet.encoder, eager.efficientnet.encoder
    assert isinstance(vars(encoder)["forward"], FusedMethod) and "forward" not in vars(eager_encoder)
    assert type(encoder.top_conv) is nn.Conv2d and type(encoder.top_bn) is nn.BatchNorm2d  # not swapped
    h = _hf_head_input(eager, x)
    c, e = _Chain(encoder, "forward", "head"), _Chain(eager_encoder, "forward", "head")
    assert _calls(c, h)[0] == ["effnet.pointwise_conv"]
    for dtype in (torch.float32, torch.bfloat16):
        result = _dtype_parity(e, c, h, dtype)
        assert result.ok, result
    with planted("pointwise_skip_act"):
        assert not testing.model_parity(e, c, h).ok
    with torch.no_grad():  # the encoder's other outputs: every block's output, the tuple form
        want, got = eager(x, output_hidden_states=True), converted(x, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == 17
        for a, b in zip(want.hidden_states, got.hidden_states):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
        plain = converted(x, return_dict=False)
        assert isinstance(plain, tuple) and torch.equal(plain[0], converted(x).logits)
    back = ek.revert(copy.deepcopy(converted))
    assert "forward" not in vars(back.efficientnet.encoder)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, eager(x).logits)


def test_huggingface_compiled_fullgraph(hf_pair):
    _, converted, x = hf_pair
    with torch.no_grad():
        want = converted(x).logits
        got = torch.compile(converted, fullgraph=True, backend="aot_eager")(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_a_replaced_module_is_honoured():
    eager, converted, x = _pair("timm_b0")
    for m in (eager, converted):
        m.bn1.act = nn.ReLU6()
        m.conv_head = nn.Conv2d(320, 1280, 1, bias=False)
    torch.nn.init.normal_(eager.conv_head.weight, std=0.05)
    converted.conv_head.weight.data.copy_(eager.conv_head.weight)
    assert converted.forward_features.unfused_reason("stem", x) is None  # still one op, now with relu6
    assert converted.forward_features.unfused_reason("head", x) is None
    assert testing.model_parity(eager, converted, x).ok
    for m in (eager, converted):
        m.bn1.act = nn.GELU()
    assert "GELU" in converted.forward_features.unfused_reason("stem", x)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), eager(x), rtol=1e-4, atol=1e-4 * eager(x).abs().max().item())


def test_training_with_batch_statistics_runs_the_modules():
    eager, converted, x = _pair("ep_b0_static")
    eager.train(), converted.train()
    assert converted.extract_features.unfused_reason("stem", x) == "training"
    torch.manual_seed(5)
    eager(x)
    torch.manual_seed(5)
    converted(x)
    for bn in ("_bn0", "_bn1"):
        torch.testing.assert_close(getattr(converted, bn).running_var, getattr(eager, bn).running_var)
        assert int(getattr(converted, bn).num_batches_tracked) == int(getattr(eager, bn).num_batches_tracked)


def test_gradient_checkpointing_is_honoured():
    """timm's set_grad_checkpointing: the copied body checkpoints the blocks as timm's does (frozen stem fused)."""
    eager, converted, x = _pair("timm_b0")
    for m in (eager, converted):
        m.train()
        m.set_grad_checkpointing(True)
        m.bn1.eval()  # the stem's BatchNorm frozen: the fused op runs in training, with autograd
    assert converted.forward_features.unfused_reason("stem", x) is None
    calls = []
    checkpoint_seq = TimmEfficientNet.forward_features.__globals__["checkpoint_seq"]

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint_seq(*args, **kwargs)

    TimmEfficientNet.forward_features.__globals__["checkpoint_seq"] = counting
    try:
        grads = []
        for m in (eager, converted):
            torch.manual_seed(7)
            m(x).square().mean().backward()
            grads.append(m.conv_stem.weight.grad)
    finally:
        TimmEfficientNet.forward_features.__globals__["checkpoint_seq"] = checkpoint_seq
    assert len(calls) == 2
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * grads[0].abs().max().item())


def test_convert_twice_revert_deepcopy_pickle_filter():
    eager, converted, x = _pair("ep_b0_static")
    with torch.no_grad():
        want = converted(x)
    again = ek.convert(converted, backend="torch")
    assert {"_conv_stem", "_conv_head"} <= set(ek.conversion_report(again).already_fused)
    for other in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert other.extract_features.model is other
        with torch.no_grad():
            torch.testing.assert_close(other(x), want)
    ek.revert(converted)
    assert "extract_features" not in vars(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), eager(x))
    filtered = ek.convert(copy.deepcopy(eager), backend="torch", filter_fn=lambda m, n: n != "_conv_stem")
    report = ek.conversion_report(filtered)
    assert report.filtered_out == ["_conv_stem"] and report.fused_convs == ["_conv_head"]
    assert "filter_fn" in filtered.extract_features.unfused_reason("stem", x)
    assert _calls(_Chain(filtered, "extract_features", "stem"), x)[0][0] != "effnet.conv_bn_act"


def test_float64_runs_the_modules_and_a_pinned_kernel_backend_refuses_it():
    eager, converted, x = _pair("timm_mobilenetv3")
    eager64, converted64 = copy.deepcopy(eager).double(), copy.deepcopy(converted).double()
    assert "float64" in converted64.forward_features.unfused_reason("stem", x.double())
    with torch.no_grad():
        torch.testing.assert_close(converted64(x.double()), eager64(x.double()))
    pinned = ek.convert(copy.deepcopy(eager).double(), backend="triton")
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        pinned(x.double())


def test_a_changed_method_is_left_alone():
    """A subclass overriding forward_features, or a library function whose names differ from the copy's."""
    class Custom(TimmEfficientNet):
        def forward_features(self, x):
            return super().forward_features(x) * 2

    torch.manual_seed(0)
    base = timm.create_model("efficientnet_b0")
    model = Custom.__new__(Custom)
    model.__dict__ = copy.deepcopy(base).__dict__
    ek.convert(model, backend="torch")
    assert not fused_methods(model) and not ek.conversion_report(model).fused_convs
    from effnet_kernels.integrations import timm as timm_adapter

    spec = timm_adapter.METHOD_SPECS[0]
    assert spec.matches(base) and not dataclasses.replace(spec, names=spec.names + ("forward_head",)).matches(base)


def test_compiled_converted_model_fullgraph(pairs):
    _, converted, x = pairs("timm_b0")
    with torch.no_grad():
        want = converted(x)
        got = torch.compile(converted, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


class _Feature(nn.Module):
    """Feature map ``index`` of a timm ``features_only`` model, as a module the parity helpers take."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x):
        return self.model(x)[self.index]


@pytest.mark.parametrize("location", ["", "expansion"])
@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_features_only(name, location):
    """EfficientNetFeatures / MobileNetV3Features: the stem fused in their forward; with
    feature_location="expansion" the feature hooks on the expand convs still collect (those blocks
    run their modules), every feature map by the rule."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    kwargs = {"feature_location": location} if location else {}
    eager = calibrated(timm.create_model(name, features_only=True, **kwargs), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    assert ek.conversion_report(converted).fused_convs[0] == "conv_stem"
    assert _calls(_Chain(converted, "forward", "stem"), x)[0] == ["effnet.conv_bn_act"]
    blocks = [m for m in converted.modules() if isinstance(m, ek.MBConv)]
    hooked = [b for b in blocks if b.hooks_reason() is not None]
    assert (len(hooked) > 0) == (location == "expansion")
    assert all("forward pre hook" in b.hooks_reason() or "forward hook" in b.hooks_reason() for b in hooked)
    with torch.no_grad():
        n = len(eager(x))
        assert len(converted(x)) == n == 5
    for i in range(n):
        result = testing.model_parity(_Feature(eager, i), _Feature(converted, i), x)
        testing.assert_sensitive(_Feature(eager, i), x, result.limit / max(result.ref_scale, 1e-30))
        assert result.ok, f"feature {i}: {result}"
    with planted("conv_pad_shift"):
        assert not testing.model_parity(_Feature(eager, 0), _Feature(converted, 0), x).ok


def _replicate(model: nn.Module, copies: int = 2) -> list[nn.Module]:
    """``torch.nn.parallel.replicate`` (what ``nn.DataParallel`` runs each forward) on the CPU: the
    broadcast to each device is a clone per replica, the rest is PyTorch's own code."""
    replicate = sys.modules["torch.nn.parallel.replicate"]

    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    with mock.patch.object(replicate, "_broadcast_coalesced_reshape", broadcast), \
            mock.patch.object(replicate, "_get_device_index", lambda device, optional=False: 0):
        return replicate.replicate(model, list(range(copies)), detach=True)


def _jitter_running_var(model: nn.Module) -> None:
    """Each BatchNorm's running variance times factors in [0.7, 1.4], the same for the same module name."""
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            factor = 2.0 ** (torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var = m.running_var * factor  # a replica's buffers are plain attributes


def _changed_replica_parity(eager: nn.Module, converted: nn.Module, x: torch.Tensor) -> testing.ParityResult:
    """Replica 1 of ``converted`` with its BatchNorms changed, against ``eager`` changed alike."""
    replicas = _replicate(converted)
    changed = copy.deepcopy(eager)
    _jitter_running_var(changed)
    _jitter_running_var(replicas[1])
    result = testing.model_parity(changed, replicas[1], x)
    testing.assert_sensitive(changed, x, result.limit / max(result.ref_scale, 1e-30))
    assert testing.model_parity(eager, replicas[0], x).ok and not testing.model_parity(eager, changed, x).ok
    return result


@pytest.mark.parametrize("name", ["timm_b0", "timm_mobilenetv3", "ep_b0_static", "hf"])
def test_data_parallel_replicas_run_their_own_modules(name, pairs, hf_pair):
    """Each replica's fused methods are bound to the replica: with its BatchNorms changed, a replica
    matches an eager model changed alike, by the rule, and the original is untouched."""
    eager, converted, x = hf_pair if name == "hf" else pairs(name)
    with torch.no_grad():
        before = testing._first_tensor(converted(x))
    for replica in _replicate(converted):
        owners = [m for m in replica.modules() if fused_methods(m)]
        assert owners and all(f.model is m for m in owners for f in fused_methods(m).values())
    result = _changed_replica_parity(eager, converted, x)
    assert result.ok, result
    with torch.no_grad():
        torch.testing.assert_close(testing._first_tensor(converted(x)), before, rtol=0, atol=0)


def test_negative_control_shared_fused_methods_are_caught(pairs):
    """Without the replica binding (every replica sharing the original's fused methods, as a plain
    shallow copy does), the replica's parity check fails."""
    from effnet_kernels.sibling_stems import ReplicaBinding

    def unbound(self):
        return type(self.module)._replicate_for_data_parallel(self.module)

    eager, converted, x = pairs("timm_b0")
    with mock.patch.object(ReplicaBinding, "__call__", unbound):
        result = _changed_replica_parity(eager, converted, x)
    assert not result.ok, result


def test_revert_removes_the_replica_binding(pairs):
    _, converted, _ = pairs("timm_mobilenetv3")
    back = ek.revert(copy.deepcopy(converted))
    assert not any("_replicate_for_data_parallel" in vars(m) or fused_methods(m) for m in back.modules())
    assert "_replicate_for_data_parallel" in vars(converted)


@pytest.mark.parametrize("name", ["timm_b0", "ep_b0_static"])
def test_torch_func_grad_runs_the_chains_modules(name, pairs):
    """Under ``torch.func.grad`` the fused methods' chains run their modules (the ops have no functorch
    rules): the converted model's parameter gradients are eager's."""
    from torch.func import functional_call, grad

    eager, converted, x = (copy.deepcopy(m) for m in pairs(name))
    if name.startswith("ep_"):  # its memory-efficient swish is an autograd.Function without functorch support
        eager.set_swish(memory_efficient=False), converted.set_swish(memory_efficient=False)

    def loss(params, model):
        return functional_call(model, params, (x,)).square().mean()

    want = grad(loss)({k: v.detach() for k, v in eager.named_parameters()}, eager)
    got = grad(loss)({k: v.detach() for k, v in converted.named_parameters()}, converted)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6 * float(want[key].abs().max()))


def test_set_fused_method_refuses_a_method_of_another_module(pairs):
    from effnet_kernels.sibling_stems import set_fused_method

    _, converted, _ = pairs("timm_b0")
    with pytest.raises(ValueError, match="bound to another module"):
        set_fused_method(copy.deepcopy(converted), converted.forward_features)
