"""Interop: torch.compile (fullgraph), torch.autocast, activation checkpointing, torch.func.

Every comparison is against the same computation without the feature. Where the feature cannot change the
arithmetic (checkpointing recomputes the identical forward; compile runs the same opaque custom op), the
gradients must be bitwise equal; otherwise the tolerance is stated at the assertion.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_operands, triton_usable
from torch import nn
from torch.utils.checkpoint import checkpoint

import scale_kernels as sk
from scale_kernels import backends
from scale_kernels.models import set_activation_checkpointing

HAS_UPSCALE = hasattr(sk, "upscale_model")
needs_modules = pytest.mark.skipif(not HAS_UPSCALE, reason="scale_kernels.upscale_model (module layer) missing")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")),
]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ops(route: str = "soft"):
    return make_operands(lead=(2, 5), d_in=6, e_in=4, d_out=7, e_out=3, route=route).to(torch.float32)


def _grads(y: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y.square().sum(), inputs))


def _assert_all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs (max {(u - v).abs().max().item():.3e})"


def _scale_linear(mode: str = "route", bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return sk.ScaleLinear.from_linear(nn.Linear(6, 7, bias=bias), extra_in=4, extra_out=3, mode=mode)


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_function_no_graph_break(backend):
    """A function mixing the op with ordinary ops compiles as ONE graph (dynamo's explain: 0 breaks), and the
    compiled forward/backward equal eager bitwise (the op is opaque to the compiler, aot_eager adds no fusion)."""
    ops = _ops()

    def f(x, w21, w12, route):
        y = sk.upscaled_linear(torch.tanh(x), ops.w, w21, ops.w22, w12, ops.bias, ops.bias_up, route, backend=backend)
        return torch.nn.functional.gelu(y) * 2

    inputs = [ops.x, ops.w21, ops.w12, ops.route]
    explanation = torch._dynamo.explain(f)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(*inputs), f(*inputs)
    assert torch.equal(y_c, y_e)
    _assert_all_equal(_grads(y_c, inputs), _grads(y_e, inputs))


@needs_modules
def test_compile_fullgraph_scale_linear_inductor():
    """ScaleLinear under the default (inductor) compiler, fullgraph: same output and grads as eager. Inductor
    may fuse/reorder the elementwise ops around the op, so fp32 rounding-level differences are allowed."""
    lin = _scale_linear()
    x = torch.randn(3, 5, 10, requires_grad=True)
    route = torch.rand(3, 5) < 0.5
    compiled = torch.compile(lin, fullgraph=True)
    y_c, y_e = compiled(torch.sin(x), route), lin(torch.sin(x), route)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    inputs = [x, *_trainable(lin)]
    for a, b in zip(_grads(y_c, inputs), _grads(y_e, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_modules
def test_compile_fullgraph_upscaled_hf_model():
    """A tiny upscaled Llama (route mode, per-token route mask) compiles with fullgraph=True (a graph break
    raises), training loss and every expansion gradient equal eager bitwise."""
    from helpers_upscale import base_model, token_ids, upscaled

    model = upscaled(base_model("llama"), mode="route")
    ids = token_ids()
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    params = _trainable(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(ids, labels=ids, scale_route=mask).loss
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = model(ids, labels=ids, scale_route=mask).loss
    grads_e = torch.autograd.grad(loss_e, params)
    assert torch.equal(loss_c, loss_e)
    _assert_all_equal(list(grads_c), list(grads_e))


# ----------------------------------------------------------------------------------------------------------
# torch.autocast


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16_follows_nn_linear(backend):
    """Under CPU bf16 autocast the op behaves like nn.Linear: output in bf16, equal to running it on bf16
    copies of its operands (exactly: that is what autocast does), fp32 gradients for the fp32 parameters."""
    ops = _ops()
    linear = nn.Linear(6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sk.upscaled_linear(*ops.args(), backend=backend)
        y_linear = linear(ops.x[..., :6])
    assert y.dtype == y_linear.dtype == torch.bfloat16
    manual = ops.to(torch.bfloat16)
    manual.route = ops.route  # autocast casts the operands, not the route gate (like nn.Linear's inputs only)
    assert torch.equal(y, sk.upscaled_linear(*manual.args(), backend=backend).detach())
    grads = _grads(y.float(), [ops.x, ops.w21, ops.w22, ops.w12, ops.bias_up, ops.route])
    assert [g.dtype for g in grads] == [torch.float32] * 6
    # loose check against fp32 (bf16 has 8 mantissa bits; K <= 10 here): catches a wrong cast, not rounding
    torch.testing.assert_close(y.float(), sk.upscaled_linear(*ops.args(), backend=backend), rtol=0.05, atol=0.05)


def test_autocast_inside_compiled_function():
    """The autocast decision is traced: the compiled function casts like eager (fullgraph, no break)."""
    ops = _ops()

    def f(x, w21):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sk.upscaled_linear(x, ops.w, w21, ops.w22, ops.w12, ops.bias, ops.bias_up, ops.route)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(ops.x, ops.w21)
    assert y.dtype == torch.bfloat16 and torch.equal(y, f(ops.x, ops.w21))


def test_autocast_leaves_fp64_and_disabled_regions_alone():
    ops = make_operands(lead=(3,), d_in=6, e_in=4, d_out=7, e_out=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sk.upscaled_linear(*ops.args()).dtype == torch.float64  # autocast never casts fp64
        with torch.autocast("cpu", enabled=False):
            assert sk.upscaled_linear(*ops.to(torch.float32).args()).dtype == torch.float32


@needs_modules
def test_autocast_upscaled_model_matches_base_dtype_behaviour():
    """Same dtype behaviour as the base HF model under CPU bf16 autocast; a fresh upscaled model still
    reproduces the base logits up to bf16 rounding (both run the frozen weights in bf16)."""
    from helpers_upscale import base_model, token_ids, upscaled

    base = base_model("llama")
    model = upscaled(base, mode="adapt")
    ids = token_ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_base, out = base(ids).logits, model(ids).logits
    assert out.dtype == out_base.dtype
    # bf16 eps is 2^-8; logits ~1 after 2 layers of bf16 matmuls accumulate a few eps
    torch.testing.assert_close(out.float(), out_base.float(), rtol=0, atol=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in _trainable(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", [None, *backends.BACKEND_NAMES], ids=["auto", *backends.BACKEND_NAMES])
def test_autocast_cuda_follows_nn_linear(dtype, backend):
    reason = backend and sk.available_backends("cuda", dtype)[backend]
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    ops = make_operands(lead=(4, 9), route="soft", device="cuda").to(torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        y = sk.upscaled_linear(*ops.args(), backend=backend)
        chosen = backend or sk.explain_dispatch(*ops.args()).backend  # auto: the per-shape automatic choice
        y_linear = nn.Linear(45, 53).cuda()(ops.x[..., :45])
    assert y.dtype == y_linear.dtype == dtype and sk.last_backend() == chosen
    manual = ops.to(dtype)
    manual.route = ops.route
    assert torch.equal(y, sk.upscaled_linear(*manual.args(), backend=backend).detach())


# ----------------------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_gives_identical_gradients(backend):
    """Non-reentrant checkpointing recomputes the identical forward: gradients are bitwise equal."""
    ops = _ops()
    inputs = [ops.x, ops.w21, ops.w22, ops.w12, ops.bias_up, ops.route]

    def block(x, w21, w22, w12, bias_up, route):
        h = sk.upscaled_linear(x, ops.w, w21, w22, w12, ops.bias, bias_up, route, backend=backend)
        return torch.relu(h)

    plain = _grads(block(*inputs), inputs)
    ckpt = _grads(checkpoint(block, *inputs, use_reentrant=False), inputs)
    _assert_all_equal(ckpt, plain)


@needs_modules
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_gives_identical_gradients(monkeypatch, use_reentrant):
    """HF's activation checkpointing of an upscaled model: the decoder layers really are recomputed (more op
    launches) and every expansion gradient is bitwise equal to training without checkpointing."""
    from helpers_upscale import base_model, token_ids, upscaled

    ids = token_ids()
    calls = _count_forward_launches(monkeypatch, "torch")

    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        model = upscaled(base_model("llama"), mode="adapt").train()
        if checkpointing:
            set_activation_checkpointing(model, use_reentrant=use_reentrant)
        params = _trainable(model)
        calls.clear()
        model(ids, labels=ids).loss.backward()  # reentrant checkpointing does not support autograd.grad
        return [p.grad for p in params], len(calls)

    (with_ckpt, launches_ckpt), (plain, launches_plain) = grads(True), grads(False)
    assert launches_ckpt > launches_plain  # the layers' forward ran again in backward
    _assert_all_equal(with_ckpt, plain)


# ----------------------------------------------------------------------------------------------------------
# torch.func


def _count_forward_launches(monkeypatch, backend: str) -> list[int]:
    mod = backends.get_backend(backend)
    calls: list[int] = []
    real = mod.forward

    def forward(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(mod, "forward", forward)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_tokens_is_one_launch(monkeypatch, backend):
    """vmap over x (and route) folds the batch into the token dim: one launch, equal to a Python loop, and
    ordinary autograd through the vmapped output gives the loop's gradients."""
    ops = _ops(route="random")
    xb = torch.randn(3, 4, 10, requires_grad=True)
    rb = torch.rand(4, 3) < 0.5

    def f(x, r):
        return sk.upscaled_linear(x, ops.w, ops.w21, ops.w22, ops.w12, ops.bias, ops.bias_up, r, backend=backend)

    calls = _count_forward_launches(monkeypatch, backend)
    y = torch.func.vmap(f, in_dims=(1, 0))(xb, rb)  # x batched along dim 1, route along dim 0
    assert calls == [3 * 4]
    loop = torch.stack([f(xb[:, b], rb[b]) for b in range(4)])
    torch.testing.assert_close(y, loop, rtol=1e-6, atol=1e-6)
    inputs = [xb, ops.w21, ops.w12]
    for a, b in zip(_grads(y, inputs), _grads(loop, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vmap_over_weights_matches_loop():
    """vmap over a stack of expansion weights (an ensemble) works, one launch per member."""
    ops = _ops()
    w21s = torch.randn(4, 3, 6)

    def f(w21):
        return sk.upscaled_linear(ops.x.detach(), ops.w, w21, ops.w22, ops.w12, ops.bias, ops.bias_up, ops.route)

    torch.testing.assert_close(torch.func.vmap(f)(w21s), torch.stack([f(w) for w in w21s]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, a: torch.func.grad(lambda t: f(t).sum())(a),
        lambda f, a: torch.func.jacrev(f)(a),
        lambda f, a: torch.func.jvp(f, (a,), (torch.ones_like(a),)),
        lambda f, a: torch.func.vmap(torch.func.grad(lambda t: f(t).sum()))(a.expand(2, *a.shape)),
    ],
    ids=["grad", "jacrev", "jvp", "vmap_grad"],
)
def test_functorch_autodiff_raises_clearly(transform):
    ops = _ops()

    def f(w21):
        return sk.upscaled_linear(ops.x.detach(), ops.w, w21, ops.w22, ops.w12, ops.bias, ops.bias_up, ops.route)

    with pytest.raises(RuntimeError, match=r"does not support torch.func.grad.*Use loss.backward\(\)"):
        transform(f, ops.w21.detach())
