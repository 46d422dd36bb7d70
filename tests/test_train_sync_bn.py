"""SyncBatchNorm in converted blocks (issue #11 item 4): statistics over a process group, fused.

* The ops the synchronised block is made of: ``dwconv_bn_stats`` and the backward's halves
  ``dwconv_bn_grad_sums`` / ``dwconv_bn_input_grads`` on every backend (the CUDA sources through
  the host shim, Triton through its interpreter): run on two halves of a batch, with the halves'
  sums added, they give the full batch's statistics and gradients (what a process group of two
  computes), against the fp64 reference of the full batch; with this batch's own sums they are the
  one-process backward, bit for bit; opcheck; errors.
* Two gloo processes with batches of different sizes (and one empty), a converted network whose
  BatchNorms are SyncBatchNorms: outputs, input gradients, every parameter gradient summed over
  the processes and the running statistics after two SGD steps match one process running the
  unconverted network on the concatenated batch in fp64 (the fp32 rule of DESIGN: 1e-5 relative
  forward, 1e-4 backward). PyTorch's own SyncBatchNorm only synchronises on GPUs, so these
  processes let the fused block synchronise on the CPU (``_sync_bn.sync_devices`` patched): the
  arithmetic and the collectives are the ones that run on a GPU.
* Negative controls: normalising with this process's statistics, or taking the backward's sums
  from this process alone, fails the same check.
* Where PyTorch's SyncBatchNorm raises (CPU tensors in a process group) the converted block raises
  the same error; without a process group it trains fused, as BatchNorm2d.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import effnet_kernels as ek
from effnet_kernels import _sync_bn, _train_block, cuda_host, reference, testing
from effnet_kernels.blocks import MBConvBlock
from tests.environments import gloo_group, triton_interpreted

EPS = 1e-3
BACKENDS = ["torch", "triton", "cuda"]


@contextlib.contextmanager
def served_by(backend: str):
    """``backend`` can serve CPU tensors inside the block: Triton through its interpreter, the CUDA
    sources through the host shim."""
    if backend == "torch":
        yield
        return
    if backend == "triton":
        with triton_interpreted():
            yield
        return
    with cuda_host.as_cuda_backend():
        yield


# ---------------------------------------------------------------- the ops
def _op_case(dtype=torch.float32, channels_last=False, device="cpu"):
    torch.manual_seed(11)
    x = torch.randn(5, 6, 9, 8) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 3)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    return (x.to(device, dtype), w.to(device, dtype), gamma.to(device), beta.to(device), [2, 1], [1, 1, 0, 2])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_halves_of_a_batch_give_the_whole_batch(backend, channels_last):
    _check_halves(backend, channels_last, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_halves_of_a_batch_give_the_whole_batch(backend):
    _check_halves(backend, True, "cuda")
    _check_halves(backend, False, "cuda")


def _check_halves(backend: str, channels_last: bool, device: str) -> None:
    """Statistics and backward of a batch from its two halves, the halves' sums added."""
    x, w, gamma, beta, stride, pad = _op_case(channels_last=channels_last, device=device)
    halves = (x[:3], x[3:])
    ops = torch.ops.effnet
    # fp64 reference of the whole batch: its statistics, its backward
    x64, w64, g64, b64 = (t.cpu().double() for t in (x, w, gamma, beta))
    mean64, var64 = reference.dwconv_bn_stats(x64, w64, stride, pad)
    y64 = reference.dwconv_bn_act_train(x64, w64, g64, b64, mean64, var64, EPS, stride, pad, "silu", True)[0]
    gy = torch.randn(y64.shape)
    gp = torch.randn(x.shape[0], 6)
    want = reference.dwconv_bn_act_train_backward(gy.double(), gp.double(), x64, w64, g64, b64, mean64, var64, EPS,
                                                  stride, pad, "silu")
    gy, gp = gy.to(device), gp.to(device)
    with served_by(backend if device == "cpu" else "torch"):
        stats = [ops.dwconv_bn_stats(h, w, stride, pad, backend) for h in halves]
        counts = [h.shape[0] * y64.shape[2] * y64.shape[3] for h in halves]
        # combine as _sync_bn.group_moments does, here by hand
        total = sum(counts)
        mean = sum(c * m.double() for c, (m, _) in zip(counts, stats)) / total
        var = sum(c * (v.double() + (m.double() - mean) ** 2) for c, (m, v) in zip(counts, stats)) / total
        torch.testing.assert_close(mean.cpu(), mean64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.cpu(), var64, rtol=1e-5, atol=1e-6)
        mean, var = mean.float(), var.float()
        gys, gps = (gy[:3], gy[3:]), (gp[:3], gp[3:])
        sums = [ops.dwconv_bn_grad_sums(gy_, gp_, h, w, gamma, beta, mean, var, EPS, stride, pad, "silu", backend)
                for gy_, gp_, h in zip(gys, gps, halves)]
        sum_gx, sum_g = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
        torch.testing.assert_close(sum_gx.cpu().double(), want[2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sum_g.cpu().double(), want[3], rtol=1e-4, atol=1e-4)
        parts = [ops.dwconv_bn_input_grads(gy_, gp_, h, w, gamma, beta, mean, var, sum_gx, sum_g, total, EPS, stride,
                                           pad, "silu", backend) for gy_, gp_, h in zip(gys, gps, halves)]
    grad_x = torch.cat([p[0] for p in parts]).cpu()
    grad_w = (parts[0][1] + parts[1][1]).cpu()
    scale_x, scale_w = float(want[0].abs().max()), float(want[1].abs().max())
    assert float((grad_x.double() - want[0]).abs().max()) <= 1e-4 * scale_x
    assert float((grad_w.double() - want[1]).abs().max()) <= 1e-4 * scale_w
    assert grad_x.dtype == x.dtype and parts[0][0].is_contiguous(memory_format=torch.channels_last) == channels_last
    # negative control: the halves' own counts (no group) give a different gradient
    with served_by(backend if device == "cpu" else "torch"):
        alone = ops.dwconv_bn_input_grads(gys[0], gps[0], halves[0], w, gamma, beta, mean, var, sum_gx, sum_g,
                                          counts[0], EPS, stride, pad, "silu", backend)[0]
    assert float((alone.cpu().double() - want[0][:3]).abs().max()) > 1e-2 * scale_x


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_halves_with_this_batch_alone_are_the_backward_bit_for_bit(backend):
    x, w, gamma, beta, stride, pad = _op_case(torch.float16, channels_last=True)
    ops = torch.ops.effnet
    with served_by(backend):
        mean, var = ops.dwconv_bn_stats(x, w, stride, pad, backend)
        _, _, mean_t, var_t = ops.dwconv_bn_act_train(x, w, gamma, beta, None, None, EPS, stride, pad, "silu", False,
                                                      backend)
        assert torch.equal(mean, mean_t) and torch.equal(var, var_t)
        gy = torch.randn(x.shape[0], 6, 5, 8).half()
        full = ops.dwconv_bn_act_train_backward(gy, None, x, w, gamma, beta, mean, var, EPS, stride, pad, "hardswish",
                                                backend)
        sum_gx, sum_g = ops.dwconv_bn_grad_sums(gy, None, x, w, gamma, beta, mean, var, EPS, stride, pad, "hardswish",
                                                backend)
        gx, gw = ops.dwconv_bn_input_grads(gy, None, x, w, gamma, beta, mean, var, sum_gx, sum_g, x.shape[0] * 5 * 8,
                                           EPS, stride, pad, "hardswish", backend)
    for got, want in zip((gx, gw, sum_gx, sum_g), full):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ops_take_an_empty_batch(backend):
    x, w, gamma, beta, stride, pad = _op_case()
    x = x[:0]
    ops = torch.ops.effnet
    with served_by(backend):
        mean, var = ops.dwconv_bn_stats(x, w, stride, pad, backend)
        sum_gx, sum_g = ops.dwconv_bn_grad_sums(torch.randn(0, 6, 5, 8), None, x, w, gamma, beta, gamma, beta, EPS,
                                                stride, pad, "silu", backend)
        gx, gw = ops.dwconv_bn_input_grads(torch.randn(0, 6, 5, 8), None, x, w, gamma, beta, gamma, beta, gamma, beta,
                                           10, EPS, stride, pad, "silu", backend)
    assert torch.equal(mean, torch.zeros(6)) and torch.equal(var, torch.zeros(6))
    assert torch.equal(sum_gx, torch.zeros(6)) and torch.equal(sum_g, torch.zeros(6))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


def test_opcheck_the_synchronised_pieces():
    x, w, gamma, beta, stride, pad = _op_case()
    ops = torch.ops.effnet
    torch.library.opcheck(ops.dwconv_bn_stats.default, (x, w, stride, pad, "torch"))
    mean, var = ops.dwconv_bn_stats(x, w, stride, pad, "torch")
    gy, gp = torch.randn(5, 6, 5, 8), torch.randn(5, 6)
    bwd = (gy, gp, x, w, gamma, beta, mean, var)
    torch.library.opcheck(ops.dwconv_bn_grad_sums.default, (*bwd, EPS, stride, pad, "silu", "torch"))
    torch.library.opcheck(ops.dwconv_bn_input_grads.default,
                          (*bwd, gamma, beta, 1000, EPS, stride, pad, "relu6", "torch"))


def test_the_pieces_name_bad_arguments():
    x, w, gamma, beta, stride, pad = _op_case()
    ops = torch.ops.effnet
    mean, var = ops.dwconv_bn_stats(x, w, stride, pad, "torch")
    bwd = (torch.randn(5, 6, 5, 8), None, x, w, gamma, beta, mean, var)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.dwconv_bn_stats(x, w[:3], stride, pad, "torch")
    with pytest.raises(ValueError, match="count must be the non-negative"):
        ops.dwconv_bn_input_grads(*bwd, gamma, beta, -1, EPS, stride, pad, "silu", "torch")
    with pytest.raises(ValueError, match="sum_g must have shape"):
        ops.dwconv_bn_input_grads(*bwd, gamma, beta[:2], 10, EPS, stride, pad, "silu", "torch")
    with pytest.raises(ValueError, match="grad_y must have shape"):
        ops.dwconv_bn_grad_sums(torch.randn(5, 6, 5, 7), *bwd[1:], EPS, stride, pad, "silu", "torch")


def test_given_statistics_accept_one_value_per_channel():
    """A process may hold a single value per channel of a statistic its group spans; computing
    the statistics of one value still raises, as BatchNorm2d does."""
    x, w = torch.randn(1, 4, 1, 1), torch.randn(4, 1, 3, 3)
    g, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ek.ops.dwconv_bn_act_train(x, w, g, b)
    y, _, _ = ek.ops.dwconv_bn_act_train(x, w, g, b, mean=torch.zeros(4), var=torch.ones(4))
    assert y.shape == (1, 4, 1, 1)


# ---------------------------------------------------------------- a network over two processes
def sync_net(seed: int = 0) -> nn.Sequential:
    """Three blocks (expand + SE + residual, stride 2 with SE, no expand with SE), calibrated BN."""
    torch.manual_seed(seed)
    net = nn.Sequential(MBConvBlock(8, 8, 3, 1, 4), MBConvBlock(8, 12, 5, 2, 4), MBConvBlock(12, 12, 3, 1, 1))
    testing.calibrate_batchnorm(net.eval(), torch.randn(6, 8, 12, 12))
    return net.train()


def _batches(sizes):
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 8, 12, 12, generator=gen) * 1.5 for n in sizes]
    ws = [torch.randn(n, 12, 6, 6, generator=gen) for n in sizes]
    return xs, ws


STEPS = 2
LR = 0.05


def _record(model: nn.Module, out: torch.Tensor, x: torch.Tensor) -> dict:
    return {"out": out.detach().clone(), "grad_x": x.grad.clone(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def _train(model: nn.Module, x: torch.Tensor, w: torch.Tensor, all_reduce: bool) -> list[dict]:
    """STEPS SGD steps on ``sum(model(x) * w)`` (the gradients summed over the group when
    ``all_reduce``: the gradient of the group's total loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for _ in range(STEPS):
        xr = x.clone().requires_grad_()
        out = model(xr)
        (out * w).sum().backward()
        if all_reduce:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        steps.append(_record(model, out, xr))
        opt.step()
        opt.zero_grad(set_to_none=False)
    return steps


PLANTED = {
    # normalise with this process's statistics only
    "local_statistics": lambda: mock.patch.object(_train_block, "group_moments",
                                                  lambda mean, var, count, group: (mean, var, count)),
    # the backward's sums of this process only
    "local_gradient_sums": lambda: mock.patch.object(_train_block, "group_sums", lambda a, b, group: (a, b)),
}


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str, backend: str, sizes: tuple,
                 defect: str, order: str) -> None:
    with gloo_group(rank, world, init_file), contextlib.ExitStack() as stack:
        stack.enter_context(served_by(backend))
        stack.enter_context(mock.patch.object(_sync_bn, "sync_devices", lambda: ("cpu",)))
        if defect:
            stack.enter_context(PLANTED[defect]())
        if order == "sync_after_convert":  # surgery on a converted model
            net = nn.SyncBatchNorm.convert_sync_batchnorm(ek.convert(sync_net(), backend=backend))
        else:
            net = ek.convert(nn.SyncBatchNorm.convert_sync_batchnorm(sync_net()), backend=backend)
        reasons = [block.train_unfused_reason() for block in net]
        groups = [_train_block.process_groups(block.plan) for block in net]
        xs, ws = _batches(sizes)
        steps = _train(net, xs[rank], ws[rank], all_reduce=True)
        torch.save({"reasons": reasons, "synced": [all(g is not None for g in gs[1:]) for gs in groups],
                    "steps": steps}, os.path.join(out_dir, f"rank{rank}.pt"))


def _reference(sizes) -> list[dict]:
    """One process, the unconverted network (BatchNorm2d) in fp64 on the concatenated batch."""
    xs, ws = _batches(sizes)
    return _train(sync_net().double(), torch.cat(xs).double(), torch.cat(ws).double(), all_reduce=False)


def _run_two_processes(tmp_path, backend, sizes, defect="", order="sync_after_convert"):
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path), backend, tuple(sizes), defect, order),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _worst_error(ranks: list[dict], ref: list[dict], sizes) -> dict[str, float]:
    """The largest relative error (max |got - ref| / max |ref|) of each kind over the steps. A
    gradient that vanishes in exact arithmetic (a projection BN's bias whose block feeds a
    BatchNorm) is judged on 1% of the step's largest parameter gradient instead of its own size."""
    worst = {"forward": 0.0, "backward": 0.0, "running": 0.0}

    def rel(got, want, floor=1e-30):
        return float((got.double() - want).abs().max()) / max(float(want.abs().max()), floor)

    edges = [0, sizes[0], sizes[0] + sizes[1]]
    for step, want in enumerate(ref):
        floor = 1e-2 * max(float(g.abs().max()) for g in want["grads"].values())
        for r, rank in enumerate(ranks):
            got = rank["steps"][step]
            lo, hi = edges[r], edges[r + 1]
            if hi > lo:
                worst["forward"] = max(worst["forward"], rel(got["out"], want["out"][lo:hi]))
                worst["backward"] = max(worst["backward"], rel(got["grad_x"], want["grad_x"][lo:hi]))
            for name, g in got["grads"].items():
                worst["backward"] = max(worst["backward"], rel(g, want["grads"][name], floor))
            for name, b in got["buffers"].items():
                if b.is_floating_point():
                    worst["running"] = max(worst["running"], rel(b, want["buffers"][name]))
                else:
                    assert torch.equal(b, want["buffers"][name]), name
    return worst


LIMITS = {"forward": testing.FP32_RELATIVE[testing.FORWARD_FACTOR],
          "backward": testing.FP32_RELATIVE[testing.BACKWARD_FACTOR],
          "running": testing.FP32_RELATIVE[testing.FORWARD_FACTOR]}


@pytest.fixture(scope="module")
def host_build():
    """Build the host-shim library once, before the processes load it."""
    with cuda_host.as_cuda_backend():
        pass


@pytest.mark.parametrize("backend,order", [(b, "sync_after_convert") for b in BACKENDS] + [
    ("torch", "convert_after_sync")])
def test_two_processes_train_as_one_batch(tmp_path, backend, order, request):
    if backend == "cuda":
        request.getfixturevalue("host_build")
    sizes = (3, 2)
    # not blind: in training an unrelated batch moves the outputs far more than the forward limit
    testing.assert_sensitive(sync_net(), torch.cat(_batches(sizes)[0]), LIMITS["forward"])
    ranks = _run_two_processes(tmp_path, backend, sizes, order=order)
    for rank in ranks:
        assert rank["reasons"] == [None] * 3 and all(rank["synced"])
    worst = _worst_error(ranks, _reference(sizes), sizes)
    assert all(worst[k] <= LIMITS[k] for k in worst), worst


def test_a_process_with_an_empty_batch_still_takes_part(tmp_path):
    sizes = (4, 0)
    ranks = _run_two_processes(tmp_path, "torch", sizes)
    assert ranks[1]["steps"][0]["out"].shape[0] == 0
    worst = _worst_error(ranks, _reference(sizes), sizes)
    assert all(worst[k] <= LIMITS[k] for k in worst), worst


@pytest.mark.parametrize("defect", sorted(PLANTED))
def test_negative_controls_fail_the_check(tmp_path, defect):
    sizes = (3, 2)
    worst = _worst_error(_run_two_processes(tmp_path, "torch", sizes, defect), _reference(sizes), sizes)
    assert any(worst[k] > 100 * LIMITS[k] for k in worst), worst


# ---------------------------------------------------------------- as PyTorch does, elsewhere
def _cpu_group_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        x = torch.randn(2, 8, 12, 12)
        outcome = {}
        for tag, convert in (("eager", False), ("fused", True)):
            net = sync_net()
            net = nn.SyncBatchNorm.convert_sync_batchnorm(ek.convert(net, backend="torch") if convert else net)
            if convert:
                outcome["reason"] = net[0].train_unfused_reason(x)
            try:
                net(x)
                outcome[tag] = None
            except Exception as exc:
                outcome[tag] = (type(exc).__name__, str(exc))
        torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))


def test_cpu_tensors_in_a_process_group_raise_as_pytorch_does(tmp_path):
    mp.spawn(_cpu_group_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        outcome = torch.load(tmp_path / f"rank{r}.pt")
        assert outcome["eager"] is not None and outcome["eager"][0] == "ValueError", outcome
        assert outcome["fused"] == outcome["eager"]
        assert "SyncBatchNorm on cpu" in outcome["reason"]


def test_without_a_process_group_sync_batchnorm_trains_fused_as_batchnorm():
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(sync_net())
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(ek.convert(sync_net(), backend="torch"))
    xs, ws = _batches((4,))
    for block in fused:
        assert block.train_unfused_reason(xs[0]) is None
        assert _train_block.process_groups(block.plan) == (None, None, None)
    ref = _reference((4,))
    for model in (eager, fused):
        worst = _worst_error([{"steps": _train(model, xs[0], ws[0], False)}], ref, (4, 0))
        assert all(worst[k] <= LIMITS[k] for k in worst), worst


def test_a_synchronising_block_does_not_compile_fused(monkeypatch):
    net = nn.SyncBatchNorm.convert_sync_batchnorm(ek.convert(sync_net(), backend="torch"))
    net[0].refresh()
    bn = net[0].plan.dw.bn
    assert isinstance(bn, nn.SyncBatchNorm)
    bn.process_group = group = object()
    monkeypatch.setattr(_sync_bn, "sync_devices", lambda: ("cpu",))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert _sync_bn.process_group(bn) is group
    assert _sync_bn.sync_blocker(bn, "depthwise") is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "torch.compile" in _sync_bn.sync_blocker(bn, "depthwise")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)  # a group of one: plain BatchNorm
    assert _sync_bn.process_group(bn) is None and _sync_bn.sync_blocker(bn, "depthwise") is None
