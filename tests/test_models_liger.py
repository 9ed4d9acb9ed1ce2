"""Wiring of the optional liger-kernel ops. liger-kernel's kernels need a GPU; on CPU a stand-in module with
the same API (plain PyTorch math) checks that the model calls them and still computes the same loss. The real
kernels run in the GPU benchmark (``bench_model --liger swiglu rope``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from helpers_upscale import base_model, token_ids, upscaled

from scale_kernels.models import liger

CALLS = []


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        CALLS.append("swiglu")
        ctx.save_for_backward(a, b)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            return torch.autograd.grad(torch.nn.functional.silu(a_) * b_, (a_, b_), g)


def _rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    CALLS.append("rope")
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.fixture
def fake_liger(monkeypatch):
    pkg = types.ModuleType("liger_kernel")
    swiglu = types.ModuleType("liger_kernel.ops.swiglu")
    swiglu.LigerSiLUMulFunction = _SiLUMul
    rope = types.ModuleType("liger_kernel.transformers.rope")
    rope.liger_rotary_pos_emb = _rope
    for name, mod in {
        "liger_kernel": pkg,
        "liger_kernel.ops": types.ModuleType("liger_kernel.ops"),
        "liger_kernel.ops.swiglu": swiglu,
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.rope": rope,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    CALLS.clear()


def test_widened_model_calls_liger_ops_and_keeps_its_loss(fake_liger):
    model = upscaled(base_model("llama"), mode="adapt").train()
    ids = token_ids()
    want = model(ids, labels=ids).loss
    counts = liger.apply_liger_kernels(model)
    got = model(ids, labels=ids).loss
    assert counts == {"swiglu": 2, "rope": 2} and CALLS.count("swiglu") == 2 and CALLS.count("rope") == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert model.model.layers[0].mlp.gate_proj.weight_21.grad is not None


def test_missing_liger_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.swiglu", None)
    model = upscaled(base_model("llama"))
    with pytest.raises(ImportError, match=r"scale_kernels\[liger\]"):
        liger.apply_liger_kernels(model, ["swiglu"])
    with pytest.raises(ValueError, match="liger ops must be among"):
        liger.apply_liger_kernels(model, ["rmsnorm"])
