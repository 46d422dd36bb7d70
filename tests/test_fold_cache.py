"""The folded-BatchNorm cache (:func:`effnet_kernels.nn.cached_fold`) serves only the tensors it folded.

A CUDA caching allocator hands a freed tensor's memory to the next tensor of its size, so a new
parameter can sit at the old one's address with the old one's version count. The cache must fold
it afresh. The impostors below build that case on the CPU: a new tensor object on the same
storage, with the same version, whose values were changed behind the version counter.
"""

from __future__ import annotations

import copy
import pickle
from unittest import mock

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import nn as ek_nn

from .model_checks import assert_converted_matches, calibrated


def impostor(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor object at ``t``'s address and version, holding ``values`` (``t``'s memory is overwritten)."""
    new = t.data  # same storage, its own version counter (at 0)
    with torch.no_grad():
        while new._version < t._version:
            new.add_(0)  # in place, values unchanged: moves the new tensor's counter only
    t.data.copy_(values)  # through .data: no counter moves
    assert new.data_ptr() == t.data_ptr() and new._version == t._version and new is not t
    return new


class _Owner:
    pass


def _fold(owner, conv, bn):
    with torch.no_grad():
        return ek_nn.cached_fold(owner, conv, bn, lambda: (bn.weight * conv.weight.sum()).clone())


def test_a_new_tensor_at_a_freed_ones_address_and_version_is_folded_afresh():
    owner, conv, bn = _Owner(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4).eval()
    first = _fold(owner, conv, bn)
    assert _fold(owner, conv, bn) is first  # served from the cache
    values = torch.randn(4)
    bn.weight = nn.Parameter(impostor(bn.weight, values))
    torch.testing.assert_close(_fold(owner, conv, bn), values * conv.weight.sum(), rtol=0, atol=0)


def test_a_buffer_impostor_is_folded_afresh():
    owner, conv, bn = _Owner(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4).eval()
    calls = []
    compute = lambda: calls.append(1) or bn.running_var.clone()  # noqa: E731
    with torch.no_grad():
        ek_nn.cached_fold(owner, conv, bn, compute)
        bn.running_var = impostor(bn.running_var, torch.full((4,), 3.0))
        assert ek_nn.cached_fold(owner, conv, bn, compute).eq(3.0).all()
    assert len(calls) == 2


def test_a_converted_network_sees_impostor_parameters():
    """Every BatchNorm's weight and running variance swapped for impostors: the converted network
    still matches its eager twin by the parity rule (with the cache stale it does not)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    eager = calibrated(ek.models.efficientnet("b0", num_classes=10), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch").eval()
    with torch.no_grad():
        converted(x)  # every fold cached
    twins = dict(eager.named_modules())
    for name, bn in converted.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            twin = twins[name]
            scale = 1.0 + 0.5 * torch.rand(bn.num_features)
            with torch.no_grad():
                twin.weight.mul_(scale), twin.running_var.mul_(scale)
            bn.weight = nn.Parameter(impostor(bn.weight, twin.weight.detach()))
            bn.running_var = impostor(bn.running_var, twin.running_var)
    assert_converted_matches(eager, converted, x)


def test_a_stale_cache_is_caught_by_the_network_check():
    """Negative control: with the entry's identity check disabled, the check above fails."""
    with mock.patch.object(ek_nn._FoldEntry, "serves", lambda self, state, sources: self.state == state):
        with pytest.raises(AssertionError):
            test_a_converted_network_sees_impostor_parameters()


def test_copies_and_pickles_fold_their_own_tensors():
    owner, conv, bn = _Owner(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4).eval()
    _fold(owner, conv, bn)
    entry = owner.__dict__["_fold_cache"]
    assert entry.refs and entry.value is not None
    for clone in (copy.deepcopy(owner), pickle.loads(pickle.dumps(owner))):
        empty = clone.__dict__["_fold_cache"]
        assert isinstance(empty, ek_nn._FoldEntry) and empty.refs == () and empty.value is None
        assert not empty.serves(entry.state, (conv.weight,) * 6)


def test_nothing_is_cached_while_a_cuda_graph_is_captured():
    owner, conv, bn = _Owner(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4).eval()
    with mock.patch.object(ek_nn, "capturing", lambda t: True):
        first, second = _fold(owner, conv, bn), _fold(owner, conv, bn)
    assert first is not second and "_fold_cache" not in owner.__dict__
    assert ek_nn.capturing(conv.weight) is False  # a CPU tensor is never captured


class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.25


def test_parametrized_weights_are_folded_from_their_current_value():
    """``torch.nn.utils.parametrize`` (new-style weight_norm, spectral_norm, ...) computes a fresh weight
    on every access: the fused block folds the current one, also after the parametrization's
    original tensor changes in place."""
    import torch.nn.utils.parametrize as parametrize
    from effnet_kernels.blocks import MBConvBlock

    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    eager = calibrated(MBConvBlock(16, 16, 3, 1, 4), x)
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    for m in (eager, fused):
        for conv in (m.dw_conv, m.project_conv, m.expand_conv):
            parametrize.register_parametrization(conv, "weight", _Scale())
    assert fused.fused_active(x)
    assert_converted_matches(eager, fused, x)
    with torch.no_grad():
        fused(x)  # folds cached
        for m in (eager, fused):
            m.dw_conv.parametrizations.weight.original.mul_(0.8)
            m.project_conv.parametrizations.weight.original.mul_(1.2)
    assert_converted_matches(eager, fused, x)


def test_folds_cached_under_inference_mode_serve_later_calls():
    """A fold cached under ``torch.inference_mode`` (an inference tensor) serves no_grad calls after it,
    and a forward and backward with autograd after it match eager's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    eager = calibrated(ek.models.efficientnet("b0", num_classes=10), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch").eval()
    with torch.inference_mode():
        first = converted(x)
        assert first.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), first, rtol=0, atol=0)
    assert_converted_matches(eager, converted, x)
    for m in (eager, converted):
        m(x).square().mean().backward()
    for (name, p), q in zip(converted.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * float(q.grad.abs().max()), msg=name)
