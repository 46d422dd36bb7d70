"""Converted models of the model libraries survive pickling and ``torch.save`` (second CI env,
``-m adapters``): the same outputs in eval and in training (drop path / stochastic depth / dropout
included), with each block's drop bound to the copy's own module."""

from __future__ import annotations

import copy

import pytest
import torch

import effnet_kernels as ek

from .model_checks import calibrated
from .test_convert_pickle import _round_trip, _train_output

pytestmark = pytest.mark.adapters

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("transformers")
from .test_convert_huggingface import b0_config, build as build_hf  # noqa: E402

MODELS = {
    "timm_b0": lambda: timm.create_model("efficientnet_b0", drop_path_rate=0.2),
    "timm_mobilenetv3": lambda: timm.create_model("mobilenetv3_large_100", drop_path_rate=0.2),
    "torchvision_b0": lambda: torchvision.models.efficientnet_b0(),
    "huggingface_b0": lambda: build_hf(b0_config()),
}


def _out(y):
    return getattr(y, "logits", y)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_converted_library_model_round_trips(name, how):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = ek.convert(calibrated(MODELS[name](), x), backend="torch")
    with torch.no_grad():
        want = _out(model(x))
    clone = _round_trip(model, how)
    with torch.no_grad():
        torch.testing.assert_close(_out(clone.eval()(x)), want, rtol=0, atol=0)
    pairs = list(zip((m for m in clone.modules() if isinstance(m, ek.MBConv)),
                     (m for m in model.modules() if isinstance(m, ek.MBConv))))
    bound = [(b, src) for b, src in pairs if getattr(b.plan.drop, "args", None)]
    assert bound
    for b, src in bound:  # bound to the clone's own block (or its child), not to the pickled model's
        owner = b.plan.drop.args[0]
        assert owner is not src.plan.drop.args[0]
        assert owner is b.plan.original or any(owner is m for m in b.modules())
    torch.testing.assert_close(_out(_train_output(clone, x)), _out(_train_output(copy.deepcopy(model), x)),
                               rtol=0, atol=0)
