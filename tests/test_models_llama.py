"""Llama specifics: GQA head ordering of the appended heads, tied embeddings."""

from __future__ import annotations

import torch
from helpers_upscale import ATOL, base_model, logits, max_diff, token_ids, train_steps, upscaled

import scale_kernels as sk


def _attention_heads(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs of layer 0 (the o_proj input), ``(batch, seq, heads, head_dim)``."""
    captured = []
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return captured[0].unflatten(-1, (-1, model.config.head_dim))


def test_new_query_heads_read_only_the_new_kv_heads():
    """4 q / 2 kv heads (+2 q / +1 kv): heads 0-3 must read KV 0-1 only, heads 4-5 the new KV head 2."""
    model = upscaled(base_model("llama"), "preserve")
    ids = token_ids()
    before = _attention_heads(model, ids)
    assert before.shape[-2] == 6
    v = model.model.layers[0].self_attn.v_proj
    with torch.no_grad():  # change only the new KV head's values
        v.weight_21.add_(torch.randn_like(v.weight_21))
    after = _attention_heads(model, ids)
    assert torch.equal(after[..., :4, :], before[..., :4, :])  # original heads untouched
    assert max_diff(after[..., 4:, :], before[..., 4:, :]) > 1e-2  # new heads do read the new KV head


def test_original_heads_equal_base_heads():
    base = base_model("llama")
    model = upscaled(base, "adapt")
    ids = token_ids()
    heads_base = _attention_heads(base, ids)
    assert max_diff(_attention_heads(model, ids)[..., :4, :], heads_base) <= ATOL


def test_tied_embedding_stays_tied_and_head_expansion_is_separate():
    model = upscaled(base_model("llama_tied"), "preserve")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.requires_grad
    head_up, emb_up = model.lm_head.weight_12, model.model.embed_tokens.weight_up
    assert head_up.data_ptr() != emb_up.data_ptr() and torch.count_nonzero(head_up) == 0
    emb_before = model.model.embed_tokens.weight.clone()
    train_steps(model, steps=1)
    assert torch.equal(model.model.embed_tokens.weight, emb_before)
    assert torch.count_nonzero(head_up) > 0


def test_svd_init_starts_expansion_from_principal_directions():
    base = base_model("llama")
    model = upscaled(base, "preserve", init="svd")
    q = model.model.layers[0].self_attn.q_proj
    s = torch.linalg.svdvals(q.weight)
    # rows of W21 are s_j v_j^T: orthogonal with norms s_j
    gram = q.weight_21 @ q.weight_21.t()
    k = q.extra_out
    assert torch.allclose(gram, torch.diag(s[:k] ** 2), atol=1e-4)
    assert max_diff(logits(model, token_ids()), logits(base, token_ids())) <= ATOL
    with sk.original_stream(model):
        assert max_diff(logits(model, token_ids()), logits(base, token_ids())) <= ATOL
