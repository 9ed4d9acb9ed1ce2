"""Which parameters of a model train: counts, a PEFT-style report, and state dicts of the trained tensors.

Shared (tied) parameters are counted and listed once, as ``model.parameters()`` / ``named_parameters()`` do.

* :func:`count_parameters`: ``(trainable, total)`` element counts.
* :func:`trainable_parameter_report` / :func:`print_trainable_parameters`: one line like PEFT's.
* :func:`trainable_state_dict`: every parameter with ``requires_grad`` (any model, any method).
* :func:`expansion_state_dict`: the expansion parameters of an upscaled model (what
  :func:`scale_kernels.save_expansion` writes), as the modules name them (:data:`EXPANSION_PARAM_NAMES`).
"""

from __future__ import annotations

import torch
from torch import nn

from .models.core import upscale_config_of
from .modules import EXPANSION_PARAM_NAMES, ExpansionModule

__all__ = [
    "EXPANSION_PARAM_NAMES",
    "count_parameters",
    "expansion_state_dict",
    "print_trainable_parameters",
    "trainable_parameter_report",
    "trainable_state_dict",
]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements of ``model`` (a tied parameter counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_parameter_report(model: nn.Module) -> str:
    """One line like PEFT's: trainable / frozen / total parameter counts (tied weights counted once)."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,} || frozen params: {total - trainable:,} || all params: {total:,} "
        f"|| trainable%: {pct:.4f}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_parameter_report`."""
    print(trainable_parameter_report(model))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (detached) of every parameter that requires grad."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def expansion_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (detached) of every expansion parameter of an upscaled model: the new parameters only.

    The names are the model's state-dict keys; each :class:`~scale_kernels.modules.ExpansionModule` says which of
    its parameters are expansion (zero-size blocks such as the LM head's ``weight_21`` included). ValueError if
    ``model`` is not upscaled.
    """
    upscale_config_of(model)
    return {
        f"{prefix}.{name}" if prefix else name: p.detach()
        for prefix, module in model.named_modules()
        if isinstance(module, ExpansionModule)
        for name, p in module.expansion_parameters()
    }
