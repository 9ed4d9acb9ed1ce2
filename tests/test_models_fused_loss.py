"""The fused LM head + cross-entropy inside upscaled HF models: same loss and gradients as the unfused model.

``model(ids, labels=...)`` in training mode runs the fused path (logits None); ``model.scale_fused_loss = False``
runs HF's own loss on materialised logits, the reference here. Llama (untied and tied head), Qwen2 (q/k/v bias)
and Mistral tiny configs, every mode, HF's loss kwargs (ignore_index, shift_labels, num_items_in_batch),
route gating of the head, ``original_stream``, gradient checkpointing and ``transformers.Trainer``.
Tolerance: fp32, the two paths differ by summation order only (rtol 1e-5 / atol 1e-6, on losses ~4.6 and
gradients ~1e-2).
"""

from __future__ import annotations

import pytest
import torch
from helpers_upscale import base_model, causal_lm_examples, token_ids, upscaled

import scale_kernels as sk
from scale_kernels.models import set_activation_checkpointing
from scale_kernels.models.fused_loss import install_fused_loss
from scale_kernels.modules import ScaleLMHead

TOL = dict(rtol=1e-5, atol=1e-6)


def perturbed(family: str, mode: str = "adapt", **kwargs) -> torch.nn.Module:
    """An upscaled model whose expansion is non-zero (as after some training), in training mode."""
    model = upscaled(base_model(family), mode=mode, **kwargs)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def loss_and_grads(model: torch.nn.Module, fused: bool, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
    model.scale_fused_loss = fused
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model: torch.nn.Module, **kwargs) -> object:
    fused, g_fused = loss_and_grads(model, True, **kwargs)
    plain, g_plain = loss_and_grads(model, False, **kwargs)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, **TOL)
    assert g_fused.keys() == g_plain.keys()
    assert set(g_fused) == {n for n, p in model.named_parameters() if p.requires_grad}  # frozen: no grad at all
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_plain[name], **TOL, msg=name)
    return fused


def labels_with_ignored(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, 2] = labels[1, 4] = -100
    return labels


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["preserve", "adapt"])
def test_fused_loss_and_gradients_equal_the_unfused_model(family, mode):
    model = perturbed(family, mode)
    ids = token_ids()
    out = assert_same_training_signal(model, input_ids=ids, labels=labels_with_ignored(ids))
    assert out.loss.grad_fn.name() == "FusedHeadCrossEntropyBackward"


def test_tied_head_stays_tied_frozen_and_bit_identical_after_training():
    model = perturbed("llama_tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        ids = token_ids(seed=step)
        model(ids, labels=ids).loss.backward()
        assert model.lm_head.weight.grad is None
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.equal(model.lm_head.weight, before) and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_loss_kwargs(family):
    model = perturbed(family)
    ids = token_ids()
    labels = labels_with_ignored(ids)
    shifted = torch.nn.functional.pad(ids, (0, 1), value=7)[:, 1:].contiguous()  # 7: ignore_index and padding
    assert_same_training_signal(model, input_ids=ids, labels=ids, shift_labels=shifted, ignore_index=7)
    assert_same_training_signal(model, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(31))
    assert_same_training_signal(model, input_ids=ids, labels=labels, num_items_in_batch=9)


def test_route_mode_with_a_mask_and_a_routed_head():
    """With the head made routable (engineer cpt's option), the model-level mask gates W_head_up in both paths."""
    model = perturbed("llama", "route")
    ids = token_ids()
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    assert_same_training_signal(model, input_ids=ids, labels=ids, scale_route=mask)
    model.lm_head.routable = True
    assert_same_training_signal(model, input_ids=ids, labels=ids, scale_route=mask)
    gate = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    assert_same_training_signal(model, input_ids=ids, labels=ids, scale_route=gate)
    # route 0 everywhere + a routed head: W_head_up gets no gradient signal at all
    _, grads = loss_and_grads(model, True, input_ids=ids, labels=ids, scale_route=False)
    assert torch.count_nonzero(grads["lm_head.weight_12"]) == 0


def test_original_stream_gives_the_base_models_loss():
    base = base_model("llama").train()
    model = perturbed("llama")
    ids = token_ids()
    with torch.no_grad():
        want = base(ids, labels=ids).loss
    with sk.original_stream(model):
        out = model(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_tuple_outputs():
    model = perturbed("mistral")
    set_activation_checkpointing(model)
    model.train()
    ids = token_ids()
    assert_same_training_signal(model, input_ids=ids, labels=ids)
    model.scale_fused_loss = True
    loss, *rest = model(ids, labels=ids, return_dict=False)
    assert loss.dim() == 0 and all(not (torch.is_tensor(t) and t.shape[-1:] == (0,)) for t in rest)


def test_eval_mode_returns_logits_and_hf_loss():
    model = perturbed("llama").eval()
    ids = token_ids()
    out = model(ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (*ids.shape, 100)
    assert out.loss.grad_fn is None or out.loss.grad_fn.name() != "FusedHeadCrossEntropyBackward"


def test_opt_out_and_bad_switch():
    model = upscaled(base_model("llama"), fused_loss=False).train()
    ids = token_ids()
    assert model.scale_fused_loss is False and model(ids, labels=ids).logits is not None
    with pytest.raises(TypeError, match="fused_loss must be a bool"):
        upscaled(base_model("llama"), fused_loss="yes")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))  # read only: how many hooks are installed
    install_fused_loss(model, True)  # a second install only flips the switch
    assert model.scale_fused_loss is True and (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert model(ids, labels=ids).logits is None


def test_a_forward_that_raises_leaves_no_request_behind():
    model = perturbed("llama")
    ids = token_ids()
    with pytest.raises(ValueError):
        model(ids, labels=ids[:, :3])  # wrong label shape: the head raises
    assert model.lm_head.pending_loss is None
    model.eval()
    assert model(ids).logits is not None  # a later inference forward is not hijacked


def test_no_widened_hidden_means_the_models_own_loss():
    model = upscaled(base_model("llama"), extra_hidden=0).train()  # heads/FFN only: the head stays nn.Linear
    assert not isinstance(model.lm_head, ScaleLMHead)
    ids = token_ids()
    assert model(ids, labels=ids).logits is not None


def test_trainer_uses_the_fused_loss_with_gradient_accumulation(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    calls = []
    original = ScaleLMHead.causal_lm_loss

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ScaleLMHead, "causal_lm_loss", spy)
    data = causal_lm_examples()
    final = {}
    for fused in (True, False):
        model = perturbed("llama")
        model.scale_fused_loss = fused
        args = TrainingArguments(
            output_dir=str(tmp_path / str(fused)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-1,
            optim="sgd",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        final[fused] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(calls) == 4 and all(c is not None for c in calls)  # 2 steps x 2 micro-batches, HF's token count
    # SGD (Adam would turn sign flips of near-zero gradients into lr-sized steps): same update on both paths
    for name, value in final[True].items():
        torch.testing.assert_close(value, final[False][name], rtol=1e-4, atol=1e-5, msg=name)
