"""Expansion-only checkpoints, save_pretrained round trips, merge to dense, parameter reports."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from helpers_upscale import ATOL, base_model, logits, max_diff, token_ids, train_steps, upscaled
from safetensors.torch import load_file

import scale_kernels as sk
from scale_kernels.modules import GroupedRMSNorm, ScaleEmbedding, ScaleLinear, ScaleRMSNorm
from scale_kernels.parameters import count_parameters, expansion_state_dict, trainable_state_dict
from scale_kernels.serialization import EXPANSION_CONFIG, EXPANSION_PARAM_NAMES, EXPANSION_WEIGHTS


def _trained(family: str, mode: str, **kwargs) -> torch.nn.Module:
    model = upscaled(base_model(family), mode, **kwargs)
    train_steps(model, steps=2)
    return model


@pytest.mark.parametrize(("family", "mode"), [("llama_tied", "adapt"), ("qwen2", "preserve")])
def test_save_and_load_expansion_round_trip(tmp_path, family, mode):
    model = _trained(family, mode, adapt_layers=[1] if mode == "adapt" else None)
    ids = token_ids()
    ref = logits(model, ids)
    sk.save_expansion(model, tmp_path)
    saved = load_file(str(tmp_path / EXPANSION_WEIGHTS))
    assert saved and all(k.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES for k in saved)  # no base weight
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters()) - n_frozen
    meta = json.loads((tmp_path / EXPANSION_CONFIG).read_text())
    assert meta["upscale"]["mode"] == mode and meta["model_class"] == type(model).__name__

    loaded = sk.load_expansion(base_model(family), tmp_path)
    assert max_diff(logits(loaded, ids), ref) == 0.0
    assert loaded.config.scale_upscale == model.config.scale_upscale
    for (n, p), q in zip(loaded.named_parameters(), model.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, n


def test_load_expansion_rejects_a_different_base(tmp_path):
    model = upscaled(base_model("llama"), "preserve")
    sk.save_expansion(model, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match=r"hidden_size=32 \(expected 64\)"):
        sk.load_expansion(other, tmp_path)
    with pytest.raises(ValueError, match="saved from a LlamaForCausalLM"):
        sk.load_expansion(base_model("qwen2"), tmp_path)
    with pytest.raises(FileNotFoundError, match="expansion_config.json"):
        sk.load_expansion(base_model("llama"), tmp_path / "missing")
    with pytest.raises(ValueError, match="not an upscaled model"):
        sk.save_expansion(base_model("llama"), tmp_path)


@pytest.mark.parametrize("family", ["llama_tied", "mistral"])
def test_save_pretrained_and_load_upscaled_round_trip(tmp_path, family):
    model = _trained(family, "route")
    ids = token_ids()
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    ref = logits(model, ids, scale_route=mask)
    model.save_pretrained(tmp_path)
    loaded = sk.load_upscaled(tmp_path)
    assert max_diff(logits(loaded, ids, scale_route=mask), ref) == 0.0
    assert loaded.config.hidden_size == 96 and loaded.config.scale_upscale == model.config.scale_upscale
    if family == "llama_tied":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(ValueError, match="holds no upscaled model"):
        base_model(family).save_pretrained(tmp_path / "plain")
        sk.load_upscaled(tmp_path / "plain")


@pytest.mark.parametrize(("family", "mode"), [("llama_tied", "adapt"), ("qwen2", "preserve"), ("mistral", "adapt")])
def test_merge_to_dense_reproduces_logits(family, mode):
    model = _trained(family, mode)
    ids = token_ids()
    ref = logits(model, ids)
    dense = sk.merge_to_dense(model)
    assert max_diff(logits(dense, ids), ref) <= ATOL
    scale_types = (ScaleLinear, ScaleRMSNorm, ScaleEmbedding)
    assert not any(isinstance(m, scale_types) for m in dense.modules())
    assert any(isinstance(m, GroupedRMSNorm) for m in dense.modules())
    assert all(p.requires_grad for p in dense.parameters())
    assert not hasattr(dense.config, "scale_upscale") and not dense.config.tie_word_embeddings
    q = dense.model.layers[0].self_attn.q_proj
    assert isinstance(q, torch.nn.Linear) and q.weight.shape == (96, 96)
    assert max_diff(logits(model, ids), ref) == 0.0  # the upscaled model is left untouched


def test_merge_to_dense_keeps_the_users_hooks_and_drops_only_the_packages():
    model = _trained("llama", "route")
    ids = token_ids()
    ref = logits(model, ids, scale_route=True)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model.register_forward_hook(lambda module, args, output: calls.append("post"))
    model.model.layers[0].register_forward_hook(lambda module, args, output: calls.append("layer"))
    dense = sk.merge_to_dense(model, route=1.0)
    calls.clear()
    assert max_diff(logits(dense, ids), ref) <= ATOL  # same outputs, and the user's hooks still run
    assert calls == ["pre", "layer", "post"]
    assert len(dense._forward_pre_hooks) == len(dense._forward_hooks) == 1  # the user's only (read, not touched)
    for attr in ("scale_has_route", "scale_fused_loss", "scale_upscaled_modules", "prepare_inputs_for_generation"):
        assert attr not in vars(dense), attr
    with pytest.raises(ValueError, match=r"not used by the model: \['scale_route'\]"):  # generate's own check
        dense.generate(ids[:1], max_new_tokens=1, scale_route=True)
    calls.clear()  # the upscaled model keeps its hooks: the route still works, the user's hooks run once
    assert max_diff(logits(model, ids, scale_route=True), ref) == 0.0
    assert calls == ["pre", "layer", "post"]
    model.train()  # and its fused loss too (logits None)
    assert model(ids, labels=ids).logits is None and dense.train()(ids, labels=ids).logits is not None


def test_expansion_state_dict_holds_exactly_the_new_parameters():
    model = upscaled(base_model("llama_tied"), "adapt", adapt_layers=[1])
    names = set(expansion_state_dict(model))
    assert names == {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES}
    assert "lm_head.weight_12" in names and "model.embed_tokens.weight_up" in names
    assert "model.layers.0.self_attn.q_proj.weight_12" not in names  # Preserve layer: no W12
    trainable = trainable_state_dict(model)
    assert set(trainable) == {n for n in names if expansion_state_dict(model)[n].numel()}
    assert count_parameters(model) == (
        sum(t.numel() for t in trainable.values()),
        sum(p.numel() for p in model.parameters()),
    )


def test_checkpoint_module_is_a_deprecated_alias():
    sys.modules.pop("scale_kernels.checkpoint", None)
    with pytest.warns(DeprecationWarning, match="scale_kernels.checkpoint is deprecated"):
        old = importlib.import_module("scale_kernels.checkpoint")
    assert old.merge_to_dense is sk.merge_to_dense and old.save_expansion is sk.save_expansion
    assert old.EXPANSION_PARAM_NAMES is EXPANSION_PARAM_NAMES and old.EXPANSION_WEIGHTS == EXPANSION_WEIGHTS
    assert old.trainable_parameter_report is sk.trainable_parameter_report


def test_merge_route_model_needs_a_fixed_route():
    model = _trained("llama", "route")
    ids = token_ids()
    with pytest.raises(ValueError, match="pass route=0.0"):
        sk.merge_to_dense(model)
    for route in (False, True):
        dense = sk.merge_to_dense(model, route=float(route))
        assert max_diff(logits(dense, ids), logits(model, ids, scale_route=route)) <= ATOL


def test_trainable_parameter_report(capsys):
    model = upscaled(base_model("llama"), "preserve")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sk.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,}" in out and f"all params: {total:,}" in out
    assert f"trainable%: {100 * trainable / total:.4f}" in out
    tied = upscaled(base_model("llama_tied"), "preserve")  # a tied weight is counted once
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert f"all params: {sum(unique.values()):,}" in sk.trainable_parameter_report(tied)
