"""``torch.func`` transforms on converted models: ``grad`` / ``vmap`` / per-sample gradients / ``jvp``.

The fused ops have autograd formulas but no functorch rules, so under a transform every fused
module runs its modules (:func:`effnet_kernels.nn.transform_reason`) and the converted model
computes what the eager one does; outside a transform it runs fused again. Negative control:
with that check disabled the transforms fail on the ops.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

import effnet_kernels as ek
from effnet_kernels import nn as ek_nn
from effnet_kernels import stem_head

from .model_checks import calibrated
from .test_ops_pointwise import _calls


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(ek.models.efficientnet("b0", num_classes=10), x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch").eval(), x


def _loss(params, model, x):
    return functional_call(model, params, (x,)).square().mean()


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_grad_of_a_converted_model_is_eagers(pair):
    eager, converted, x = pair
    want, got = grad(_loss)(_params(eager), eager, x), grad(_loss)(_params(converted), converted, x)
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name])
    assert any(float(g.abs().max()) > 0 for g in got.values())


def test_vmap_and_per_sample_gradients(pair):
    eager, converted, x = pair
    def one_by_one(model):
        return vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)

    with torch.no_grad():
        got, want = one_by_one(converted), eager(x)
        _close(got, one_by_one(eager))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    per_sample = vmap(grad(_loss), in_dims=(None, None, 0))
    got, want = per_sample(_params(converted), converted, x.unsqueeze(1)), per_sample(_params(eager), eager, x.unsqueeze(1))
    one = grad(_loss)(_params(eager), eager, x[1:])  # sample 1 alone
    for name in want:
        _close(got[name], want[name])
        torch.testing.assert_close(got[name][1], one[name], rtol=0, atol=1e-4 * float(one[name].abs().max()))


def test_jvp_matches_eager(pair):
    eager, converted, x = pair
    t = torch.randn_like(x)
    (_, dy_e), (_, dy_c) = jvp(eager, (x,), (t,)), jvp(converted, (x,), (t,))
    _close(dy_c, dy_e)


def test_the_reason_is_given_inside_a_transform_only(pair):
    _, converted, x = pair
    block = next(m for m in converted.modules() if isinstance(m, ek.MBConv))
    seen = []

    def probe(xi):
        seen.append((ek_nn.transform_reason(), block.fused_active(), converted.stem.unfused_reason(xi)))
        return xi

    vmap(probe)(x)
    assert seen == [(ek_nn.TRANSFORM_REASON, False, ek_nn.TRANSFORM_REASON)]
    assert ek_nn.transform_reason() is None and block.fused_active(x) and converted.stem.unfused_reason(x) is None
    assert "effnet.conv_bn_act" in _calls(converted.stem, x)[0]  # fused again outside


def test_standalone_fused_dwconv_under_grad():
    torch.manual_seed(1)
    m = ek.FusedDWConvBNAct(8, 3).eval()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 2.0), m.bn.running_mean.normal_()
    x = torch.randn(2, 8, 7, 7)
    eager = lambda t: ek_nn.apply_activation(m.bn(torch.nn.functional.conv2d(t, m.conv.weight, padding=1, groups=8)), m.activation)  # noqa: E731
    _close(grad(lambda t: m(t).square().sum())(x), grad(lambda t: eager(t).square().sum())(x))


def test_negative_control_without_the_check_the_transforms_fail(pair):
    _, converted, x = pair
    with mock.patch.object(ek_nn, "transform_reason", lambda: None), \
            mock.patch.object(stem_head, "transform_reason", lambda: None), pytest.raises(RuntimeError):
        grad(_loss)(_params(converted), converted, x)
