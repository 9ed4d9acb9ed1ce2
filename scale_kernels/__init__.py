"""scale_kernels: fused kernels for width-upscaled continual pre-training (SCALE, arXiv 2511.03270)."""

from .backends import available_backends, last_backend, use_backend
from .functional import upscaled_linear
from .reference import upscaled_linear_reference

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "last_backend",
    "upscaled_linear",
    "upscaled_linear_reference",
    "use_backend",
]
