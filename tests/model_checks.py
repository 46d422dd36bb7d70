"""Whole-model and block checks shared by the conversion suites (tests only).

Every check here is by DESIGN.md's rule (:mod:`effnet_kernels.testing`) against an fp64
run of the eager model, on a model whose BatchNorm was calibrated on the test's own batch,
and asserts first that the model is sensitive to its input, so the check is not blind. The
negative controls run the same checks under a planted defect (``tests/defects.py``) and
expect them to fail.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence
from unittest import mock

import torch
from torch import nn

from effnet_kernels import testing

__all__ = ["calibrated", "assert_network_parity", "assert_blockwise_parity", "assert_converted_matches",
           "assert_train_parity"]


def calibrated(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with BatchNorm calibrated on ``x`` (affine lightly jittered first)."""
    return testing.calibrate_batchnorm(model.eval(), x, seed=seed)


def _in(dtype: torch.dtype, *models: nn.Module) -> list[nn.Module]:
    return [m if dtype == torch.float32 else copy.deepcopy(m).to(dtype) for m in models]


def assert_train_parity(eager: nn.Module, model: nn.Module, x: torch.Tensor, *, steps: int = 3, lr: float = 0.01,
                        **kwargs) -> list[testing.ParityResult]:
    """:func:`effnet_kernels.testing.train_step_parity` over ``steps`` SGD steps (``kwargs`` go to it):
    every result within the rule."""
    results = testing.train_step_parity(eager, model, x, steps=steps, lr=lr, **kwargs)
    bad = testing.failures(results)
    assert not bad, f"{len(bad)} of {len(results)} break the rule:\n" + "\n".join(map(str, bad[:12]))
    return results


def assert_network_parity(eager: nn.Module, converted: nn.Module, x: torch.Tensor, *,
                          reference: Optional[nn.Module] = None) -> testing.ParityResult:
    """fp32 end to end: sensitive model, then converted vs fp64 within 2x eager fp32's error."""
    result = testing.model_parity(eager, converted, x, reference=reference)
    testing.assert_sensitive(eager, x, result.limit / max(result.ref_scale, 1e-30))
    assert result.ok, str(result)
    return result


def assert_blockwise_parity(eager: nn.Module, converted: nn.Module, x: torch.Tensor, dtype: torch.dtype, *,
                            names: Optional[Sequence[str]] = None, reference: Optional[nn.Module] = None,
                            expect_blocks: Optional[int] = None) -> list[testing.ParityResult]:
    """Block by block in ``dtype``: every fused block within the rule, given its eager twin's input."""
    e, c = _in(dtype, eager, converted)
    results = testing.blockwise_parity(e, c, x.to(dtype), names=names, dtype=dtype, reference=reference)
    assert results, "no fused blocks to compare"
    if expect_blocks is not None:
        assert len(results) == expect_blocks, f"compared {len(results)} blocks, expected {expect_blocks}"
    bad = testing.failures(results)
    assert not bad, f"{len(bad)} of {len(results)} blocks break the parity rule in {dtype}:\n" + "\n".join(map(str, bad))
    return results


def assert_converted_matches(eager: nn.Module, converted: nn.Module, x: torch.Tensor, *,
                             dtypes: Sequence[torch.dtype] = (torch.float32,),
                             expect_blocks: Optional[int] = None) -> None:
    """The end-to-end fp32 check (with the sensitivity assertion) and the block-by-block check in each of ``dtypes``.

    ``eager`` is the unconverted model (fp32, eval, calibrated), ``converted`` its converted twin.
    """
    reference = copy.deepcopy(eager).to(torch.float64)
    assert_network_parity(eager, converted, x, reference=reference)
    for dtype in dtypes:
        assert_blockwise_parity(eager, converted, x, dtype, reference=reference, expect_blocks=expect_blocks)


@contextlib.contextmanager
def folded_expand_calls() -> Iterator[list]:
    """Inside the block, every training forward that runs its expand step as the folded GEMM
    (``effnet_kernels._train_block._folded_expand_forward``) appends to the list it yields."""
    from effnet_kernels import _train_block

    real, calls = _train_block._folded_expand_forward, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(_train_block, "_folded_expand_forward", counted):
        yield calls
