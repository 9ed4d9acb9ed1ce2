"""scale_kernels: fused kernels for width-upscaled continual pre-training (SCALE, arXiv 2511.03270)."""

from .backends import available_backends, last_backend, use_backend
from .functional import explain_dispatch, upscaled_linear
from .models import upscale_model
from .modules import GroupedRMSNorm, ScaleEmbedding, ScaleLinear, ScaleLMHead, ScaleRMSNorm
from .parameters import print_trainable_parameters, trainable_parameter_report
from .reference import upscaled_linear_reference
from .route import RoutePolicy, original_stream
from .serialization import load_expansion, load_upscaled, merge_to_dense, save_expansion
from .validation import check_finite

__version__ = "0.1.0"

__all__ = [
    "GroupedRMSNorm",
    "RoutePolicy",
    "ScaleEmbedding",
    "ScaleLMHead",
    "ScaleLinear",
    "ScaleRMSNorm",
    "available_backends",
    "check_finite",
    "explain_dispatch",
    "last_backend",
    "load_expansion",
    "load_upscaled",
    "merge_to_dense",
    "original_stream",
    "print_trainable_parameters",
    "save_expansion",
    "trainable_parameter_report",
    "upscale_model",
    "upscaled_linear",
    "upscaled_linear_reference",
    "use_backend",
]
