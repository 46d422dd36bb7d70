"""benchmarks.roofline: bytes and FLOPs against hand-computed small cases."""

import math

import pytest
import torch
from torch import nn

from benchmarks.roofline import atomic_modules, bound_img_per_s, fraction_of_bound, measure


def test_conv_bn_hand_computed():
    # x [3, 8, 8] -> conv 3->4 k3 pad1 -> [4, 8, 8] -> BN -> [4, 8, 8], per image
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    elems = (3 * 64 + 4 * 64) + (4 * 64 + 4 * 64)  # conv in + out, BN in + out
    flops = 2 * (4 * 64) * 3 * 9
    for device in ("meta", "cpu"):
        r = measure(model, 8, element_size=2, batch=3, device=device)
        assert r.bytes_per_image == 2 * elems
        assert r.flops_per_image == flops
    assert measure(model, 8, element_size=4).bytes_per_image == 4 * elems


def test_depthwise_strided_and_linear_flops():
    model = nn.Sequential(nn.Conv2d(3, 3, 5, stride=2, padding=2, groups=3), nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    r = measure(model, 8, element_size=1, batch=2)
    out_dw = 3 * 4 * 4
    assert r.flops_per_image == 2 * out_dw * 1 * 25 + 2 * 10 * out_dw
    assert r.bytes_per_image == (3 * 64 + out_dw) + (out_dw + out_dw) + (out_dw + 10)


class PaddedConv(nn.Conv2d):
    """Like efficientnet_pytorch's Conv2dStaticSamePadding: a conv with a padding child."""

    def __init__(self):
        super().__init__(3, 2, 3, bias=False)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


def test_conv_with_children_is_counted_once_as_a_conv():
    model = nn.Sequential(PaddedConv(), nn.SiLU())
    names = [n for n, _ in atomic_modules(model)]
    assert names == ["0", "1"]
    r = measure(model, 4, element_size=1, batch=1)
    assert r.bytes_per_image == (3 * 16 + 2 * 16) + (2 * 16 + 2 * 16)  # the conv sees the unpadded input
    assert r.flops_per_image == 2 * (2 * 16) * 3 * 9


def test_measure_leaves_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model, 4, device="cpu")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
        assert v.device.type == "cpu"


def test_bound_and_fraction():
    assert bound_img_per_s(1e6, 3000.0) == pytest.approx(3e6)
    assert fraction_of_bound(1.5e6, 3e6) == pytest.approx(0.5)
    assert math.isnan(fraction_of_bound(1.0, 0.0))
    with pytest.raises(ValueError, match="bytes_per_image"):
        bound_img_per_s(0, 1.0)
    with pytest.raises(ValueError, match="resolution"):
        measure(nn.Identity(), 0)
