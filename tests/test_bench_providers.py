"""benchmarks.providers: BatchNorm folding (eager-folded), compile-freeze and the fused+compile providers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import gate, models, network, providers
from benchmarks.providers import fold_batchnorms
from benchmarks.records import read_rows

from .test_convert_lookalikes import BatchNormAct2d, Conv2dSame  # timm's layouts

FAST = ["--device", "cpu", "--copy-mb", "1", "--warmup-iters", "1", "--warmup-s", "0", "--min-time-s", "0",
        "--min-iters", "2", "--max-iters", "2", "--quiet", "--buffers", "2"]
NEW = ("eager-folded", "compile-freeze", "fused-triton+compile", "fused-cuda+compile", "fused-torch+compile")
# On the CPU the triton and cuda providers run the torch backend (BACKEND_SUBSTITUTES): the three fused+compile
# providers are then one code path, so one of them runs end to end and the other two are only built.
SAME_ON_CPU = ("fused-triton+compile", "fused-cuda+compile")


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- look-alikes of the libraries' layouts
class Conv2dNormActivation(nn.Sequential):  # torchvision
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
        super().__init__(*(layers + ([nn.SiLU(inplace=True)] if act else [])))


class LookAlike(nn.Module):
    def __init__(self):
        super().__init__()
        self.tv = Conv2dNormActivation(3, 8, stride=2)
        self.conv_dw, self.bn_dw = Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False), BatchNormAct2d(8)
        self.conv_pw, self.bn_pw = nn.Conv2d(8, 6, 1, bias=True), BatchNormAct2d(6, apply_act=False)
        # a conv whose output is also read before its BatchNorm: folding it would change that read
        self.conv_tap, self.bn_tap = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x):
        x = self.bn_pw(self.conv_pw(self.bn_dw(self.conv_dw(self.tv(x)))))
        t = self.conv_tap(x)
        x = self.bn_tap(t) + 0.5 * t
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


def _calibrated(model, res):
    model.eval()
    return models.calibrate(model, res)


def _bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_fold_batchnorms_look_alikes_same_output_and_leaves_shared_outputs_alone():
    model = _calibrated(LookAlike(), 16)
    x = torch.randn(3, 3, 16, 16)
    folded = copy.deepcopy(model)
    assert fold_batchnorms(folded, x[:1]) == 3
    assert _bns(folded) == ["bn_tap"]  # its conv's output has a second reader
    assert isinstance(folded.tv[1], nn.Identity) and isinstance(folded.tv[2], nn.SiLU)
    assert isinstance(folded.bn_dw, nn.Sequential) and isinstance(folded.bn_dw[1], nn.SiLU)  # timm act kept
    assert folded.tv[0].bias is not None and folded.conv_pw.bias is not None
    with torch.no_grad():
        ref, out = model(x), folded(x)
        assert gate.rel_err(out, ref) < 1e-5
        assert gate.rel_err(model(torch.randn_like(x)), ref) > 0.1  # and the comparison is not blind


@pytest.mark.parametrize("name, res", [("b0", 32), ("tiny", 32)])
def test_fold_batchnorms_effnet_kernels_and_efficientnet_pytorch_models(name, res):
    if name == "tiny":
        pytest.importorskip("efficientnet_pytorch")
    model, _ = models.build_model(name, resolution=res)
    x = torch.randn(2, 3, res, res)
    folded = copy.deepcopy(model).to(memory_format=torch.channels_last)
    n = fold_batchnorms(folded, x[:1].contiguous(memory_format=torch.channels_last))
    assert n == len(_bns(model)) > 0 and _bns(folded) == []
    with torch.no_grad():
        ref = model(x)
        err = gate.rel_err(folded(x.contiguous(memory_format=torch.channels_last)), ref)
        eager_cl = gate.rel_err(copy.deepcopy(model).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)), ref)
    assert err < max(1e-5, 4 * eager_cl), (err, eager_cl)  # fp32 rounding, nothing more
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)  # layout kept


def test_new_providers_run_end_to_end_on_tiny_and_freezing_does_not_leak(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_pytorch")
    import torch._inductor.config as inductor_config

    # on the CPU the triton and cuda providers run the torch backend, so every provider runs here
    monkeypatch.setattr(providers, "BACKEND_SUBSTITUTES", {"triton": "torch", "cuda": "torch"})
    out = tmp_path / "r.csv"
    run = [name for name in NEW if name not in SAME_ON_CPU]
    argv = ["--models", "tiny", "--batches", "2", "--dtypes", "fp32", "--providers", "eager," + ",".join(run),
            "--out", str(out)] + FAST
    code = network.main(argv)
    rows = {r["provider"]: r for r in read_rows(out)}
    assert inductor_config.freezing is False
    assert code == 0, rows
    for name in run:
        r = rows[name]
        assert r["status"] == "ok", r
        assert float(r["max_rel_err"]) < 1e-4 and float(r["img_per_s"]) > 0
        if "fused" in name:
            assert "fp32 " in r["checks"] and "blocks 7/7 ok" in r["checks"], r["checks"]
    assert rows["eager-folded"]["note"].endswith("22 BatchNorms folded")


def test_the_other_fused_compile_providers_build_a_compiled_converted_model(monkeypatch):
    """What the end-to-end test leaves out on the CPU: each builds torch.compile over a converted model
    whose blocks use its backend (here its substitute), not compiled until first called."""
    from benchmarks.jobs import has_fused_blocks
    from effnet_kernels.nn import MBConv

    monkeypatch.setattr(providers, "BACKEND_SUBSTITUTES", {"triton": "torch", "cuda": "torch"})
    model, _ = models.build_model("tiny", calibrated=False)
    for name in SAME_ON_CPU:
        built = providers.get_provider(name).prepare(copy.deepcopy(model), torch.device("cpu"))
        assert providers.get_provider(name).compiles
        assert isinstance(built, torch._dynamo.eval_frame.OptimizedModule), type(built)
        assert has_fused_blocks(built)
        assert {m.backend for m in providers.unwrap(built).modules() if isinstance(m, MBConv)} == {"torch"}


def test_inference_only_providers_skip_training(tmp_path):
    pytest.importorskip("efficientnet_pytorch")
    out = tmp_path / "r.csv"
    argv = ["--models", "tiny", "--batches", "2", "--dtypes", "fp32", "--providers", "eager,eager-folded",
            "--modes", "infer,train", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    rows = {(r["provider"], r["mode"]): r["status"] for r in read_rows(out)}
    assert rows == {("eager", "infer"): "ok", ("eager", "train"): "ok", ("eager-folded", "infer"): "ok",
                    ("eager-folded", "train"): "skipped: eager-folded is inference-only"}
    assert providers.PROVIDERS["compile-freeze"].inference_only


def test_fused_compile_providers_skip_without_their_backend():
    if providers.BACKEND_SUBSTITUTES:
        pytest.skip("substitutes active")
    import effnet_kernels

    model = nn.Conv2d(3, 3, 1)
    for backend in ("triton", "cuda"):
        status = effnet_kernels.available_backends().get(backend)
        if status is not None and status.available:
            continue
        with pytest.raises(providers.ProviderSkipped, match=f"backend '{backend}' unavailable"):
            providers.get_provider(f"fused-{backend}+compile").prepare(model, torch.device("cpu"))


def test_provider_list_and_flags():
    for name in NEW:
        assert name in providers.PROVIDERS
    assert providers.PROVIDERS["eager-folded"].needs_example and not providers.PROVIDERS["eager-folded"].compiles
    assert all(providers.PROVIDERS[n].compiles for n in NEW[1:])
    args = network.parse_args(["--skip-compile"])
    assert args.providers and not any(providers.PROVIDERS[n].compiles for n, _ in args.providers)
    assert ("eager-folded", "channels_last") in args.providers
    assert providers.unwrap(torch.compile(nn.Identity())).__class__ is nn.Identity
