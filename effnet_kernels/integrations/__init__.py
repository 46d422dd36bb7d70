"""Adapters that describe other libraries' blocks as :class:`effnet_kernels.nn.MBConvPlan`.

Each adapter module has ``NAME``, ``block_types() -> tuple[type, ...]`` (empty when its
library is not imported: adapters never import a model library themselves) and
``plan(block) -> MBConvPlan`` (raises :class:`NotFusable` with the reason).
"""

from ._common import NotFusable

__all__ = ["NotFusable"]
