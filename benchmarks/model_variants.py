"""Models of the model-level benchmark: a Llama-shaped model from config (random weights, no download) and
the variants trained on it: full fine-tuning, LoRA (peft), the hand-written upscaled model and this package.

The upscaled models come from ``scale_kernels.upscale_model``. The hand-written upscaled model is the same
upscaled model computed in plain PyTorch: every ``ScaleLinear.forward`` rebound to
:func:`handwritten_scale_linear_forward` (4 ``F.linear`` + route multiply + ``cat`` under plain autograd), the
split RMSNorm on its PyTorch path and the loss on materialised logits (the fused head switched off).

Every variant follows the same precision recipe (:class:`scale_kernels.precision.PrecisionPolicy`): frozen
weights in the benchmark dtype, trainable weights as fp32 masters (full fine-tuning: all of them), compute
under autocast. Models are built directly on the benchmark device, in their final dtypes.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
from torch import nn

import scale_kernels
from scale_kernels.memory import UPSCALE_PRESETS, estimate_training_memory
from scale_kernels.models import set_activation_checkpointing
from scale_kernels.models.lora import apply_lora
from scale_kernels.parameters import count_parameters
from scale_kernels.precision import PrecisionPolicy, apply_precision_policy
from scale_kernels.reference import upscaled_linear_reference

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
# Llama-3.1-8B's shape (random weights, untied head): ~8.0B parameters.
LLAMA_8B = {
    **LLAMA_1B,
    **dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128, tie_word_embeddings=False),
}
# +25% width. 1B: 512 more hidden channels = 8 query heads of 64 (2 KV heads x GQA group 4), FFN 8192 -> 10240.
# 8B: 1024 = 8 query heads of 128 (2 KV heads), FFN 14336 -> 17920.
UPSCALE_1B = dict(UPSCALE_PRESETS["llama-3.2-1b"])
UPSCALE_8B = dict(UPSCALE_PRESETS["llama-3.1-8b"])
SMOKE_LLAMA = {
    **LLAMA_1B,
    **dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2),
    **dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256),
}
SMOKE_UPSCALE = dict(extra_hidden=32, extra_heads=2, extra_kv_heads=1, extra_intermediate=64)
LORA = dict(r=16, alpha=32, target_modules="all-linear")

FULL_FT, LORA_NAME, HANDWRITTEN_UPSCALED = "full_ft", "lora", "handwritten_upscaled"


@dataclass(frozen=True)
class ModelSpec:
    """The base model config (``LlamaConfig`` kwargs), the upscaling sizes and the SCALE mode."""

    base: dict
    upscale: dict
    mode: str = "preserve"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``spec.base``, created on ``device`` in ``dtype`` (no CPU
    copy, no second copy in another dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(LlamaConfig(**spec.base))
    return model.to(dtype)


def precision_policy(dtype: torch.dtype) -> PrecisionPolicy:
    """The recipe of every variant: frozen weights in ``dtype``, fp32 masters, ``dtype`` compute."""
    return PrecisionPolicy(frozen_dtype=dtype, trainable_dtype=torch.float32, compute_dtype=dtype)


def build_full_ft(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Full fine-tuning under the recipe: every weight trains, so every weight is an fp32 master."""
    return build_base(spec, device, precision_policy(dtype).trainable_dtype)


def upscale_unavailable_reason() -> str | None:
    """None when ``scale_kernels.upscale_model`` exists, else why the upscaled variants are skipped."""
    if getattr(scale_kernels, "upscale_model", None) is None or getattr(scale_kernels, "ScaleLinear", None) is None:
        return "scale_kernels.upscale_model / ScaleLinear are not available (module layer not merged yet)"
    return None


@torch.no_grad()
def build_upscaled(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``scale_kernels.upscale_model`` applied to a fresh base model (every pretrained weight frozen), under the
    precision recipe. W21/W22/E_up are drawn N(0, 0.02^2) on ``device`` (the package's ``init="random"`` draws on
    the CPU, slow for billions of parameters); W12 and W_head_up stay zero, as upscale_model leaves them."""
    model = build_base(spec, device, dtype)
    scale_kernels.upscale_model(model, **spec.upscale, mode=spec.mode, init="zeros")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("weight_21", "weight_22") or name.endswith("embed_tokens.weight_up"):
            p.normal_(0.0, 0.02, generator=gen)
    apply_precision_policy(model, precision_policy(dtype))
    return model


def build_lora(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """peft LoRA (``LORA`` settings: r=16, alpha=32, every linear but the head) on a fresh base model, adapters
    as fp32 masters."""
    model = apply_lora(build_base(spec, device, dtype), **LORA)
    apply_precision_policy(model, precision_policy(dtype))
    return model


METHOD_OF = {FULL_FT: "full_ft", LORA_NAME: "lora", HANDWRITTEN_UPSCALED: "handwritten"}


def predicted_peak_mb(spec: ModelSpec, impl: str, dtype: torch.dtype, case: dict) -> float | None:
    """The memory estimator's peak (MiB) for ``impl`` in ``case`` (None if it cannot say)."""
    method = METHOD_OF.get(impl, "scale")
    try:
        est = estimate_training_memory(
            {"model_type": "llama", **spec.base}, method, batch_size=case["batch_size"], seq_len=case["seq_len"],
            gradient_checkpointing=case["gradient_checkpointing"], upscale=spec.upscale,
            lora_r=LORA["r"], policy=precision_policy(dtype),
        )  # fmt: skip
    except Exception:  # an estimate is a comparison aid: its failure must not lose a measurement
        return None
    return est.peak / 2**20


def handwritten_scale_linear_forward(
    self: nn.Module, x: torch.Tensor, route: torch.Tensor | None = None
) -> torch.Tensor:
    """``ScaleLinear.forward`` written by hand: ``upscaled_linear_reference`` (plain ``F.linear`` + route multiply +
    ``cat``, see ``benchmarks.layers.HandWrittenUpscaledLinear``) on the layer's weights.

    W12 and the route are resolved exactly as ``ScaleLinear.forward`` resolves them (its
    ``_w12_and_route``: the model-level ``scale_route`` mask, ``original_stream``), so both compute the same.
    """
    w12, route = self._w12_and_route(route)
    return upscaled_linear_reference(
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
        elif isinstance(module, scale_kernels.ScaleRMSNorm):
            module.backend = "torch"
    if count == 0:
        raise RuntimeError("swap_to_handwritten: the model has no ScaleLinear layer to swap")
    model.scale_fused_loss = False
    return count


def restore_forward(model: nn.Module) -> int:
    """Undo :func:`swap_to_handwritten` (drop the per-instance ``forward``); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, scale_kernels.ScaleLinear) and "forward" in vars(module):
            del module.forward
            count += 1
        elif isinstance(module, scale_kernels.ScaleRMSNorm):
            module.backend = None
    if count:
        model.scale_fused_loss = True
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
    """``trainable_params`` / ``total_params`` of a variant for its records (tied weights counted once)."""
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total}


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Non-reentrant HF gradient checkpointing on or off (the model is put in training mode)."""
    model.train()
    set_activation_checkpointing(model, enabled)
