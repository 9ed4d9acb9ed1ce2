"""LoRA (via ``peft``) on a Hugging Face model: the parameter-efficient baseline SCALE is compared against."""

from __future__ import annotations

import warnings

from torch import nn


def apply_lora(
    model: nn.Module, r: int = 8, alpha: int = 16, target_modules: str | list[str] = "all-linear"
) -> nn.Module:
    """LoRA adapters (via ``peft``, no dropout) on ``target_modules`` (default: every linear layer except the LM
    head); returns the PEFT model. The one place this package builds a LoRA model (the training baseline, the model
    benchmark and the memory estimator)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ValueError("the lora baseline needs peft: pip install peft") from e
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft (0.21) reads the attribute recent transformers 5.x renamed to is_activation_checkpointing; the
        # FutureWarning is about peft's code, not the user's
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)
