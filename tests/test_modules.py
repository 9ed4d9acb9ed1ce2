"""ScaleLinear, split RMSNorm, expanded embedding and LM head, checked against plain block-matrix math."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import scale_kernels as sk
from scale_kernels.modules import (
    EXPANSION_PARAM_NAMES,
    GroupedRMSNorm,
    RouteState,
    ScaleEmbedding,
    ScaleLMHead,
    ScaleRMSNorm,
)

ATOL = 1e-5  # fp32, values O(1): only summation order differs from the explicit block matmul


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_reference(m: sk.ScaleLinear, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
    """``[[W, r*W12], [W21, W22]] [x0; x1] + [b; b_up]`` written out with plain matmuls."""
    x0, x1 = x[..., : m.in_features], x[..., m.in_features :]
    y0 = x0 @ m.weight.t()
    if m.weight_12 is not None:
        r = 1.0 if route is None else route.float()[..., None]
        y0 = y0 + r * (x1 @ m.weight_12.t())
    y1 = x0 @ m.weight_21.t() + x1 @ m.weight_22.t()
    if m.bias is not None:
        y0, y1 = y0 + m.bias, y1 + (m.bias_up if m.bias_up is not None else 0)
    return torch.cat([y0, y1], dim=-1).detach()


@pytest.mark.parametrize("mode", ["preserve", "adapt", "route"])
@pytest.mark.parametrize(("extra_in", "extra_out"), [(3, 5), (0, 4), (6, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_block_matrix(mode, extra_in, extra_out, bias):
    lin = nn.Linear(7, 9, bias=bias)
    m = sk.ScaleLinear.from_linear(lin, extra_in, extra_out, mode=mode, init="random", generator=_gen())
    assert (m.weight_12 is not None) == (mode != "preserve" and extra_in > 0)
    if m.weight_12 is not None:
        with torch.no_grad():
            m.weight_12.normal_(generator=_gen(1))
    x = torch.randn(2, 3, 7 + extra_in, generator=_gen(2))
    route = torch.rand(2, 3, generator=_gen(3)) < 0.5
    assert m(x).shape == (2, 3, 9 + extra_out)
    assert torch.allclose(m(x), _block_reference(m, x), atol=ATOL)
    assert torch.allclose(m(x, route=route), _block_reference(m, x, route), atol=ATOL)


@pytest.mark.parametrize(("mode", "extra_in", "extra_out", "bias"), [("route", 3, 5, True), ("preserve", 0, 4, False)])
def test_scale_linear_to_dense_folds_the_route_into_the_weights(mode, extra_in, extra_out, bias):
    m = sk.ScaleLinear.from_linear(nn.Linear(7, 9, bias=bias), extra_in, extra_out, mode=mode, generator=_gen())
    with torch.no_grad():
        for p in (m.weight_12, m.bias_up):
            if p is not None:
                p.normal_(generator=_gen(1))
    x = torch.randn(4, 7 + extra_in, generator=_gen(2))
    for route in (0.0, 0.3, 1.0):
        dense = m.to_dense(route=route)
        assert type(dense) is nn.Linear and dense.weight.shape == (9 + extra_out, 7 + extra_in)
        assert (dense.bias is not None) == bias and dense.weight.requires_grad
        assert dense.weight.data_ptr() != m.weight.data_ptr()  # its own tensors
        assert torch.allclose(dense(x), _block_reference(m, x, torch.full((4,), route)), atol=ATOL)


def test_lm_head_to_dense_ignores_the_route_unless_gated():
    head = ScaleLMHead.from_head(nn.Linear(8, 10, bias=False), 4)
    with torch.no_grad():
        head.weight_12.normal_(generator=_gen())
    h = torch.randn(3, 12, generator=_gen(1))
    assert torch.allclose(head.to_dense(route=0.0)(h), head(h), atol=ATOL)
    head.routable = True  # upscale_model(..., gate_head=True)
    assert torch.allclose(head.to_dense(route=0.0)(h), h[:, :8] @ head.weight.t(), atol=ATOL)


def test_norm_and_embedding_to_dense_compute_the_same():
    norm = ScaleRMSNorm(8, 4)
    with torch.no_grad():
        norm.weight_up.normal_(generator=_gen())
    x = torch.randn(3, 12, generator=_gen(1))
    dense_norm = norm.to_dense()
    assert type(dense_norm) is GroupedRMSNorm and torch.equal(dense_norm(x), norm(x))
    emb = ScaleEmbedding.from_embedding(nn.Embedding(20, 8, padding_idx=0), 4, generator=_gen(2))
    dense_emb = emb.to_dense()
    ids = torch.tensor([[0, 3, 19]])
    assert type(dense_emb) is nn.Embedding and dense_emb.padding_idx == 0 and torch.equal(dense_emb(ids), emb(ids))


def test_expansion_parameter_names_are_the_modules_own():
    assert EXPANSION_PARAM_NAMES == ("weight_21", "weight_22", "weight_12", "bias_up", "weight_up")
    m = sk.ScaleLinear(4, 3, 2, 2, bias=False, mode="preserve")
    assert [n for n, _ in m.expansion_parameters()] == ["weight_21", "weight_22"]  # absent W12 / b_up skipped
    assert [n for n, _ in ScaleRMSNorm(4, 2).expansion_parameters()] == ["weight_up"]


def test_from_linear_reuses_frozen_weights_and_preserves_outputs():
    lin = nn.Linear(8, 6)
    m = sk.ScaleLinear.from_linear(lin, 4, 2, mode="adapt")
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.weight_21.requires_grad and m.weight_22.requires_grad and m.weight_12.requires_grad
    assert torch.count_nonzero(m.weight_12) == 0 and torch.count_nonzero(m.bias_up) == 0
    x = torch.randn(5, 12, generator=_gen())
    assert torch.allclose(m(x)[:, :6], lin(x[:, :8]), atol=ATOL)


def test_backward_reaches_only_expansion_weights():
    m = sk.ScaleLinear.from_linear(nn.Linear(8, 6), 4, 2, mode="adapt")
    x = torch.randn(5, 12, generator=_gen(), requires_grad=True)
    m(x).square().sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    for p in (m.weight_21, m.weight_22, m.weight_12, m.bias_up):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad is not None


def test_route_gate_zero_switches_w12_off():
    lin = nn.Linear(8, 6, bias=False)
    m = sk.ScaleLinear.from_linear(lin, 4, 2, mode="route")
    with torch.no_grad():
        m.weight_12.fill_(1.0)
    x = torch.randn(5, 12, generator=_gen())
    off = m(x, route=torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(off[:, :6], lin(x[:, :8]), atol=ATOL)
    assert not torch.allclose(m(x)[:, :6], lin(x[:, :8]), atol=1e-2)
    m.route_state = RouteState(mask=torch.zeros(5, dtype=torch.bool))  # the model-level mask
    assert torch.allclose(m(x), off, atol=ATOL)
    m.route_state = RouteState(original_only=True)
    assert torch.allclose(m(x, route=torch.ones(5))[:, :6], lin(x[:, :8]), atol=ATOL)


def test_inits():
    lin = nn.Linear(16, 12)
    zeros = sk.ScaleLinear.from_linear(lin, 4, 3, init="zeros")
    assert torch.count_nonzero(zeros.weight_21) == 0 and torch.count_nonzero(zeros.weight_22) == 0
    rand = sk.ScaleLinear.from_linear(nn.Linear(256, 256), 256, 256, init="random", std=0.02)
    assert rand.weight_22.std().item() == pytest.approx(0.02, rel=0.02)
    svd = sk.ScaleLinear.from_linear(lin, 4, 3, init="svd", generator=_gen())
    u, s, _ = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    proj = u[:, :3].t() @ lin.weight.detach()  # U_k^T W, up to the sign of each singular pair
    assert torch.allclose(svd.weight_21.abs(), proj.abs(), atol=1e-5)
    big = sk.ScaleLinear.from_linear(nn.Linear(4, 3), 2, 5, init="svd", generator=_gen())
    assert big.weight_21.shape == (5, 4)  # rows beyond rank 3 are small random
    a = sk.ScaleLinear.from_linear(lin, 4, 3, generator=_gen(7))
    b = sk.ScaleLinear.from_linear(lin, 4, 3, generator=_gen(7))
    assert torch.equal(a.weight_21, b.weight_21)


def test_extra_repr_shows_blocks_and_mode():
    m = sk.ScaleLinear(8, 6, 4, 2, bias=False, mode="adapt")
    assert "in_features=8+4" in repr(m) and "out_features=6+2" in repr(m) and "mode=adapt" in repr(m)
    assert "w12=trainable" in repr(m)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: sk.ScaleLinear(8, 6, -1, 2), ValueError, "extra_in must be >= 0"),
        (lambda: sk.ScaleLinear(8, 6, 1, 2, mode="fast"), ValueError, "mode must be one of"),
        (lambda: sk.ScaleLinear(8, 6, 1, 2, init="ones"), ValueError, "init must be one of"),
        (lambda: sk.ScaleLinear(0, 6, 1, 2), ValueError, "in_features must be >= 1"),
        (lambda: sk.ScaleLinear(8, 6, 1.5, 2), TypeError, "extra_in must be an int"),
        (lambda: sk.ScaleLinear.from_linear(nn.Conv1d(2, 2, 1), 1, 1), TypeError, "torch.nn.Linear"),
        (lambda: sk.ScaleLinear(8, 6, 1, 2).reset_expansion(std=float("nan")), ValueError, "std must be"),
        (lambda: ScaleLMHead(8, 10, 4, 2), ValueError, "extra_out must be 0"),
        (lambda: ScaleRMSNorm.from_norm(nn.Linear(2, 2), 3), TypeError, "RMSNorm"),
        (lambda: ScaleEmbedding.from_embedding(nn.Linear(2, 2), 3), TypeError, "nn.Embedding"),
    ],
)
def test_misuse(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_wrong_input_width_is_reported():
    m = sk.ScaleLinear(8, 6, 4, 2)
    with pytest.raises(ValueError, match="w22 must have shape"):
        m(torch.randn(3, 10))


def test_split_rmsnorm_keeps_original_statistics():
    hf = LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_(generator=_gen())
    norm = ScaleRMSNorm.from_norm(hf, 4)
    assert norm.weight is hf.weight and not hf.weight.requires_grad and norm.weight_up.requires_grad
    x = torch.randn(2, 3, 12, generator=_gen(1)) * 3
    x[..., 8:] *= 100  # a large expansion must not change the original slice's statistics
    y = norm(x)
    assert torch.allclose(y[..., :8], hf(x[..., :8]), atol=ATOL)
    up = x[..., 8:]
    assert torch.allclose(y[..., 8:], up * torch.rsqrt(up.pow(2).mean(-1, keepdim=True) + 1e-6), atol=ATOL)
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
        norm(x[..., :8])


def test_split_rmsnorm_with_no_expansion_is_the_original_norm():
    hf = LlamaRMSNorm(8)
    norm = ScaleRMSNorm.from_norm(hf, 0)
    x = torch.randn(4, 8, generator=_gen())
    assert torch.equal(norm(x), hf(x)) and norm.weight_up.numel() == 0


def test_grouped_rmsnorm_equals_split_norm():
    norm = ScaleRMSNorm(8, 4)
    with torch.no_grad():
        norm.weight_up.normal_(generator=_gen())
    dense = GroupedRMSNorm(8, 4)
    with torch.no_grad():
        dense.weight.copy_(torch.cat([norm.weight, norm.weight_up]))
    x = torch.randn(3, 12, generator=_gen(1))
    assert torch.equal(dense(x), norm(x))


@pytest.mark.parametrize("init", ["zeros", "random", "svd"])
def test_expanded_embedding(init):
    emb = nn.Embedding(20, 8, padding_idx=0)
    m = ScaleEmbedding.from_embedding(emb, 4, init, generator=_gen())
    assert m.weight is emb.weight and not emb.weight.requires_grad and m.weight_up.requires_grad
    ids = torch.tensor([[0, 3, 19]])
    out = m(ids)
    assert out.shape == (1, 3, 12) and torch.equal(out[..., :8], emb(ids))
    assert torch.equal(out[..., 8:], m.weight_up[ids])
    if init == "svd":  # E_up = E V_k: column norms are the top singular values of E
        s = torch.linalg.svdvals(emb.weight.detach())
        assert torch.allclose(m.weight_up.norm(dim=0), s[:4], atol=1e-4)


def test_lm_head_adds_head_up_and_ignores_route():
    lin = nn.Linear(8, 10, bias=False)
    head = ScaleLMHead.from_head(lin, 4)
    assert head.weight is lin.weight and torch.count_nonzero(head.weight_12) == 0
    with torch.no_grad():
        head.weight_12.normal_(generator=_gen())
    h = torch.randn(2, 12, generator=_gen(1))
    expected = h[:, :8] @ lin.weight.t() + h[:, 8:] @ head.weight_12.t()
    head.route_state = RouteState(mask=torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(head(h), expected.detach(), atol=ATOL)  # the mask does not gate W_head_up
    head.route_state.original_only = True
    assert torch.allclose(head(h), lin(h[:, :8]).detach(), atol=ATOL)


def test_docs_example_runs():
    """The usage example in docs/modules.md is executed verbatim."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "modules.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/modules.md has no python example"
    for block in blocks:
        exec(compile(block, "docs/modules.md", "exec"), {})


def test_standalone_module_is_initialised_like_nn_linear():
    m = sk.ScaleLinear(16, 8, 4, 2)
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > bound / 2
    assert torch.isfinite(m(torch.randn(3, 20, generator=_gen()))).all()


@pytest.mark.parametrize("extra_in, extra_out", [(3, 0), (0, 5), (0, 0)])
def test_empty_expansion_blocks_are_not_trainable(extra_in, extra_out):
    """0-element blocks hold nothing to train (FSDP2 cannot reduce-scatter a 0-element gradient)."""
    layer = sk.ScaleLinear(6, 4, extra_in, extra_out, mode="adapt")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert all(p.numel() > 0 for n, p in layer.named_parameters() if n in trainable)
    assert ("weight_21" in trainable) == (extra_out > 0)
    assert ("weight_22" in trainable) == (extra_out > 0 and extra_in > 0)
