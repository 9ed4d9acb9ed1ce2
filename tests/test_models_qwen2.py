"""Qwen2 specifics: q/k/v carry a bias (frozen) and the expansion gets a trainable bias_up."""

from __future__ import annotations

import torch
from helpers_upscale import ATOL, base_model, logits, max_diff, token_ids, train_steps, upscaled


def test_qkv_bias_is_frozen_and_bias_up_trains():
    base = base_model("qwen2")
    model = upscaled(base, "preserve")
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        m = getattr(attn, name)
        assert m.bias is not None and not m.bias.requires_grad
        assert m.bias_up is not None and m.bias_up.requires_grad and m.bias_up.shape == (m.extra_out,)
    assert attn.o_proj.bias is None and attn.o_proj.bias_up is None
    bias_before = attn.q_proj.bias.clone()
    train_steps(model, steps=2)
    assert torch.equal(attn.q_proj.bias, bias_before) and attn.q_proj.bias.grad is None
    assert torch.count_nonzero(attn.q_proj.bias_up) > 0


def test_head_dim_is_written_into_config():
    model = upscaled(base_model("qwen2"), "adapt")
    # (64 + 32) / (4 + 2) = 16 happens to match; the config records it explicitly either way
    assert model.config.head_dim == 16 and model.model.layers[1].self_attn.head_dim == 16
    ids = token_ids()
    assert max_diff(logits(model, ids), logits(base_model("qwen2"), ids)) <= ATOL
