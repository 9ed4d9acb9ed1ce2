"""Width-upscaling of Hugging Face decoder-only causal LMs (Llama, Qwen2, Mistral): see :mod:`.core`."""

from .activation_checkpointing import set_activation_checkpointing
from .core import (
    ATTENTION,
    FAMILIES,
    MLP,
    FamilySpec,
    UpscaleConfig,
    family_of,
    upscale_config_of,
    upscale_model,
)

__all__ = [
    "ATTENTION",
    "FAMILIES",
    "MLP",
    "FamilySpec",
    "UpscaleConfig",
    "family_of",
    "set_activation_checkpointing",
    "upscale_config_of",
    "upscale_model",
]
