"""Models of the model-level benchmark: a Llama-shaped model from config (random weights, no download) and
the variants trained on it: full fine-tuning, LoRA (peft), the hand-written upscaled model and this package.

The upscaled models come from ``scale_kernels.upscale_model``. The hand-written upscaled model is the same
upscaled model with every ``ScaleLinear.forward`` rebound to :func:`handwritten_scale_linear_forward`
(4 ``F.linear`` + route multiply + ``cat`` under plain autograd): only the linear layers differ, the split
RMSNorm, embeddings and head are the package's in both.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

import scale_kernels

from .baselines import handwritten_upscaled_linear

# Llama-3.2-1B's shape (random weights): ~1.24B parameters with the tied 128k-token embedding.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    use_cache=False,
)
# +25% width: 512 more hidden channels = 8 query heads of 64 (2 KV heads x GQA group 4), FFN 8192 -> 10240.
UPSCALE_1B = dict(extra_hidden=512, extra_heads=8, extra_kv_heads=2, extra_intermediate=2048)
SMOKE_LLAMA = {
    **LLAMA_1B,
    **dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2),
    **dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256),
}
SMOKE_UPSCALE = dict(extra_hidden=32, extra_heads=2, extra_kv_heads=1, extra_intermediate=64)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")

FULL_FT, LORA_NAME, HANDWRITTEN_UPSCALED = "full_ft", "lora", "handwritten_upscaled"


@dataclass(frozen=True)
class ModelSpec:
    """The base model config (``LlamaConfig`` kwargs), the upscaling sizes and the SCALE mode."""

    base: dict
    upscale: dict
    mode: str = "preserve"


def build_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``spec.base`` on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec.base))
    return model.to(dtype)


def upscale_unavailable_reason() -> str | None:
    """None when ``scale_kernels.upscale_model`` exists, else why the upscaled variants are skipped."""
    if getattr(scale_kernels, "upscale_model", None) is None or getattr(scale_kernels, "ScaleLinear", None) is None:
        return "scale_kernels.upscale_model / ScaleLinear are not available (module layer not merged yet)"
    return None


def build_upscaled(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``scale_kernels.upscale_model`` applied to a fresh base model (every pretrained weight frozen)."""
    model = build_base(spec, device, dtype)
    upscaled = scale_kernels.upscale_model(
        model,
        spec.upscale["extra_hidden"],
        extra_heads=spec.upscale["extra_heads"],
        extra_kv_heads=spec.upscale["extra_kv_heads"],
        extra_intermediate=spec.upscale["extra_intermediate"],
        mode=spec.mode,
    )
    return (upscaled if isinstance(upscaled, nn.Module) else model).to(device=device, dtype=dtype)


def build_lora(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """peft LoRA (``LORA`` settings: r=16, alpha=32, every linear but the head) on a fresh base model."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(build_base(spec, device, dtype), LoraConfig(**LORA)).to(dtype)


def handwritten_scale_linear_forward(
    self: nn.Module, x: torch.Tensor, route: torch.Tensor | None = None
) -> torch.Tensor:
    """``ScaleLinear.forward`` written by hand: :func:`handwritten_upscaled_linear` on the layer's weights.

    W12 and the route are resolved exactly as ``ScaleLinear.forward`` resolves them (its
    ``_w12_and_route``: the model-level ``scale_route`` mask, ``original_stream``), so both compute the same.
    """
    w12, route = self._w12_and_route(route)
    return handwritten_upscaled_linear(
        x, self.weight, self.weight_21, self.weight_22, w12, self.bias, self.bias_up, route
    )


def swap_to_handwritten(model: nn.Module) -> int:
    """Rebind ``forward`` of every ``ScaleLinear`` in ``model`` to the hand-written path; returns how many.

    Raises RuntimeError if the model has no ``ScaleLinear`` (a swap that silently does nothing would make the
    baseline measure the package).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, scale_kernels.ScaleLinear):
            module.forward = types.MethodType(handwritten_scale_linear_forward, module)
            count += 1
    if count == 0:
        raise RuntimeError("swap_to_handwritten: the model has no ScaleLinear layer to swap")
    return count


def restore_forward(model: nn.Module) -> int:
    """Undo :func:`swap_to_handwritten` (drop the per-instance ``forward``); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, scale_kernels.ScaleLinear) and "forward" in vars(module):
            del module.forward
            count += 1
    return count


def set_backend(model: nn.Module, backend: str | None) -> int:
    """Set ``backend`` on every ``ScaleLinear`` of ``model`` (None: dispatcher decides); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, scale_kernels.ScaleLinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


def route_mask(batch_size: int, seq_len: int, device: torch.device, seed: int = 2) -> torch.Tensor:
    """``(batch, seq)`` bool mask, each token on the adaptation path with probability 0.5 (SCALE-Route)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(batch_size, seq_len, generator=gen) < 0.5).to(device)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
    }


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Non-reentrant HF gradient checkpointing on or off (the model is put in training mode)."""
    model.train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
