"""Fused upscaled LM head + cross-entropy against an fp64 reference that materialises the logits.

Every gradient (x, W_up, a float route) on odd vocab sizes (not a multiple of the Triton vocab block), with
ignored tokens, every route pattern, with/without W_up and bias, both reductions, several chunkings, on both
backends (triton runs under the interpreter on CPU). Tolerance: tests/helpers.py's rule against plain PyTorch
in the same dtype (logits materialised in that dtype, cross-entropy in fp32, as HF computes it).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_within_reference_tolerance, triton_usable

from scale_kernels.ops import fused_head_cross_entropy as fh

BACKENDS = ["torch"] + (["triton"] if triton_usable() else [])
ROUTES = ("none", "zeros", "ones", "random", "soft")


def make_case(n=29, d=12, e=7, vocab=131, *, route="none", w_up=True, bias=False, ignored=(3, 4, 17), seed=0):
    """fp64 operands: ``x (n, d + e)``, frozen ``w``, trainable ``w_up``, labels with some ``-100``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d + (e if w_up else 0), generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * d**-0.5
    wu = (torch.randn(vocab, e, generator=g, dtype=torch.float64) * e**-0.5).requires_grad_() if w_up else None
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[i for i in ignored if i < n]] = -100
    r = None
    if route == "zeros":
        r = torch.zeros(n, dtype=torch.bool)
    elif route == "ones":
        r = torch.ones(n, dtype=torch.bool)
    elif route == "random":
        r = torch.rand(n, generator=g) < 0.5
    elif route == "soft":
        r = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_()
    return {"x": x, "w": w, "w_up": wu, "bias": b, "route": r, "labels": labels}


def cast(case: dict, dtype: torch.dtype) -> dict:
    out = {}
    for k, t in case.items():
        if t is None or not t.is_floating_point():
            out[k] = t
        else:
            out[k] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


def materialised_loss(x, w, labels, w_up=None, bias=None, route=None, ignore_index=-100, reduction="mean"):
    """Plain PyTorch: logits in x's dtype, cross-entropy in fp32 (fp64 for fp64), like HF's ForCausalLMLoss."""
    d = w.shape[1]
    logits = x[:, :d] @ w.t()
    if w_up is not None:
        up = x[:, d:] @ w_up.t()
        logits = logits + (up if route is None else route[:, None].to(up.dtype) * up)
    if bias is not None:
        logits = logits + bias
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.nn.functional.cross_entropy(logits.to(acc), labels, ignore_index=ignore_index, reduction=reduction)


def grads_of(fn, case: dict) -> tuple[list[str], list[torch.Tensor]]:
    loss = fn(case)
    names = [k for k in ("x", "w_up", "route") if case[k] is not None and case[k].requires_grad]
    grads = torch.autograd.grad(loss, [case[k] for k in names], allow_unused=True)
    out = [loss.detach()] + [g if g is not None else torch.zeros_like(case[k]) for g, k in zip(grads, names)]
    return ["loss", *names], out


def check(case: dict, dtype: torch.dtype, backend: str | None, reduction: str = "mean", chunk_size: int | None = None):
    def fused(c):
        return fh.fused_head_cross_entropy(
            c["x"], c["w"], c["labels"], c["w_up"], c["bias"], c["route"],
            reduction=reduction, chunk_size=chunk_size, backend=backend,
        )  # fmt: skip

    def plain(c):
        return materialised_loss(c["x"], c["w"], c["labels"], c["w_up"], c["bias"], c["route"], reduction=reduction)

    names, ref = grads_of(plain, case)
    _, base = grads_of(plain, cast(case, dtype))
    _, got = grads_of(fused, cast(case, dtype))
    for name, r, p, k in zip(names, ref, base, got):
        assert k.shape == r.shape, (name, k.shape, r.shape)
        assert_within_reference_tolerance(name, k, r, p)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
def test_matches_fp64_reference_every_route(backend, route):
    check(make_case(route=route), torch.float32, backend, chunk_size=8)  # 4 chunks, the last one partial


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw", [dict(w_up=False), dict(bias=True), dict(vocab=37, n=5), dict(vocab=64, d=16, e=1), dict(vocab=257)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_fp64_reference_shapes(backend, kw, reduction):
    check(make_case(**kw), torch.float32, backend, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(backend, dtype):
    got = check(make_case(route="soft", n=21, vocab=101), dtype, backend, chunk_size=6)
    assert got[1].dtype == dtype and got[2].dtype == dtype  # dx, dW_up in their inputs' dtype


def fused_grads(case: dict, **kwargs) -> list[torch.Tensor]:
    def fn(c):
        return fh.fused_head_cross_entropy(c["x"], c["w"], c["labels"], c["w_up"], route=c["route"], **kwargs)

    return grads_of(fn, case)[1]


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 1000])  # 29 tokens: 29 chunks, 6 (the last partial), 1, 1
def test_chunking_does_not_change_the_result(chunk_size):
    case = make_case(route="random")
    fp32 = cast(case, torch.float32)
    for a, b in zip(fused_grads(fp32, chunk_size=29), fused_grads(fp32, chunk_size=chunk_size)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    check(case, torch.float32, None, chunk_size=chunk_size)  # the same (default) backend against fp64


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored_is_nan_with_zero_gradients_like_torch(backend):
    case = cast(make_case(ignored=range(29)), torch.float32)
    loss = fh.fused_head_cross_entropy(case["x"], case["w"], case["labels"], case["w_up"], backend=backend)
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.count_nonzero(case["x"].grad) == 0 and torch.count_nonzero(case["w_up"].grad) == 0


def test_upstream_gradient_scales_every_gradient():
    case = cast(make_case(route="soft"), torch.float64)
    once = fused_grads(case)

    def thrice(c):
        return 3 * fh.fused_head_cross_entropy(c["x"], c["w"], c["labels"], c["w_up"], route=c["route"])

    for a, b in zip(once, grads_of(thrice, case)[1]):
        torch.testing.assert_close(3 * a, b)


def test_frozen_head_gets_no_gradient_and_is_untouched():
    case = cast(make_case(bias=True), torch.float32)
    w0, b0 = case["w"].clone(), case["bias"].clone()
    fh.fused_head_cross_entropy(case["x"], case["w"], case["labels"], case["w_up"], case["bias"]).backward()
    assert case["w"].grad is None and case["bias"].grad is None
    assert torch.equal(case["w"], w0) and torch.equal(case["bias"], b0)


def test_no_gradient_work_without_grad():
    case = cast(make_case(), torch.float32)
    with torch.no_grad():
        loss = fh.fused_head_cross_entropy(case["x"], case["w"], case["labels"], case["w_up"])
    assert not loss.requires_grad
    ref = materialised_loss(case["x"], case["w"], case["labels"], case["w_up"])
    torch.testing.assert_close(loss, ref.detach())


def test_autocast_keeps_an_fp32_master_w_up_and_its_fp32_gradient():
    case = make_case(n=16, vocab=50)
    x = case["x"].detach().to(torch.bfloat16).requires_grad_()
    w = case["w"].to(torch.bfloat16)
    wu = case["w_up"].detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fh.fused_head_cross_entropy(x, w, case["labels"], wu)
        plain = materialised_loss(x, w, case["labels"], wu.to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and wu.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, plain.detach().float(), rtol=2e-2, atol=2e-2)
    names, ref = grads_of(lambda c: materialised_loss(c["x"], c["w"], c["labels"], c["w_up"]), case)
    # fp32 accumulation of dW_up: at least as close to the fp64 gradient as the bf16 path of plain PyTorch
    plain_grad = torch.autograd.grad(materialised_loss(x, w, case["labels"], wu.to(torch.bfloat16)), wu)[0]
    assert (wu.grad.double() - ref[2]).abs().max() <= 2 * (plain_grad.double() - ref[2]).abs().max() + 1e-6


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
@pytest.mark.parametrize("block", [16, 64, 256])
def test_triton_rows_with_every_vocab_block(block):
    """The GPU block (MAX_BLOCK_V, whole-row blocks) and the multi-block online logsumexp give the torch result."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 203, generator=g) * 4
    logits[0, 1], logits[1, 200], logits[3, 100] = 300.0, -300.0, 250.0  # overflow unless max-shifted per block
    labels = torch.tensor([0, 202, -100, 17, 64, 128])
    scale = torch.tensor(0.25)
    want, got = logits.clone(), logits.clone()
    loss_want, loss_got = torch.empty(6), torch.empty(6)
    fh.cross_entropy_rows_torch(want, labels, loss_want, scale, -100, True)
    fh.cross_entropy_rows_triton(got, labels, loss_got, scale, -100, True, block=block)
    torch.testing.assert_close(loss_got, loss_want)
    torch.testing.assert_close(got, want)
    ref, loss_ref = logits.double(), torch.empty(6, dtype=torch.float64)  # and both against fp64
    fh.cross_entropy_rows_torch(ref, labels, loss_ref, scale.double(), -100, True)
    assert_within_reference_tolerance("loss", loss_got, loss_ref, loss_want)
    assert_within_reference_tolerance("dlogits", got, ref, want)


def test_default_chunk_size_bounds_the_logits_to_the_input_size():
    assert fh.default_chunk_size(8192, 2560, 128256) == 256  # 51x vocab/width -> 161 -> next pow2
    assert fh.default_chunk_size(7, 64, 100) == 4
    assert fh.default_chunk_size(3, 4096, 100) == 3
    for tokens, width, vocab in [(1, 1, 1), (4096, 4608, 128256), (100, 8, 1000)]:
        chunk = fh.default_chunk_size(tokens, width, vocab)
        assert 1 <= chunk <= tokens and chunk * vocab <= 2 * max(tokens * width, vocab)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.zeros(4, 3)), ValueError, "x must have shape"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an int64"),
        (dict(labels=torch.tensor([0, 1, 50, 2])), ValueError, r"labels must be in \[0, 50\)"),
        (dict(labels=torch.tensor([0, 1, -1, 2])), ValueError, "labels must be in"),
        (dict(w=torch.zeros(50, 6, requires_grad=True)), ValueError, "w must be frozen"),
        (dict(w_up=torch.zeros(49, 2)), ValueError, "w_up must have shape"),
        (dict(w_up=torch.zeros(50, 2, dtype=torch.float64)), TypeError, "w_up has dtype"),
        (dict(bias=torch.zeros(49)), ValueError, "bias must have shape"),
        (dict(route=torch.zeros(3)), ValueError, "route must have shape"),
        (dict(route=torch.zeros(4, dtype=torch.long)), TypeError, "route must be a bool"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error, match):
    args = dict(
        x=torch.zeros(4, 8), w=torch.zeros(50, 6), labels=torch.tensor([0, 1, -100, 2]), w_up=torch.zeros(50, 2)
    )
    args.update(change)
    x, w, labels = args.pop("x"), args.pop("w"), args.pop("labels")
    with pytest.raises(error, match=match):
        fh.fused_head_cross_entropy(x, w, labels, **args)
