"""effnet_kernels: fused GPU kernels for EfficientNet B0-B7.

One line: ``effnet_kernels.convert(model)`` swaps the MBConv blocks of a torchvision,
timm or efficientnet_pytorch EfficientNet for fused ones, in place.
"""

from . import ops
from .backends import BackendUnavailableError, available_backends, use_backend

__version__ = "0.1.0"

__all__ = [
    "ops",
    "use_backend",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]
