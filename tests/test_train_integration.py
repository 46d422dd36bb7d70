"""Converted blocks train where training runs (issue #11 item 4): torch.compile(fullgraph=True) of a
training step, DDP over two gloo processes, autocast with GradScaler (SyncBatchNorm:
tests/test_train_sync_bn.py).

Each compares the converted model with the unconverted one doing the same thing.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import effnet_kernels as ek
from effnet_kernels import testing
from effnet_kernels.blocks import MBConvBlock

from .environments import gloo_group


def small_net(seed: int = 0) -> nn.Sequential:
    """Two MBConv blocks (residual with stochastic depth, then stride 2 with SE), calibrated BN."""
    torch.manual_seed(seed)
    net = nn.Sequential(MBConvBlock(8, 8, 3, 1, 4, drop_path_rate=0.3), MBConvBlock(8, 12, 5, 2, 4))
    testing.calibrate_batchnorm(net.eval(), torch.randn(4, 8, 12, 12))
    return net.train()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys() and want
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=rtol, atol=atol * float(g.abs().max()) + 1e-7, msg=n)


# ---------------------------------------------------------------- torch.compile
def test_compiled_training_step_fullgraph():
    """The training forward compiled with fullgraph=True (no graph break; AOT autograd compiles its
    backward), three steps of SGD: the same outputs, gradients and running statistics as eager."""
    eager = small_net()
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, fused)]
    for step in range(3):
        x = torch.randn(4, 8, 12, 12)
        outs = []
        for m, run, opt in ((eager, eager, opts[0]), (fused, compiled, opts[1])):
            opt.zero_grad()
            torch.manual_seed(10 + step)
            out = run(x)
            out.square().mean().backward()
            outs.append(out.detach())
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        _assert_close_grads(_grads(fused), _grads(eager))
    for (n, a), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, msg=n)


# ---------------------------------------------------------------- autocast + GradScaler
def test_autocast_with_grad_scaler():
    eager = small_net()
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    x = torch.randn(4, 8, 12, 12)
    for model in (eager, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 1024.0, "an inf/NaN gradient made the scaler back off"
    # bf16 steps: parameters after one step within bf16 resolution of the eager ones
    for (n, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * float(a.abs().max()), msg=n)


# ---------------------------------------------------------------- SyncBatchNorm
# tests/test_train_sync_bn.py: fused over two gloo processes, without a process group, and where
# PyTorch's SyncBatchNorm raises.


# ---------------------------------------------------------------- DDP (2 gloo processes)
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):  # collects and meets at a barrier before the group goes
        torch.manual_seed(100 + rank)
        x = torch.randn(4, 8, 12, 12)
        for tag, convert in (("eager", False), ("fused", True)):
            net = small_net()
            if convert:
                net = ek.convert(net, backend="torch")
            model = nn.parallel.DistributedDataParallel(net)
            torch.manual_seed(7 + rank)
            model(x).square().mean().backward()
            torch.save(_grads(model.module), os.path.join(out_dir, f"{tag}{rank}.pt"))
            del model, net


def test_ddp_two_gloo_processes_give_the_unconverted_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        eager = torch.load(tmp_path / f"eager{rank}.pt")
        fused = torch.load(tmp_path / f"fused{rank}.pt")
        _assert_close_grads(fused, eager)
    # DDP all-reduced: both ranks hold the same (averaged) gradients
    g0, g1 = torch.load(tmp_path / "fused0.pt"), torch.load(tmp_path / "fused1.pt")
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=n)
