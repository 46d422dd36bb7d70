"""effnet_kernels._folded_weights: the tap-major folded layout both kernel backends read.

(The cache's reuse / staleness / lifetime behaviour is tested through each backend:
tests/test_cuda_backend.py and tests/test_triton_dwconv.py.)
"""

from __future__ import annotations

import pytest
import torch

from effnet_kernels._folded_weights import fold_tap_major


@pytest.mark.parametrize("row_align", [1, 16])
def test_fold_is_scaled_transposed_and_zero_padded(row_align):
    g = torch.Generator().manual_seed(11)
    w, s = torch.randn(13, 1, 3, 3, generator=g), torch.rand(13, generator=g) + 0.5
    out = fold_tap_major(w, s, row_align=row_align)
    cp = 13 if row_align == 1 else 16
    assert out.shape == (9, cp) and out.dtype == torch.float32 and out.is_contiguous()
    want = (w.reshape(13, 9) * s[:, None]).t()
    torch.testing.assert_close(out[:, :13], want, rtol=0, atol=0)
    assert (out[:, 13:] == 0).all()


def test_fold_rejects_a_bad_row_align():
    with pytest.raises(ValueError, match="row_align must be a positive int"):
        fold_tap_major(torch.randn(4, 1, 3, 3), torch.rand(4), row_align=0)
