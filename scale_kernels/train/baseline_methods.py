"""Baseline continual pre-training set-ups of the SCALE paper: full FT, freezing, depth expansion (LoRA:
:func:`scale_kernels.models.lora.apply_lora`).

Each ``apply_*`` changes the model in place and leaves ``requires_grad`` set on
exactly the parameters that train. All of them keep the model's function unchanged at step 0. ``full`` works
on any HF causal LM; ``freeze`` and ``depth`` need the Llama layout's ``model.layers``
(:func:`decoder_layers`).
"""

from __future__ import annotations

import copy

from torch import nn


def decoder_layers(model: nn.Module, method: str) -> nn.ModuleList:
    """``model.model.layers`` of a Llama-style HF causal LM; ValueError naming ``method`` for other layouts."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"method {method!r} needs a Llama-style model with a model.layers list (Llama, Qwen2, Mistral, ...); "
            f"{type(model).__name__} has none: use method 'full' or 'lora' for it"
        )
    return layers


def apply_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model: nn.Module, freeze_lower: int | None = None) -> nn.Module:
    """Freeze embeddings and the lower ``freeze_lower`` decoder layers (default 3/4 of them); the upper
    layers and the final norm train (a tied LM head stays frozen with the embedding)."""
    layers = decoder_layers(model, "freeze")
    n = len(layers)
    freeze_lower = (3 * n) // 4 if freeze_lower is None else freeze_lower
    if not 0 <= freeze_lower < n:
        raise ValueError(f"freeze_lower must be in [0, {n - 1}] for a {n}-layer model, got {freeze_lower}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[freeze_lower:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    return model


def insertion_points(n_layers: int, blocks: int) -> list[int]:
    """Indices (into the original layers) after which a copied block is inserted, evenly spread.

    LLaMA-Pro inserts one block after every ``n_layers / blocks`` layers, the last one at the top.
    """
    if not 1 <= blocks <= n_layers:
        raise ValueError(f"depth_blocks must be in [1, {n_layers}] for a {n_layers}-layer model, got {blocks}")
    return [round((k + 1) * n_layers / blocks) - 1 for k in range(blocks)]


def _zero_output_projections(block: nn.Module) -> None:
    found = 0
    for name, module in block.named_modules():
        if name.endswith(("o_proj", "down_proj")) and isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            found += 1
    if found != 2:
        raise ValueError(f"expected one o_proj and one down_proj per block to zero, found {found}")


def apply_depth(model: nn.Module, blocks: int) -> nn.Module:
    """LLaMA-Pro depth expansion: after evenly spaced layers insert a copy of that layer whose ``o_proj``
    and ``down_proj`` are zero (so the block is the identity at init); only the new blocks train."""
    layers = decoder_layers(model, "depth")
    points = set(insertion_points(len(layers), blocks))
    for p in model.parameters():
        p.requires_grad_(False)
    new_layers: list[nn.Module] = []
    for i, layer in enumerate(layers):
        new_layers.append(layer)
        if i in points:
            block = copy.deepcopy(layer)
            _zero_output_projections(block)
            for p in block.parameters():
                p.requires_grad_(True)
            new_layers.append(block)
    model.model.layers = nn.ModuleList(new_layers)
    for index, layer in enumerate(new_layers):  # the KV cache is indexed by layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in range(len(layers)) for _ in range(1 + (i in points))]
    config.num_hidden_layers = len(new_layers)
    return model
