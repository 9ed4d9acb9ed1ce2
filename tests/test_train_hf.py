"""HF-native training of an upscaled model: ``transformers.Trainer`` (with :class:`SaveExpansionCallback`) and
``accelerate``'s ``Accelerator`` train a few steps; only the expansion is saved, and loaded onto a fresh base
model it gives identical logits; the frozen base weights are bit-identical and never got a gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_upscale import base_model, causal_lm_examples, token_ids, upscaled
from safetensors import safe_open

import scale_kernels as sk

pytest.importorskip("accelerate")
DATA = causal_lm_examples()


def _upscaled() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An upscaled Adapt model (W12 trains in the top layer) and copies of its frozen and trainable tensors."""
    model = upscaled(base_model(), "adapt", adapt_layers=[-1])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model.train(), frozen, trainable


def _assert_trained_saved_and_reloaded(model, frozen, trainable, directory: Path) -> None:
    for name, p in model.named_parameters():
        if name in frozen:  # frozen means frozen: no gradient ever, not a bit changed
            assert p.grad is None and torch.equal(p.detach(), frozen[name]), name
    assert any(not torch.equal(p.detach(), trainable[n]) for n, p in model.named_parameters() if n in trainable)
    with safe_open(str(directory / "expansion.safetensors"), "pt") as f:
        saved = set(f.keys())
    base_names = {n for n, _ in base_model().named_parameters()}
    assert set(trainable) <= saved and not saved & base_names  # every trained tensor, no base weight
    fresh = sk.load_expansion(base_model(), directory)  # a new base model: same seed, same weights
    ids = token_ids(2, 9, seed=99)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model.eval()(ids).logits)


def test_transformers_trainer_with_the_save_expansion_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    from scale_kernels.train.hf_callbacks import SaveExpansionCallback

    model, frozen, trainable = _upscaled()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=DATA, callbacks=[SaveExpansionCallback()]).train()
    _assert_trained_saved_and_reloaded(model, frozen, trainable, tmp_path / "expansion")
    at_step_2 = sk.load_expansion(base_model(), tmp_path / "checkpoint-2" / "expansion")  # the Trainer's save
    assert not torch.equal(at_step_2.lm_head.weight_12, model.lm_head.weight_12)  # step 2, not the final step 3


def test_accelerate_training_loop(tmp_path):
    from accelerate import Accelerator

    model, frozen, trainable = _upscaled()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(DATA, batch_size=2)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        accelerator.backward(prepared(**batch).loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sk.save_expansion(accelerator.unwrap_model(prepared), tmp_path / "expansion")
    _assert_trained_saved_and_reloaded(accelerator.unwrap_model(prepared), frozen, trainable, tmp_path / "expansion")
