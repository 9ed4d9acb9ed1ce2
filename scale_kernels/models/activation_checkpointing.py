"""HF activation (gradient) checkpointing on or off, across transformers 5.x's two method names."""

from __future__ import annotations

from torch import nn


def set_activation_checkpointing(model: nn.Module, enabled: bool = True, *, use_reentrant: bool = False) -> None:
    """Turn HF's activation checkpointing of ``model``'s decoder layers on or off.

    Newer transformers 5.x releases name the methods ``activation_checkpointing_enable`` / ``_disable`` and
    deprecate ``gradient_checkpointing_enable`` / ``_disable``; this uses the new names where the model has them
    and the old ones otherwise, so it is warning-free on every supported release. ``use_reentrant=False`` (the
    default) is torch's recommended non-reentrant checkpointing.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_disable()
