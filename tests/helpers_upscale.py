"""Shared fixtures for the model-upscaling tests: tiny randomly initialised HF models (fp32, CPU).

Sizes: hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA group 2), head_dim 16, FFN 128, vocab 100.
Expansion used by default: +32 hidden, +1 KV head (+2 query heads), +64 FFN.

Tolerance: ``ATOL = 1e-5`` on fp32 logits of magnitude ~1. The rule: a Preserve model, and any freshly upscaled
model, must reproduce the base model's logits (and its cached greedy generation) to 1e-5 in fp32. The original
stream runs the same fp32 operations as the base model; the only differences are summation order (a sliced
RMSNorm, the fused op's matmul on a column slice), a few ulps (~1e-7), so 1e-5 leaves two orders of margin while
a real leak of the expansion (weights ~0.02, trained with lr 1e-2) moves logits by >1e-2.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import scale_kernels as sk

ATOL = 1e-5
VOCAB = 100
EXPANSION = {"extra_hidden": 32, "extra_kv_heads": 1, "extra_intermediate": 64}
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**_COMMON)),
    "llama_tied": (LlamaForCausalLM, lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**_COMMON)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**_COMMON, sliding_window=8)),
}


def base_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A fresh tiny base model in eval mode (same seed -> same weights)."""
    cls, make_config = FAMILIES[family]
    torch.manual_seed(seed)
    return cls(make_config()).eval()


def upscaled(base: torch.nn.Module, mode: str = "preserve", **kwargs) -> torch.nn.Module:
    """An upscaled deep copy of ``base`` (``base`` itself is left untouched)."""
    args = {**EXPANSION, "seed": 0, **kwargs}
    return sk.upscale_model(copy.deepcopy(base), mode=mode, **args)


def token_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def causal_lm_examples() -> list[dict[str, torch.Tensor]]:
    """8 training examples of 8 tokens (``input_ids`` and equal ``labels``), a dataset for ``transformers.Trainer``."""
    return [{"input_ids": token_ids(1, 8, seed=s)[0], "labels": token_ids(1, 8, seed=s)[0]} for s in range(8)]


def train_steps(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2, **forward_kwargs) -> None:
    """A plain PyTorch training loop over the trainable (expansion) parameters."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = token_ids(seed=100 + step)
        loss = model(ids, labels=ids, **forward_kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def greedy(model: torch.nn.Module, ids: torch.Tensor, new: int = 4, **kwargs) -> torch.Tensor:
    """Greedy generation with the KV cache (one prompt at a time: no padding involved)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        **kwargs,
    )
