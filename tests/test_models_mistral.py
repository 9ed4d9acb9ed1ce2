"""Mistral specifics: an explicit head_dim different from hidden / heads stays fixed; sliding window."""

from __future__ import annotations

import copy

import torch
from helpers_upscale import ATOL, greedy, logits, max_diff, token_ids
from transformers import MistralConfig, MistralForCausalLM

import scale_kernels as sk


def test_explicit_head_dim_is_kept_and_preserved():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=64,
    )
    base = MistralForCausalLM(config).eval()
    model = sk.upscale_model(copy.deepcopy(base), 24, extra_heads=4, extra_intermediate=8, mode="adapt", seed=0)
    assert model.config.head_dim == 8 and model.config.num_key_value_heads == 4
    q = model.model.layers[0].self_attn.q_proj
    assert (q.out_features, q.extra_out) == (32, 32)  # 4 heads * 8 + 4 new heads * 8
    ids = token_ids(seq=9)  # longer than the sliding window
    assert max_diff(logits(model, ids), logits(base, ids)) <= ATOL
    assert torch.equal(greedy(model, ids[:1], new=3), greedy(base, ids[:1], new=3))
