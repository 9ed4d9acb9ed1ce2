"""Deprecated alias of :mod:`scale_kernels.serialization` (save / load / dense export) and
:mod:`scale_kernels.parameters` (parameter reports, expansion state dict); it will be removed in the next release.

Importing it emits one DeprecationWarning; every name it had is still importable from here.
"""

import warnings

from .parameters import expansion_state_dict, print_trainable_parameters, trainable_parameter_report
from .serialization import (
    EXPANSION_CONFIG,
    EXPANSION_PARAM_NAMES,
    EXPANSION_WEIGHTS,
    FORMAT_VERSION,
    load_expansion,
    load_upscaled,
    merge_to_dense,
    save_expansion,
)

__all__ = [
    "EXPANSION_CONFIG",
    "EXPANSION_PARAM_NAMES",
    "EXPANSION_WEIGHTS",
    "FORMAT_VERSION",
    "expansion_state_dict",
    "load_expansion",
    "load_upscaled",
    "merge_to_dense",
    "print_trainable_parameters",
    "save_expansion",
    "trainable_parameter_report",
]

warnings.warn(
    "scale_kernels.checkpoint is deprecated: import from scale_kernels.serialization (save_expansion, load_expansion, "
    "load_upscaled, merge_to_dense) or scale_kernels.parameters (trainable_parameter_report, expansion_state_dict)",
    DeprecationWarning,
    stacklevel=2,
)
