"""The memory estimator against counted tensors on CPU, and the precision policy.

Parameter, gradient and AdamW-state bytes must be exact (counted on a real model after one optimizer step).
Saved activations are counted with ``saved_tensors_hooks`` (each storage once, parameters excluded) on tiny
Llama models under bf16 CPU autocast with the precision policy: the formula must match exactly without gradient
checkpointing (every term of docs/memory.md is exercised) and within 2% with it (the count then adds the
decoder-layer inputs the checkpoint keeps).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import triton_usable
from helpers_upscale import _COMMON, EXPANSION, base_model, token_ids

import scale_kernels as sk
from scale_kernels import memory as mem
from scale_kernels.models import set_activation_checkpointing
from scale_kernels.models.lora import apply_lora
from scale_kernels.precision import PrecisionPolicy, apply_precision_policy

CONFIG = dict(model_type="llama", **_COMMON)
B, S, LORA_R = 2, 8, 4


def build(method: str, fused: bool = True, norm_kernel: bool = False) -> torch.nn.Module:
    model = base_model("llama")
    if method == "lora":
        model = apply_lora(model, LORA_R, 8, list(mem.LORA_TARGETS))
    elif method == "scale":
        sk.upscale_model(model, **EXPANSION, fused_loss=fused)
        for module in model.modules():
            if isinstance(module, sk.ScaleRMSNorm) and norm_kernel:
                module.backend = "triton"
    model.train()
    apply_precision_policy(model)
    return model


def estimate(method: str, **kwargs) -> mem.MemoryEstimate:
    upscale = EXPANSION if method == "scale" else None
    return mem.estimate_training_memory(
        CONFIG, method, batch_size=B, seq_len=S, upscale=upscale, lora_r=LORA_R, **kwargs
    )


def counted_step(model: torch.nn.Module, checkpointing: bool = False) -> dict:
    """Saved bytes of one forward (+ the decoder-layer inputs a checkpoint keeps alive)."""
    if checkpointing:
        set_activation_checkpointing(model)
    inputs: dict[int, int] = {}

    def keep_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs[hidden.untyped_storage().data_ptr()] = hidden.untyped_storage().nbytes()

    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    handles = (
        [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers] if checkpointing else []
    )
    ids = token_ids(B, S)
    with mem.count_saved_tensors(model) as counted, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    for h in handles:
        h.remove()
    loss.backward()
    return {"saved": counted["bytes"] + sum(inputs.values()), "loss": loss}


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("full_ft", {}),
        ("lora", {}),
        ("scale", dict(fused=True)),
        ("scale", dict(fused=False)),
        pytest.param(
            "scale",
            dict(fused=True, norm_kernel=True),
            marks=pytest.mark.skipif(not triton_usable(), reason="no triton"),
        ),
    ],
)
def test_saved_activations_are_exact_without_checkpointing(method, kwargs):
    model = build(method, **kwargs)
    est = estimate(method, fused_loss=kwargs.get("fused", False), norm_kernel=kwargs.get("norm_kernel", False))
    assert counted_step(model)["saved"] == est.activations + est.compute_copies


@pytest.mark.parametrize("method", ["full_ft", "lora", "scale"])
def test_saved_activations_with_gradient_checkpointing(method):
    model = build(method)
    est = estimate(method, gradient_checkpointing=True, fused_loss=method == "scale", norm_kernel=False)
    counted = counted_step(model, checkpointing=True)["saved"]
    # weight copies made inside the checkpointed layers are recomputed, not kept: compare activations only
    assert abs(counted - est.activations) <= 0.02 * counted + est.compute_copies


@pytest.mark.parametrize("method", ["full_ft", "lora", "scale"])
def test_parameter_gradient_and_adamw_bytes_are_exact(method):
    model = build(method)
    est = estimate(method)
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() * p.element_size() for p in params) == est.weights
    assert sum(p.numel() for p in params if p.requires_grad) == est.trainable_params
    counted_step(model)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert grads == est.gradients and state == est.optimizer


def test_peak_combines_the_components_and_the_fused_head_removes_the_logits():
    fused, plain = estimate("scale", fused_loss=True), estimate("scale", fused_loss=False)
    for est in (fused, plain):
        body = est.compute_copies + est.activations + est.loss_transient
        assert est.peak == est.weights + est.optimizer + max(body, est.gradients)
    assert plain.loss_transient > fused.loss_transient
    assert plain.details["loss_saved_bytes"] > B * S * 4 * 100  # fp32 log-probs of every token


def test_issue_shapes_full_ft_8b_does_not_fit_scale_does():
    """What bench_model's 8B case relies on (and documents): full FT with AdamW cannot fit 80 GB, SCALE can."""
    cfg, upscale = mem.PRESETS["llama-3.1-8b"], mem.UPSCALE_PRESETS["llama-3.1-8b"]
    kw = dict(batch_size=1, seq_len=4096, gradient_checkpointing=True, upscale=upscale)
    full = mem.estimate_training_memory(cfg, "full_ft", **kw)
    scale = mem.estimate_training_memory(cfg, "scale", **kw)
    assert full.weights + full.gradients + full.optimizer > 80 * 2**30
    assert scale.peak < 70 * 2**30


def test_cli_table_json_and_errors(capsys):
    assert mem.main(["--batch-size", "1", "--seq-len", "16", "--methods", "full_ft", "scale"]) == 0
    out = capsys.readouterr().out
    assert "| full_ft |" in out and "| scale |" in out and "fits in 80 GiB" in out
    assert mem.main(["--batch-size", "1", "--seq-len", "16", "--methods", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["method"] == "lora"
    with pytest.raises(SystemExit):
        mem.main(["--model", "no/such/config.json"])
    with pytest.raises(ValueError, match="batch_size"):
        mem.estimate_training_memory(CONFIG, "full_ft", batch_size=0, seq_len=4)
    with pytest.raises(ValueError, match="method must be"):
        mem.estimate_training_memory(CONFIG, "qlora", batch_size=1, seq_len=4)


def test_precision_policy_casts_by_requires_grad_and_keeps_ties():
    model = base_model("llama_tied")
    sk.upscale_model(model, **EXPANSION)
    counts = apply_precision_policy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    policy = PrecisionPolicy(frozen_dtype=torch.float16)
    assert policy.bytes_per_parameter(True) == {"weight": 4, "gradient": 4, "optimizer": 8}
    assert policy.bytes_per_parameter(False) == {"weight": 2, "gradient": 0, "optimizer": 0}
    with pytest.raises(ValueError, match="frozen_dtype"):
        PrecisionPolicy(frozen_dtype=torch.int8)
    param = next(p for p in model.parameters() if p.requires_grad)
    param.grad = torch.zeros_like(param)
    with pytest.raises(ValueError, match="already has a gradient"):
        apply_precision_policy(model)


def test_policy_training_step_keeps_the_frozen_base_bit_identical():
    model = build("scale")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        counted_step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen[name]), name
        else:
            assert all(t.dtype == torch.float32 for t in opt.state[p].values() if t.dim())
