"""upscale_model on every supported family (tiny HF models, fp32, CPU): exact preservation, frozen base,
collaborative adaptation, configuration, misuse. Family-specific checks live in test_models_<family>.py."""

from __future__ import annotations

import pytest
import torch
from helpers_upscale import (
    ATOL,
    FAMILIES,
    base_model,
    greedy,
    logits,
    max_diff,
    token_ids,
    train_steps,
    upscaled,
)

import scale_kernels as sk
from scale_kernels.modules import EXPANSION_PARAM_NAMES, ScaleLinear

MODES = ("preserve", "adapt", "route")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fresh_upscaled_model_reproduces_base_in_every_mode(family):
    base = base_model(family)
    ids = token_ids()
    ref = logits(base, ids)
    ref_gen = greedy(base, ids[:1])
    for mode in MODES:
        model = upscaled(base, mode)
        assert max_diff(logits(model, ids), ref) <= ATOL, mode
        assert torch.equal(greedy(model, ids[:1]), ref_gen), mode


@pytest.mark.parametrize("family", ["llama_tied", "qwen2"])
def test_preserve_after_training_keeps_base_bit_identical_and_original_stream_exact(family):
    base = base_model(family)
    model = upscaled(base, "preserve")
    before = _snapshot(model)
    ids = token_ids()
    train_steps(model)
    after = dict(model.named_parameters())
    for name, value in before.items():
        p = after[name]
        if name.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES:
            continue
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, value), name
    changed = [
        n
        for n, v in before.items()
        if n.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES and v.numel() and not torch.equal(after[n], v)
    ]
    assert any("weight_21" in n for n in changed) and any("weight_22" in n for n in changed)
    assert "lm_head.weight_12" in changed  # W_head_up is how Preserve reaches the output

    # the original-width hidden stream is the base model's, in every layer
    with torch.no_grad():
        h_base = base(ids, output_hidden_states=True).hidden_states
        h_up = model(ids, output_hidden_states=True).hidden_states
    d = base.config.hidden_size
    for hb, hu in zip(h_base, h_up, strict=True):
        assert max_diff(hu[..., :d], hb) <= ATOL
    # logits = base logits + W_head_up h_up exactly; without the head's expansion term they are the base's
    ref = logits(base, ids)
    head = model.lm_head
    expected = ref + h_up[-1][..., d:] @ head.weight_12.detach().t()
    assert max_diff(logits(model, ids), expected) <= ATOL
    assert max_diff(logits(model, ids), ref) > 1e-3  # training did move the output through W_head_up
    with sk.original_stream(model):
        assert max_diff(logits(model, ids), ref) <= ATOL
        assert torch.equal(greedy(model, ids[:1]), greedy(base, ids[:1]))


@pytest.mark.parametrize("mode", ["adapt", "route"])
def test_adapt_and_route_diverge_only_through_w12(mode):
    base = base_model("qwen2")
    model = upscaled(base, mode)
    ids = token_ids()
    ref = logits(base, ids)
    train_steps(model)
    assert max_diff(logits(model, ids), ref) > 1e-3
    w12 = {n: p for n, p in model.named_parameters() if n.endswith("weight_12")}
    assert any(p.abs().sum() > 0 for n, p in w12.items() if not n.startswith("lm_head"))
    with sk.original_stream(model):  # every W12 term (and the head's) off
        assert max_diff(logits(model, ids), ref) <= ATOL
    with torch.no_grad():  # same, by zeroing the W12 blocks themselves
        for p in w12.values():
            p.zero_()
    assert max_diff(logits(model, ids), ref) <= ATOL


def test_original_parameters_frozen_and_only_expansion_trainable():
    model = upscaled(base_model("llama"), "adapt")
    for name, p in model.named_parameters():
        is_expansion = name.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES
        assert p.requires_grad == (is_expansion and p.numel() > 0), name  # empty blocks hold nothing to train
    report = sk.trainable_parameter_report(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {n_train:,}" in report and "frozen params" in report


def test_config_reports_new_sizes_and_modules_are_counted():
    base = base_model("llama")
    model = upscaled(base, "adapt")
    c = model.config
    sizes = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    assert sizes == (96, 6, 3, 192)
    assert c.head_dim == 16 and c.scale_upscale["extra_heads"] == 2
    assert c.scale_upscale["base_hidden_size"] == 64
    # 7 projections x 2 layers + LM head
    assert model.scale_upscaled_modules == 15
    assert sum(isinstance(m, ScaleLinear) for m in model.modules()) == 15
    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 2 and attn.head_dim == 16
    assert "out_features=64+32" in repr(attn.q_proj) and "mode=adapt" in repr(attn.q_proj)


def test_collaborative_adaptation_w12_only_in_chosen_layers_and_modules():
    model = upscaled(base_model("llama"), "adapt", adapt_layers=[-1], adapt_modules="attention")
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(layer.self_attn, name)
            assert (module.weight_12 is not None) == (i == 1), (i, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(layer.mlp, name).weight_12 is None
    assert model.config.scale_upscale["adapt_layers"] == [1]
    assert model.lm_head.weight_12 is not None  # the head's expansion is not W12 of a layer


def test_extra_hidden_zero_widens_only_heads_and_ffn():
    base = base_model("llama")
    model = upscaled(base, "adapt", extra_hidden=0, extra_kv_heads=1, extra_intermediate=16)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.model.layers[0].self_attn.q_proj.weight_12 is None  # e_in = 0: nothing to route
    assert model.model.layers[0].self_attn.o_proj.weight_12 is not None
    ids = token_ids()
    assert max_diff(logits(model, ids), logits(base, ids)) <= ATOL
    train_steps(model, steps=1)
    with sk.original_stream(model):
        assert max_diff(logits(model, ids), logits(base, ids)) <= ATOL


@pytest.mark.parametrize("init", ["zeros", "random", "svd"])
def test_every_init_preserves_and_seed_is_reproducible(init):
    base = base_model("llama")
    a, b = upscaled(base, "adapt", init=init, seed=3), upscaled(base, "adapt", init=init, seed=3)
    ids = token_ids()
    assert max_diff(logits(a, ids), logits(base, ids)) <= ATOL
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_triton_backend_matches_torch_backend():
    if sk.available_backends()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {sk.available_backends()['triton']}")
    base = base_model("llama")
    model = upscaled(base, "adapt", extra_hidden=16, extra_kv_heads=1, extra_intermediate=16)
    train_steps(model, steps=1)
    ids = token_ids(batch=1, seq=4)
    with sk.use_backend("torch"):
        ref = logits(model, ids)
    with sk.use_backend("triton"):
        out = logits(model, ids)
        assert sk.last_backend() == "triton"
    assert max_diff(out, ref) <= 1e-4  # fp32 kernel vs matmul: accumulation order only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_hidden": -1}, "extra_hidden must be >= 0"),
        ({"extra_intermediate": -8}, "extra_intermediate must be >= 0"),
        ({"extra_kv_heads": -1}, "extra_kv_heads must be >= 0"),
        ({"extra_heads": 3}, "multiple of the GQA group size 2"),
        ({"extra_heads": 4, "extra_kv_heads": 1}, "inconsistent"),
        ({"extra_hidden": 0, "extra_kv_heads": 0, "extra_intermediate": 0}, "nothing to upscale"),
        ({"mode": "merge"}, "mode must be one of"),
        ({"init": "orthogonal"}, "init must be one of"),
        ({"adapt_layers": [0]}, "mode='preserve' has no W12"),
        ({"mode": "adapt", "adapt_layers": [2]}, r"adapt_layers entries must be ints in \[-2, 2\)"),
        ({"mode": "adapt", "adapt_modules": ["lm_head"]}, "adapt_modules entry 'lm_head' unknown"),
        ({"mode": "adapt", "adapt_layers": []}, "select nothing"),
    ],
)
def test_misuse_gets_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        upscaled(base_model("llama"), **kwargs)


def test_size_arguments_must_be_ints():
    with pytest.raises(TypeError, match="extra_hidden must be an int"):
        upscaled(base_model("llama"), extra_hidden=8.0)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    supported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*{supported}"):
        sk.upscale_model(model, 8)


def test_upscaling_twice_is_refused():
    model = upscaled(base_model("llama"))
    with pytest.raises(ValueError, match="already upscaled"):
        sk.upscale_model(model, 8)


def test_callers_config_object_is_not_mutated():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base, model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    sk.upscale_model(model, 32, extra_kv_heads=1)
    assert config.hidden_size == 64 and base.config.hidden_size == 64 and base.config.num_key_value_heads == 2
    assert model.config.hidden_size == 96
    assert model.model.config is model.config and model.model.layers[0].self_attn.config is model.config
