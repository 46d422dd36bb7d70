"""An efficientnet_pytorch B0 converted with backend="triton" matches the unconverted model.

Runs the Triton kernels in the interpreter on CPU tensors (small input: the interpreter is slow).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import backends

from .test_nn import randomize_bn
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (module-scoped TRITON_INTERPRET=1)

pytestmark = pytest.mark.interpreter
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")


def test_efficientnet_pytorch_b0_converted_with_triton_matches():
    from efficientnet_pytorch import EfficientNet

    model = randomize_bn(EfficientNet.from_name("efficientnet-b0", image_size=32)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        ek.convert(model, backend="triton")
        assert len(ek.conversion_report(model).swapped) == 16
        calls = []
        backends._ensure_registered()
        impls = backends._REGISTRY["triton"].impls()
        counting = {op: (lambda f, name: lambda *a: calls.append(name) or f(*a))(fn, op) for op, fn in impls.items()}
        with mock.patch.dict(impls, counting):
            out = model(x)
    assert calls.count("dwconv_bn_act") == 16 and calls.count("se_gate") == 16 and calls.count("se_excite") == 16
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
