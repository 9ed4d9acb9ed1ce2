"""upscaled_linear: every backend against the fp64 reference, forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_operands, run, triton_usable

import scale_kernels as sk
from scale_kernels import backends, functional

CPU_BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")),
]
ROUTES = ["none", "zeros", "ones", "random", "soft"]
W12_KINDS = ["none", "frozen", "trainable"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("w12", W12_KINDS)
def test_matches_reference_odd_shapes(backend, dtype, route, w12):
    ops = make_operands(w12=w12, route=route, bias=route != "ones")
    assert_matches_reference(ops, dtype, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "sizes",
    [
        dict(d_in=45, e_in=0, d_out=53, e_out=11),  # input not widened
        dict(d_in=45, e_in=19, d_out=53, e_out=0),  # LM head: logits only
        dict(d_in=33, e_in=70, d_out=17, e_out=66),  # expansion wider than the original, > one tile
        dict(d_in=1, e_in=1, d_out=1, e_out=1),
    ],
    ids=["e_in0", "e_out0", "wide", "ones"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_degenerate_widths(backend, sizes, bias):
    ops = make_operands(**sizes, bias=bias, route="soft")
    assert_matches_reference(ops, torch.float32, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3d_input_and_route(backend):
    ops = make_operands(lead=(3, 13), route="soft")
    assert_matches_reference(ops, torch.float32, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed", "weights_t"])
def test_non_contiguous_inputs(backend, layout, monkeypatch):
    """A column-sliced x, transposed leading dims (x and route) and transposed weights give the reference
    result; the kernel really receives the non-contiguous operand (no silent copy on the way in)."""
    mod = backends.get_backend(backend)
    seen = []
    real_forward = mod.forward

    def spy(x, w, *rest):
        seen.append(x.is_contiguous() and w.is_contiguous())
        return real_forward(x, w, *rest)

    monkeypatch.setattr(mod, "forward", spy)
    ops = make_operands(lead=(5, 7), route="random")
    assert_matches_reference(ops, torch.float32, backend, layout=layout)
    if layout != "transposed":  # flattening transposed leading dims to (M, D) needs a copy
        assert seen == [False]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_tokens(backend):
    ops = make_operands(lead=(0,), route="soft").to(torch.float32)
    y = sk.upscaled_linear(*ops.args(), backend=backend)
    assert y.shape == (0, 53 + 11)
    y.sum().backward()
    assert ops.w21.grad.shape == ops.w21.shape and ops.w21.grad.abs().max() == 0
    assert ops.w12.grad.abs().max() == 0 and ops.x.grad.shape == ops.x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_route_selects_paths(backend):
    """route=0 tokens equal the W12-free (preserve) output exactly in the original columns; route=1 tokens
    equal the full output; the expansion columns never depend on the route."""
    ops = make_operands(route="random").to(torch.float32)
    full = sk.upscaled_linear(ops.x, ops.w, ops.w21, ops.w22, ops.w12, ops.bias, ops.bias_up, backend=backend)
    preserve = sk.upscaled_linear(ops.x, ops.w, ops.w21, ops.w22, None, ops.bias, ops.bias_up, backend=backend)
    routed = sk.upscaled_linear(*ops.args(), backend=backend)
    r = ops.route
    assert 0 < r.sum() < r.numel()
    torch.testing.assert_close(routed[r], full[r], rtol=0, atol=1e-6)
    torch.testing.assert_close(routed[~r], preserve[~r], rtol=0, atol=1e-6)
    assert (routed[:, 53:] == full[:, 53:]).all()
    assert not torch.allclose(full[~r, :53], preserve[~r, :53])  # the W12 term is really there


def test_gradcheck_torch_backend_fp64():
    ops = make_operands(lead=(2, 3), d_in=5, e_in=4, d_out=6, e_out=3, route="soft")
    diff = [t for _, t in ops.differentiable()]

    def f(*d):
        it = iter(d)
        args = [next(it) if (t is not None and t.requires_grad) else t for t in ops.args()]
        return sk.upscaled_linear(*args, backend="torch")

    assert torch.autograd.gradcheck(f, diff)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_weights_get_no_grad(backend):
    ops = make_operands(route="soft").to(torch.float32)
    sk.upscaled_linear(*ops.args(), backend=backend).square().sum().backward()
    assert ops.w.grad is None and ops.bias.grad is None
    for t in (ops.x, ops.w21, ops.w22, ops.w12, ops.bias_up, ops.route):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_frozen_weight_requiring_grad_is_rejected():
    ops = make_operands().to(torch.float32)
    ops.w.requires_grad_(True)
    with pytest.raises(ValueError, match=r"w requires grad.*frozen"):
        sk.upscaled_linear(*ops.args())
    with torch.no_grad():  # inference with an unfrozen weight is fine
        sk.upscaled_linear(*ops.args())


class _Spy:
    """Records the backward launcher calls of a backend module."""

    def __init__(self, monkeypatch, backend: str):
        mod = backends.get_backend(backend)
        self.weight_calls: list[tuple[bool, bool, bool]] = []
        self.input_calls: list[bool] = []
        real_w, real_i = mod.backward_weight, mod.backward_input

        def backward_weight(dy, x, route, d_in, d_out, n21, n22, n12):
            self.weight_calls.append((n21, n22, n12))
            return real_w(dy, x, route, d_in, d_out, n21, n22, n12)

        def backward_input(dy, x, w, w21, w22, w12, route, need_droute):
            self.input_calls.append(need_droute)
            return real_i(dy, x, w, w21, w22, w12, route, need_droute)

        monkeypatch.setattr(mod, "backward_weight", backward_weight)
        monkeypatch.setattr(mod, "backward_input", backward_input)


def _saved_tensor_ptrs(fn) -> set[int]:
    ptrs: set[int] = set()

    def pack(t):
        ptrs.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ptrs, out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "trainable, expected_weight_flags",
    [
        ({"w21", "w22", "w12"}, [(True, True, True)]),
        ({"w21", "w22"}, [(True, True, False)]),  # W12 frozen (SCALE-Preserve style): dW12 skipped
        ({"w22"}, [(False, True, False)]),
        (set(), []),  # nothing trainable: no weight-gradient launch at all
    ],
)
def test_backward_does_no_work_for_frozen_weights(monkeypatch, backend, trainable, expected_weight_flags):
    spy = _Spy(monkeypatch, backend)
    ops = make_operands(route="random").to(torch.float32)
    for name in ("w21", "w22", "w12"):
        getattr(ops, name).requires_grad_(name in trainable)
    ops.bias_up.requires_grad_(False)
    ptrs, y = _saved_tensor_ptrs(lambda: sk.upscaled_linear(*ops.args(), backend=backend))
    # x is an activation: it is kept for backward only when a weight gradient needs it
    assert (ops.x.data_ptr() in ptrs) == bool(trainable)
    y.sum().backward()
    assert spy.weight_calls == expected_weight_flags
    assert spy.input_calls == [False]
    for name in ("w", "w21", "w22", "w12"):
        assert (getattr(ops, name).grad is not None) == (name in trainable)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_input_grad_skips_dx(monkeypatch, backend):
    spy = _Spy(monkeypatch, backend)
    ops = make_operands().to(torch.float32)
    ops.x.requires_grad_(False)
    sk.upscaled_linear(*ops.args(), backend=backend).sum().backward()
    assert spy.input_calls == [] and spy.weight_calls == [(True, True, True)]


def test_run_helper_covers_all_gradients():
    """Guard against a vacuous reference test: the soft-route case differentiates 6 operands."""
    ops = make_operands(route="soft")
    assert [n for n, _ in ops.differentiable()] == ["x", "w21", "w22", "w12", "bias_up", "route"]
    outs = run(ops, sk.upscaled_linear_reference, torch.ones(37, 64, dtype=torch.float64))
    assert all(o.abs().sum() > 0 for o in outs)


def test_torch_compile_fullgraph():
    ops = make_operands(lead=(2, 5), route="soft").to(torch.float32)

    def f(x, w21, route):
        return sk.upscaled_linear(x, ops.w, w21, ops.w22, ops.w12, ops.bias, ops.bias_up, route, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(ops.x, ops.w21, ops.route)
    gx, gw, gr = torch.autograd.grad(y.square().sum(), [ops.x, ops.w21, ops.route])
    y_ref = f(ops.x, ops.w21, ops.route)
    ex, ew, er = torch.autograd.grad(y_ref.square().sum(), [ops.x, ops.w21, ops.route])
    torch.testing.assert_close(y, y_ref)
    for a, b in ((gx, ex), (gw, ew), (gr, er)):
        torch.testing.assert_close(a, b)


def test_opcheck():
    """torch.library's own consistency checks (schema, fake impl, autograd registration)."""
    ops = make_operands(lead=(4,), d_in=6, e_in=3, d_out=5, e_out=2, route="soft").to(torch.float32)
    r = ops.route.detach().float().requires_grad_(True)
    args = (ops.x, ops.w, ops.w21, ops.w22, ops.w12, ops.bias, ops.bias_up, r, "torch")
    torch.library.opcheck(torch.ops.scale_kernels.upscaled_linear.default, args)


# ----------------------------------------------------------------------------------------------------------
# the composed torch backend: one output buffer, no hidden copies; every route-scaling branch


def _aten_ops(fn) -> list[tuple[str, tuple[str, ...]]]:
    """Every aten op ``fn`` runs on CPU, with the names of the ops it was called from."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = []
    for event in prof.events():
        parents, parent = [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        ops.append((event.name, tuple(parents)))
    return ops


def test_torch_backend_writes_slices_of_one_buffer_without_copies():
    """Forward and backward write each block straight into its slice of one output: no cat, no separate add
    pass, and no GEMM result is copied (the only copy is droute's cast to the route dtype, by design)."""
    mod = backends.get_backend("torch")
    ops = make_operands(lead=(16,), route="soft", bias=False).to(torch.float32)
    x, w, w21, w22, w12, _, _, r = (t.detach() if t is not None else None for t in ops.args())
    r = r.float()
    d_in, d_out = w.shape[1], w.shape[0]
    dy = torch.randn(16, d_out + w21.shape[0])
    y = mod.forward(x, w, w21, w22, w12, None, None, r)
    assert y.is_contiguous() and y.untyped_storage().nbytes() == y.numel() * y.element_size()
    calls = _aten_ops(lambda: mod.forward(x, w, w21, w22, w12, None, None, r))
    calls += _aten_ops(lambda: mod.backward_input(dy, x, w, w21, w22, w12, r, True))
    calls += _aten_ops(lambda: mod.backward_weight(dy, x, r, d_in, d_out, True, True, True))
    names = {name for name, _ in calls}
    assert not names & {"aten::cat", "aten::add", "aten::add_", "aten::clone", "aten::contiguous", "aten::stack"}
    copies = [parents for name, parents in calls if name == "aten::copy_"]
    assert all("aten::to" in parents for parents in copies), copies
    gemms = [name for name, _ in calls if name in ("aten::mm", "aten::addmm_")]
    assert len(gemms) == 4 + 4 + 3  # forward: 4 blocks; dx: 3 blocks + g = dy0 W12 (droute and dx_up); 3 dW


@pytest.mark.parametrize("route", ["random", "soft"])
@pytest.mark.parametrize(
    "sizes",
    [dict(d_in=20, e_in=7, d_out=23, e_out=5), dict(d_in=9, e_in=30, d_out=6, e_out=4)],
    ids=["e_in<d_out", "e_in>d_out"],
)
def test_torch_backend_route_scaling_branches(sizes, route):
    """The route scales whichever operand is smaller (x_up or dy0, or the (M, e_in) product): every branch
    equals the reference, with and without a route gradient."""
    ops = make_operands(lead=(11,), **sizes, route=route)
    assert_matches_reference(ops, torch.float32, "torch")
    assert_matches_reference(ops, torch.bfloat16, "torch")


# ----------------------------------------------------------------------------------------------------------
# host path: eager calls skip the custom op; compile / vmap / fake tensors run it; both give the same numbers


def _count_op_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = functional._upscaled_linear_op
    monkeypatch.setattr(functional, "_upscaled_linear_op", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


def test_eager_calls_skip_the_custom_op_with_identical_results(monkeypatch):
    ops = make_operands(lead=(3, 5), route="soft").to(torch.float32)
    dy = torch.randn(3, 5, 64)
    calls = _count_op_calls(monkeypatch)
    eager = run(ops, lambda *a: sk.upscaled_linear(*a, backend="torch"), dy)
    with torch.no_grad():
        sk.upscaled_linear(*ops.args(), backend="torch")
    assert calls == []
    via_op = run(ops, lambda *a: functional._upscaled_linear_op(*_op_args(a), "torch").reshape(3, 5, 64), dy)
    for a, b in zip(eager, via_op):
        assert torch.equal(a, b)


def _op_args(args: tuple) -> tuple:
    x, w, w21, w22, w12, bias, bias_up, route = args
    return (x.reshape(-1, x.shape[-1]), w, w21, w22, w12, bias, bias_up, route.reshape(-1).float())


def test_fake_tensors_go_through_the_custom_op(monkeypatch):
    """Under a dispatch mode (FakeTensorMode: memory estimators, meta tracing) the custom op's fake
    implementation runs, never a backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = _count_op_calls(monkeypatch)
    with FakeTensorMode():
        ops = make_operands(lead=(4,), route="random").to(torch.float32)
        y = sk.upscaled_linear(*ops.args())
    assert y.shape == (4, 64) and calls == ["torch"]


def test_double_backward_is_a_clear_error():
    ops = make_operands(lead=(4,)).to(torch.float32)
    (g,) = torch.autograd.grad(sk.upscaled_linear(*ops.args()).square().sum(), ops.w21, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


# ----------------------------------------------------------------------------------------------------------
# the composed path on a GPU (cuBLAS): accuracy in bf16, and no hidden copy of a GEMM result

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["none", "random", "soft"])
def test_torch_backend_on_cuda_matches_reference(dtype, route):
    ops = make_operands(lead=(3, 37), d_in=160, e_in=40, d_out=96, e_out=56, route=route, device="cuda")
    assert_matches_reference(ops, dtype, "torch")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("route", [False, True])
def test_torch_backend_on_cuda_allocates_only_its_outputs(route):
    """cuBLAS writes each block into its slice in place: the forward allocates the output (plus, with a route,
    the scaled x_up rows) and dx allocates dx; a hidden copy of any slice would allocate a block more."""
    mod = backends.get_backend("torch")
    m, d, e = 4096, 2048, 512
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    x, dy, w, w21, w22, w12 = rnd(m, d + e), rnd(m, d + e), rnd(d, d), rnd(e, d), rnd(e, e), rnd(d, e)
    r = (torch.rand(m, device="cuda", generator=g) < 0.5).float() if route else None

    def peak_extra(fn) -> int:
        fn()  # warm-up: cuBLAS workspaces are allocated once
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    block = m * (d + e) * 2
    scaled = m * e * 2 if route else 0
    assert block <= peak_extra(lambda: mod.forward(x, w, w21, w22, w12, None, None, r)) <= block + scaled
    assert block <= peak_extra(lambda: mod.backward_input(dy, x, w, w21, w22, w12, None, False)) <= block
