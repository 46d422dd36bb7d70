"""Fine-tuning with frozen BatchNorm: a training block whose BatchNorms are all in eval mode runs
the folded eval ops with autograd (:mod:`effnet_kernels._frozen_block`).

* blocks (expand + SE + residual with and without stochastic depth, stride 2, no expand, no SE,
  affine not trained; fp32, fp16, bf16, bf16 autocast) and a torchvision look-alike: output, loss,
  x's gradient and every parameter gradient by DESIGN's rule against an fp64 twin
  (``tests.parity.assert_parity``), and SGD steps by :func:`effnet_kernels.testing.train_step_parity`;
  the fused ops really ran, running statistics and ``num_batches_tracked`` unchanged;
* stochastic depth (efficientnet_pytorch's drop connect too) draws the original's samples under one seed;
* the folds: differentiable and uncached while autograd needs them, cached otherwise and never
  stale after an optimizer step;
* mixed frozen / training BatchNorms train eagerly and say why; unfrozen again, the block trains
  through the batch-statistics fused path;
* torch.compile(fullgraph=True) traces the frozen path;
* this package's B0 with every BatchNorm frozen, end to end;
* negative controls: every planted defect fails the check.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import models, testing
from effnet_kernels.blocks import MBConvBlock

from .defects import BACKEND_DEFECTS, planted
from .model_checks import assert_train_parity, calibrated
from .parity import assert_parity
from .test_convert_lookalikes import TvMBConv, lookalike_libraries  # noqa: F401  (the look-alikes' fixture)
from .test_ops_pointwise import _Ops
from .test_train_fused import BLOCKS

BN = nn.BatchNorm2d
# the blocks of test_train_fused, plus one whose BatchNorm affine is frozen too (requires_grad=False)
FROZEN_BLOCKS = dict(BLOCKS, expand_se_residual=dict(BLOCKS["expand_se_residual_drop"], drop_path_rate=0.0))


def freeze_bn(model: nn.Module, affine: bool = True) -> nn.Module:
    """Every BatchNorm of ``model`` in eval mode (its affine still trained unless ``affine=False``)."""
    for m in model.modules():
        if isinstance(m, BN):
            m.eval()
            if not affine:
                m.requires_grad_(False)
    return model


def frozen_run(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``train_step_parity``'s forward: it puts every model in train mode, this freezes the BatchNorms again."""
    return freeze_bn(m)(t)


def frozen_pair(cfg: dict, *, batch: int = 4, size: int = 8, backend: str = "torch", affine: bool = True,
                fmt=torch.contiguous_format):
    """An ``MBConvBlock`` calibrated on ``x`` and its converted twin, both training with frozen BatchNorm."""
    block = MBConvBlock(**cfg)
    x = torch.randn(batch, cfg["in_channels"], size, size).contiguous(memory_format=fmt)
    calibrated(block, x)
    fused = ek.convert(copy.deepcopy(block), backend=backend)
    assert isinstance(fused, ek.MBConv)
    return freeze_bn(block.train(), affine), freeze_bn(fused.train(), affine), x


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_frozen_step(eager: nn.Module, fused: nn.Module, x: torch.Tensor, *, seed: int = 0) -> None:
    """One training step of ``fused`` against an fp64 twin of ``eager`` (BatchNorms frozen in all three, the
    same seed for each forward), by DESIGN's rule with eager in fp32 the budget: output and the loss
    ``sum(out * P)`` (forward; in fp32 only: in fp16 / bf16 the loss, an fp64 sum of the output's errors judged
    one by one already, is the ratio of two random sums), x's gradient and every parameter gradient (backward);
    the buffers do not move."""
    ref = freeze_bn(copy.deepcopy(eager).to(torch.float64))
    before = bn_state(fused)
    runs = {}
    for key, m in (("fp64", ref), ("eager", eager), ("fused", fused)):
        xr = x.detach().to(torch.float64 if key == "fp64" else x.dtype).clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = m(xr)
        proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        loss = (out.double() * proj).sum()
        loss.backward()
        runs[key] = dict(output=out.detach(), loss=loss.detach(), x_grad=xr.grad,
                         **{n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert runs["fused"].keys() == runs["fp64"].keys(), "gradients of different parameters"
    for what, ref64 in runs["fp64"].items():
        if what == "loss" and x.dtype != torch.float32:
            continue
        kind = "forward" if what in ("output", "loss") else "backward"
        assert_parity(runs["fused"][what], ref64, runs["eager"][what], x.dtype, kind, what)
    after = bn_state(fused)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed in a frozen training step"


# ---------------------------------------------------------------- blocks
@pytest.mark.parametrize("name", list(FROZEN_BLOCKS))
def test_frozen_block_trains_fused_by_the_rule(name):
    eager, fused, x = frozen_pair(FROZEN_BLOCKS[name])
    assert fused.train_unfused_reason(x) is None
    assert_frozen_step(eager, fused, x)
    assert_train_parity(eager, fused, x, steps=2, forward=frozen_run)


def test_frozen_block_with_frozen_affine_trains_its_convs():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"], affine=False)
    assert fused.train_unfused_reason(x) is None
    assert_frozen_step(eager, fused, x)
    assert all(m.weight.grad is None and m.bias.grad is None for m in fused.modules() if isinstance(m, BN))


def test_frozen_block_channels_last():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["k5_s2_se"], fmt=torch.channels_last)
    assert_frozen_step(eager, fused, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["expand_se_residual_drop", "no_expand_se"])
def test_frozen_block_in_low_precision(name, dtype):
    eager, fused, x = frozen_pair(FROZEN_BLOCKS[name], batch=8)
    assert_frozen_step(freeze_bn(eager.to(dtype)), freeze_bn(fused.to(dtype)), x.to(dtype))


@pytest.mark.parametrize("name", ["expand_se_residual_drop", "expand_se_residual"])
def test_frozen_block_under_bf16_autocast(name):
    """Under autocast the block computes in bf16 from its first conv on and adds the residual in x's dtype (with
    a drawn mask or without one: the residual is never fused into the bf16 projection): within the rule
    against eager's bf16 autocast error."""
    eager, fused, x = frozen_pair(FROZEN_BLOCKS[name], batch=8)
    assert_train_parity(eager, fused, x, steps=2, dtype=torch.bfloat16, forward=frozen_run,
                        context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def assert_runs_the_frozen_ops(fused: nn.Module, x: torch.Tensor) -> None:
    """One training step of a frozen block with expand, SE and no drawn mask runs, forward, the four eval ops
    (the projection adding the residual) and, backward, the expand and depthwise outputs recomputed (the gate
    and squeeze are saved), then the four ops' backward functions, projection first; no BatchNorm, no aten conv."""
    xr = x.clone().requires_grad_()
    with _Ops() as fwd:
        out = fused(xr)
    with _Ops() as bwd:
        out.square().sum().backward()
    effnet = [n for n in fwd.names if n.startswith("effnet.")]
    assert effnet == ["effnet.pointwise_conv", "effnet.dwconv_bn_act", "effnet.se_gate", "effnet.pointwise_conv"]
    assert not any("batch_norm" in n or "convolution" in n for n in fwd.names + bwd.names), fwd.names + bwd.names
    assert [n for n in bwd.names if n.startswith("effnet.")] == [
        "effnet.pointwise_conv", "effnet.dwconv_bn_act", "effnet.pointwise_conv_backward",
        "effnet.se_gate_backward", "effnet.dwconv_bn_act_backward", "effnet.pointwise_conv_backward"], bwd.names


def test_frozen_block_runs_the_fused_ops_and_leaves_the_statistics():
    """Forward: the four eval kernels (expand, depthwise + squeeze, gate, projection with the residual
    when no mask is drawn); backward: two of them recomputed, then their backward ops; no BatchNorm,
    no aten conv."""
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"])
    before = bn_state(fused)
    assert_runs_the_frozen_ops(fused, x)
    assert all(torch.equal(b, before[n]) for n, b in fused.named_buffers())
    assert all(int(m.num_batches_tracked) == 1 for m in fused.modules() if isinstance(m, BN))  # the calibration's


# ---------------------------------------------------------------- memory by recompute
def test_what_autograd_saves_is_the_block_input_and_small_tensors():
    """Per image the frozen block saves its input, the SE squeeze and gate and the drop mask (the folds do
    not grow with the batch); the same block as differentiable folded ops (what it was before it recomputed:
    each op's autograd keeps its inputs, the expanded tensors) saves several times that, eager more still."""
    from benchmarks.memory import saved_bytes_per_image
    from effnet_kernels._frozen_block import _folded_ops_forward

    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual_drop"])
    c_in, mid = x.shape[1], fused.plan.dw.conv.out_channels

    class FoldedOps(nn.Module):  # the block through the folded ops' own autograd
        def forward(self, t):
            return _folded_ops_forward(fused.plan, t, (), {}, "torch")

    def make(n):
        return torch.randn(n, c_in, 16, 16)

    per_image = {name: saved_bytes_per_image(m, make, 4, frozen_bn=True).activation_bytes_per_image
                 for name, m in (("eager", eager), ("fused", fused), ("folded ops", FoldedOps()))}
    assert per_image["fused"] <= c_in * 16 * 16 * 4 + 2 * mid * 4 + 4, per_image  # x, squeeze + gate, mask
    assert per_image["folded ops"] > 3 * per_image["fused"], per_image
    assert per_image["fused"] <= 0.15 * per_image["eager"], per_image


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_and_gradient_accumulation(reentrant):
    """Two accumulated backward passes (stochastic depth drawing under two seeds) give eager's gradients,
    alike twice (deterministic), and alike inside ``torch.utils.checkpoint``, which reruns the forward."""
    from torch.utils.checkpoint import checkpoint

    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual_drop"], batch=8)
    batches = (x, torch.randn_like(x))

    def accumulated(m: nn.Module, wrap) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        grads = []
        for seed, t in enumerate(batches):
            t = t.clone().requires_grad_()
            torch.manual_seed(seed)
            wrap(m, t).square().mean().backward()
            grads.append(t.grad)
        return grads + [p.grad.clone() for p in m.parameters()]

    def plain(m, t):
        return m(t)

    def checkpointed(m, t):
        return checkpoint(m, t, use_reentrant=reentrant)

    want = accumulated(eager, plain)
    first, second, inside = accumulated(fused, plain), accumulated(fused, plain), accumulated(fused, checkpointed)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "two identical accumulations differ"
    for got in (first, inside):
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


def test_empty_batch_trains():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual_drop"])
    xr = x[:0].clone().requires_grad_()
    out = fused(xr)
    assert out.shape == xr.shape
    out.sum().backward()
    assert xr.grad.shape == xr.shape


def test_stochastic_depth_draws_the_originals_samples():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual_drop"], batch=16)
    outs = []
    for m in (eager, fused):
        torch.manual_seed(3)
        outs.append(m(x).detach())
    ye, yf = outs
    dropped = [bool((ye[i] - x[i]).abs().max() == 0) for i in range(16)]
    assert 2 <= sum(dropped) <= 14, "drop_path_rate 0.5 should drop some samples of 16 and keep some"
    assert [bool((yf[i] - x[i]).abs().max() == 0) for i in range(16)] == dropped
    torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5 * float(ye.abs().max()))
    # with a mask the projection does not add the residual itself (the mask goes between)
    with _Ops() as rec:
        torch.manual_seed(3)
        fused(x)
    assert "effnet.pointwise_conv" in rec.names and "aten.bernoulli_" in rec.names


def test_fold_is_differentiable_and_bypasses_the_cache_while_autograd_needs_it():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"])
    project, dw = fused.plan.post[0], fused.plan.dw
    weight, shift = project.folded()
    scale, dw_shift = dw.folded()
    assert all(t.grad_fn is not None for t in (weight, shift, scale, dw_shift))
    assert "_fold_cache" not in project.__dict__ and "_fold_cache" not in dw.__dict__
    assert project.folded()[0] is not weight  # folded afresh for every graph
    with torch.no_grad():
        cached = project.folded()
        assert project.folded() is cached and cached[0].grad_fn is None
    # the gradient reaches gamma through the fold as through eager BatchNorm
    (weight.sum() + shift.sum() + scale.sum() + dw_shift.sum()).backward()
    assert fused.project_bn.weight.grad is not None and fused.dw_bn.bias.grad is not None


def test_optimizer_step_then_forward_again_sees_the_new_weights():
    """The fold caches (filled by a no-grad forward) never serve folds of the weights before a step."""
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"])
    with torch.no_grad():
        before = fused(x)
    assert "_fold_cache" in fused.plan.post[0].__dict__ and "_fold_cache" in fused.plan.dw.__dict__
    for m in (eager, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        for mode in ("train", "eval"):
            for m in (eager, fused):
                freeze_bn(m.train(mode == "train"))
            ye, yf = eager(x), fused(x)
            assert (yf - before).abs().max() > 1e-3 * before.abs().max(), "the step did not change the output"
            torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5 * float(ye.abs().max()), msg=mode)
    assert_frozen_step(freeze_bn(eager.train()), freeze_bn(fused.train()), x)


def assert_compiled_training_matches(eager: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(fused, fullgraph=True)`` (aot_eager: the ops' fakes and autograd, no codegen) gives
    eager's output and input gradient in training, the same stochastic-depth draws seeded alike."""
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    runs = []
    for m in (eager, compiled):
        xr = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = m(xr)
        out.square().sum().backward()
        runs.append((out.detach(), xr.grad))
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_frozen_block_compiles_fullgraph():
    """torch.compile traces the frozen path in one graph."""
    assert_compiled_training_matches(*frozen_pair(FROZEN_BLOCKS["expand_se_residual_drop"], batch=8))


# ---------------------------------------------------------------- mixed modes
@pytest.mark.parametrize("frozen", [("project_bn",), ("expand_bn", "dw_bn")])
def test_mixed_frozen_and_training_batchnorms_train_eagerly(frozen):
    block = MBConvBlock(**FROZEN_BLOCKS["expand_se_residual"])
    x = torch.randn(4, 8, 8, 8)
    calibrated(block, x)
    fused = ek.convert(copy.deepcopy(block), backend="torch")
    for m in (block, fused):
        m.train()
        for name in frozen:
            getattr(m, name).eval()
    reason = fused.train_unfused_reason(x)
    assert reason is not None and "eval mode (frozen statistics)" in reason and "training" in reason, reason
    out = fused(x)
    assert "Recomputed" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, block(x))
    for (n, a), b in zip(block.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, msg=n)  # the training BatchNorms updated as eager's


def test_eval_batchnorm_without_running_statistics_trains_eagerly():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["k5_s2_se"])
    bn = fused.dw_bn
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    assert "without running statistics" in fused.train_unfused_reason(x)


def test_unfrozen_again_the_block_trains_with_batch_statistics():
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"])
    assert fused.train_unfused_reason(x) is None
    assert type(fused(x).grad_fn).__name__ == "RecomputedFrozenMBConvBackward"
    for m in (eager, fused):
        for bn in m.modules():
            if isinstance(bn, BN):
                bn.train()
    assert fused.train_unfused_reason(x) is None
    assert type(copy.deepcopy(fused)(x).grad_fn).__name__ == "RecomputedMBConvBackward"
    assert_train_parity(eager, fused, x, steps=1)


def test_efficientnet_pytorch_drop_connect_draws_the_originals_samples():
    """efficientnet_pytorch passes its drop-connect rate to each block's forward: frozen, every block trains
    fused and draws the original's numbers (fp32 outputs agree far closer than another seed's draws)."""
    from .test_convert_efficientnet_pytorch import build  # skips where efficientnet_pytorch does not import

    x = torch.randn(4, 3, 32, 32)
    ref = freeze_bn(calibrated(build("b0", image_size=32), x).train())
    assert ref._global_params.drop_connect_rate > 0
    model = freeze_bn(ek.convert(copy.deepcopy(ref), backend="torch").train())
    names = testing.fused_block_names(model)
    assert names and all(model.get_submodule(n).train_unfused_reason() is None for n in names)
    outs = []
    for seed, m in ((7, ref), (7, model), (8, ref)):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(m(x))
    same, other = (outs[1] - outs[0]).abs().max(), (outs[2] - outs[0]).abs().max()
    assert same <= 1e-4 * outs[0].abs().max() and other > 100 * same, (same, other)


# ---------------------------------------------------------------- a torchvision look-alike
def test_torchvision_lookalike_frozen_block(lookalike_libraries):
    x = torch.randn(4, 16, 8, 8)
    block = calibrated(TvMBConv(16, 16, 3, 1, 4), x)
    fused = ek.convert(copy.deepcopy(block), backend="torch")
    assert isinstance(fused, ek.MBConv)
    eager, fused = freeze_bn(block.train()), freeze_bn(fused.train())
    assert fused.train_unfused_reason(x) is None
    assert_frozen_step(eager, fused, x)


# ---------------------------------------------------------------- a network
def test_b0_with_frozen_batchnorm_trains_fused():
    torch.manual_seed(0)
    model = models.efficientnet("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    calibrated(model, x)
    fused = ek.convert(copy.deepcopy(model), backend="torch")
    names = testing.fused_block_names(fused)
    assert len(names) == 16
    freeze_bn(fused.train())
    # not blind: with frozen statistics an unrelated batch moves the logits far more than fp32's allowance
    testing.assert_sensitive(freeze_bn(copy.deepcopy(model).train()), x, testing.FP32_RELATIVE[testing.BACKWARD_FACTOR])
    assert all(fused.get_submodule(n).train_unfused_reason() is None for n in names)
    with _Ops() as rec:
        fused(x)
    assert rec.names.count("effnet.dwconv_bn_act") == 16, rec.names
    # the stem and the head (+ pool) fuse too: one op each, no BatchNorm anywhere
    # (pointwise_conv: 15 expand convs, 16 projections, the head)
    assert rec.names.count("effnet.conv_bn_act") == 1 and rec.names.count("effnet.pointwise_conv") == 32, rec.names
    assert "aten.native_batch_norm" not in rec.names
    # one step: at lr 0.01 the second overflowed in every run (it compared inf with inf: blind), and at
    # lr 1e-3 - 1e-4 it is chaotic (eager fp32 up to 130x off fp64); the blocks take two (above)
    assert_train_parity(model, fused, x, steps=1, per_tensor=False, forward=frozen_run)


# ---------------------------------------------------------------- negative controls
@pytest.mark.parametrize("defect", list(BACKEND_DEFECTS) + ["drop_residual"])
def test_negative_controls(defect):
    """Every planted op defect (the eval ops': residual_shift included) and a dropped residual fail the check."""
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"])
    assert_frozen_step(copy.deepcopy(eager), copy.deepcopy(fused), x)  # clean: passes
    with planted(defect), pytest.raises(AssertionError):
        assert_frozen_step(eager, fused, x)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_bn", "batch_stats"])
def test_backward_called_inside_the_autocast_region(frozen):
    """``loss.backward()`` inside ``torch.autocast`` (not recommended by PyTorch, but it runs eagerly): the
    block's backward runs its ops in the dtypes the forward chose, as eager's do, and agrees with eager's."""
    from tests.test_train_fused import _pair

    if frozen:
        eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"], batch=8)
    else:
        eager, fused, x = _pair(FROZEN_BLOCKS["expand_se_residual"], batch=8)
    grads = []
    for model in (eager, fused):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xr)
            assert "Recomputed" in type(out.grad_fn).__name__ or model is eager
            out.float().square().mean().backward()
        grads.append([xr.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.05 * float(a.abs().max()))
