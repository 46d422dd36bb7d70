"""SyncBatchNorm in the fused training block: batch statistics over a process group.

``nn.SyncBatchNorm`` normalises with the statistics of every process's batch when it trains
inside an initialised process group of more than one process (and, then, only on GPU-like
devices: on others its forward raises). The fused block (:mod:`effnet_kernels._train_block`)
does what ``torch.nn.modules._functions.SyncBatchNorm`` does, with its own kernels around the
collectives:

* forward, per BatchNorm: this batch's per-channel mean, biased variance and count (for the
  depthwise step the ``dwconv_bn_stats`` op, the statistics pass of the fused kernel), one
  ``all_gather`` of ``[mean, var, count]`` per process, combined exactly (Chan's formula, in
  float64); the normalisation and the running statistics use the combined ones (the running
  variance unbiased with the total count), as SyncBatchNorm's do;
* backward, per BatchNorm: this batch's per-channel ``sum(g)`` and ``sum(g * xhat)``, one
  ``all_reduce`` (sum), and the input gradient from the sums over the whole group
  (``dwconv_bn_grad_sums`` / ``dwconv_bn_input_grads`` for the depthwise step); the gradients
  of the BatchNorm's weight and bias are this batch's sums, which DDP then averages, as
  SyncBatchNorm's are.

Every process issues the same collectives in the same order (forward: expand, depthwise,
projection; backward: projection, depthwise, expand), empty batches included (their count is 0).
Where PyTorch's SyncBatchNorm would raise (a device it does not sync on) or where the fused
block would have to put collectives into a compiled graph, the block runs its eager forward,
so it does what PyTorch does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

Tensor = torch.Tensor


def sync_devices() -> tuple[str, ...]:
    """The device types on which ``nn.SyncBatchNorm`` synchronises (others raise in its forward)."""
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def _would_sync(bn: nn.Module) -> bool:
    """True when ``bn``'s training forward would reach SyncBatchNorm's synchronising branch."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized())


def process_group(bn: nn.Module) -> Optional[Any]:
    """The process group whose batches ``bn``'s statistics span in training, or None when they are
    this batch's alone (a BatchNorm, or a SyncBatchNorm without a group of two or more processes)."""
    if not _would_sync(bn):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_blocker(bn: nn.Module, where: str) -> Optional[str]:
    """Why a block with ``bn`` must train through its eager forward for SyncBatchNorm's sake, or None."""
    if not _would_sync(bn):
        return None
    device = bn.running_mean.device if bn.running_mean is not None else (
        bn.weight.device if bn.weight is not None else torch.device("cpu"))
    if device.type not in sync_devices():
        return (f"the {where} norm is a SyncBatchNorm on {device.type} inside a process group, where PyTorch's "
                "SyncBatchNorm raises; the block runs it")
    if process_group(bn) is not None and torch.compiler.is_compiling():
        return f"the {where} norm is a SyncBatchNorm synchronising under torch.compile (its own forward traces the collectives)"
    return None


def group_moments(mean: Tensor, var: Tensor, count: int, group: Any) -> tuple[Tensor, Tensor, int]:
    """The per-channel mean and biased variance over every process's batch in ``group``, from this
    batch's ``mean``, ``var`` (``[C]``) and ``count`` values per channel (0 for an empty batch), and
    the total count. One ``all_gather``; combined in float64 with Chan's formula, returned in mean's dtype."""
    c = mean.shape[0]
    packed = torch.cat([mean.to(torch.float64), var.to(torch.float64),
                        torch.tensor([float(count)], dtype=torch.float64, device=mean.device)])
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    table = torch.stack(parts)  # [world, 2C + 1]
    counts = table[:, 2 * c:]
    total = float(counts.sum())
    if total == 0:
        return torch.zeros_like(mean), torch.zeros_like(var), 0
    means, variances = table[:, :c], table[:, c:2 * c]
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
    return g_mean.to(mean.dtype), g_var.to(var.dtype), int(total)


def group_sums(a: Tensor, b: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """``(sum of a, sum of b)`` over the processes of ``group`` (two ``[C]`` tensors, one ``all_reduce``)."""
    packed = torch.cat([a, b.to(a.dtype)])
    dist.all_reduce(packed, group=group)
    return packed[:a.shape[0]], packed[a.shape[0]:].to(b.dtype)
