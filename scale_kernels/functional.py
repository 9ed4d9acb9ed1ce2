"""The public ``upscaled_linear`` op: validation, backend dispatch, ``torch.library`` registration, autograd.

Math (per token, ``x = [x0 ; x1]`` with ``x0`` of width d_in and ``x1`` of width e_in)::

    y0 = W x0 + r * (W12 x1) + b          (d_out)
    y1 = W21 x0 + W22 x1 + b_up           (e_out)

Backward, with ``g = dy0 W12``::

    dx0 = dy0 W + dy1 W21      dx1 = r * g + dy1 W22      dr = <x1, g>
    dW21 = dy1^T x0            dW22 = dy1^T x1            dW12 = (r * dy0)^T x1      db_up = sum(dy1)

``W`` and ``b`` are frozen: their gradients are never computed. Each other gradient is computed only
when its input requires grad, and ``x`` is saved only when a weight or route gradient needs it.

Two execution paths share the saved-tensor selection (:func:`_setup_context`) and the backward
(:func:`_gradients`): plain eager calls run the backend's launchers under :class:`_EagerUpscaledLinear` (a
plain ``autograd.Function``; no-grad calls call the backend directly), which costs less host time per call;
``torch.compile``, functorch transforms (vmap), tensor subclasses and dispatch modes run the
``torch.library`` custom ops, which carry the fake implementations and the vmap rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from . import backends
from .validation import CheckedCall, check_upscaled_linear_args

Tensor = torch.Tensor


def _route_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("scale_kernels::upscaled_linear", mutates_args=())
def _upscaled_linear_op(
    x: Tensor,
    w: Tensor,
    w21: Tensor,
    w22: Tensor,
    w12: Tensor | None,
    bias: Tensor | None,
    bias_up: Tensor | None,
    route: Tensor | None,
    backend: str,
) -> Tensor:
    backends.record_backend(backend)
    return backends.get_backend(backend).forward(x, w, w21, w22, w12, bias, bias_up, route)


@_upscaled_linear_op.register_fake
def _(x, w, w21, w22, w12, bias, bias_up, route, backend):
    return x.new_empty(x.shape[0], w.shape[0] + w21.shape[0])


@torch.library.custom_op("scale_kernels::upscaled_linear_backward_input", mutates_args=())
def _backward_input_op(
    dy: Tensor,
    x: Tensor | None,
    w: Tensor,
    w21: Tensor,
    w22: Tensor,
    w12: Tensor | None,
    route: Tensor | None,
    need_droute: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    dx, droute = backends.get_backend(backend).backward_input(dy, x, w, w21, w22, w12, route, need_droute)
    if droute is None:  # custom ops cannot return None: an empty tensor stands for "not computed"
        droute = dy.new_empty(0, dtype=_route_dtype(dy.dtype))
    return dx, droute


@_backward_input_op.register_fake
def _(dy, x, w, w21, w22, w12, route, need_droute, backend):
    dx = dy.new_empty(dy.shape[0], w.shape[1] + w22.shape[1])
    return dx, dy.new_empty(dy.shape[0] if need_droute else 0, dtype=_route_dtype(dy.dtype))


@torch.library.custom_op("scale_kernels::upscaled_linear_backward_weight", mutates_args=())
def _backward_weight_op(
    dy: Tensor,
    x: Tensor,
    route: Tensor | None,
    d_in: int,
    d_out: int,
    need_w21: bool,
    need_w22: bool,
    need_w12: bool,
    backend: str,
) -> list[Tensor]:
    grads = backends.get_backend(backend).backward_weight(dy, x, route, d_in, d_out, need_w21, need_w22, need_w12)
    return [g for g in grads if g is not None]


@_backward_weight_op.register_fake
def _(dy, x, route, d_in, d_out, need_w21, need_w22, need_w12, backend):
    e_out, e_in = dy.shape[1] - d_out, x.shape[1] - d_in
    shapes = [(e_out, d_in), (e_out, e_in), (d_out, e_in)]
    return [dy.new_empty(s) for s, need in zip(shapes, (need_w21, need_w22, need_w12)) if need]


def _setup_context(ctx, inputs, output) -> None:
    """What the backward needs (shared by the custom op and the eager autograd.Function)."""
    x, w, w21, w22, w12, bias, bias_up, route, backend = inputs
    ctx.backend = backend
    ctx.d_in, ctx.d_out = w.shape[1], w.shape[0]
    # weights are live parameters (saving them costs no memory); x is an activation, kept only when a
    # weight or route gradient needs it
    _, _, need_w21, need_w22, need_w12, _, _, need_route = ctx.needs_input_grad[:8]  # custom op: no entry for backend
    keep_x = need_w21 or need_w22 or need_w12 or need_route
    ctx.save_for_backward(x if keep_x else None, w, w21, w22, w12, route)


def _gradients(ctx, dy: Tensor, backward_input: Callable, backward_weight: Callable) -> tuple:
    """The gradients of every op input from the saved context, with the given launchers (the backend's own in
    eager mode, the custom ops under torch.compile / vmap); only the gradients the inputs need are computed."""
    x, w, w21, w22, w12, route = ctx.saved_tensors
    need_x, _, need_w21, need_w22, need_w12, _, need_bias_up, need_route = ctx.needs_input_grad[:8]
    dy = dy.contiguous()
    dx = dw21 = dw22 = dw12 = dbias_up = droute = None
    if need_x or need_route:
        dx, droute = backward_input(dy, x, w, w21, w22, w12, route, need_route)
        dx = dx if need_x else None
        droute = droute if need_route else None
    if need_w21 or need_w22 or need_w12:
        dw21, dw22, dw12 = backward_weight(dy, x, route, ctx.d_in, ctx.d_out, need_w21, need_w22, need_w12)
    if need_bias_up:
        dbias_up = dy[:, ctx.d_out :].sum(dim=0)
    return dx, None, dw21, dw22, dw12, None, dbias_up, droute, None


def _op_backward_input(backend: str, *args) -> tuple[Tensor, Tensor]:
    return _backward_input_op(*args, backend)


def _op_backward_weight(backend: str, dy, x, route, d_in, d_out, *needs: bool) -> tuple[Tensor | None, ...]:
    return backends.place_gradients(_backward_weight_op(dy, x, route, d_in, d_out, *needs, backend), needs)


def _backward(ctx, dy):
    return _gradients(
        ctx, dy, functools.partial(_op_backward_input, ctx.backend), functools.partial(_op_backward_weight, ctx.backend)
    )


_upscaled_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerUpscaledLinear(torch.autograd.Function):
    """The eager training path: the backend's launchers under a plain autograd.Function, without the custom
    op's dispatch (same saved tensors and the same backward code as the custom op)."""

    @staticmethod
    def forward(ctx, x, w, w21, w22, w12, bias, bias_up, route, backend):
        # ctx-style forward: Function.apply binds arguments with inspect.signature on every call when a
        # separate setup_context is defined, which costs more than the rest of the host path
        y = backends.get_backend(backend).forward(x, w, w21, w22, w12, bias, bias_up, route)
        _setup_context(ctx, (x, w, w21, w22, w12, bias, bias_up, route, backend), y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        mod = backends.get_backend(ctx.backend)
        return _gradients(ctx, dy, mod.backward_input, mod.backward_weight)


@_upscaled_linear_op.register_vmap
def _vmap(info, in_dims, x, w, w21, w22, w12, bias, bias_up, route, backend):
    """``torch.func.vmap`` rule. Batched tokens (x and/or route) fold into the token dim: one launch.
    Batched weights (e.g. an ensemble) run one launch per batch element."""
    x_dim, route_dim = in_dims[0], in_dims[7]
    if all(d is None for i, d in enumerate(in_dims) if i not in (0, 7)):
        b = info.batch_size
        xb = x.movedim(x_dim, 0) if x_dim is not None else x.expand(b, *x.shape)
        m = xb.shape[1]
        rb = None
        if route is not None:
            rb = route.movedim(route_dim, 0) if route_dim is not None else route.expand(b, m)
            rb = rb.reshape(b * m).contiguous()
        y = _upscaled_linear_op(xb.reshape(b * m, -1), w, w21, w22, w12, bias, bias_up, rb, backend)
        return y.reshape(b, m, -1), 0
    args = (x, w, w21, w22, w12, bias, bias_up, route)
    outs = []
    for i in range(info.batch_size):
        sliced = [a if d is None or a is None else a.select(d, i) for a, d in zip(args, in_dims)]
        outs.append(_upscaled_linear_op(*sliced, backend))
    return torch.stack(outs), 0


def _functorch_active() -> bool:
    """Whether a functorch transform (vmap) is active; its autodiff transforms raise a clear RuntimeError:
    custom-op autograd does not compose with them."""
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return False
    autodiff = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    if any(level.key() in autodiff for level in stack):
        raise RuntimeError(
            "upscaled_linear does not support torch.func.grad / vjp / jacrev / jacfwd / jvp / hessian (its "
            "backward is a torch.library custom-op autograd formula, which functorch's autodiff transforms "
            "cannot call). Use loss.backward() or torch.autograd.grad; torch.func.vmap is supported."
        )
    return True


def _autocast(tensors: tuple, device_type: str) -> tuple:
    """Under ``torch.autocast`` behave like ``nn.Linear``: cast the floating-point operands (not fp64, like
    autocast itself) to the autocast dtype of ``device_type``. The cast is differentiable, so fp32 master
    weights get fp32 gradients."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return tuple(cast(t) for t in tensors)


def _prepare(x, w, w21, w22, w12=None, bias=None, bias_up=None, route=None) -> tuple[tuple, CheckedCall, bool]:
    """Autocast and validation shared by :func:`upscaled_linear` and :func:`explain_dispatch`. Returns the 2-D
    operands ``(x (M, d_in + e_in), w, w21, w22, w12, bias, bias_up, route (M,) float or None)``, the checked
    call (block sizes, whether a gradient is needed) and whether the custom op must run (torch.compile,
    functorch transforms, tensor subclasses, dispatch modes) instead of the eager autograd.Function."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        x, w, w21, w22, w12, bias, bias_up = _autocast((x, w, w21, w22, w12, bias, bias_up), x.device.type)
    use_op = torch.compiler.is_compiling() or _functorch_active()
    checked = check_upscaled_linear_args(x, w, w21, w22, w12, bias, bias_up, route)
    # tensor subclasses (FakeTensor, DTensor, ...) and dispatch modes need the custom op's registrations
    use_op = use_op or not checked.plain_tensors or torch._C._len_torch_dispatch_stack() > 0
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    r2 = None
    if route is not None and w12 is not None:
        r2 = route if route.dim() == 1 else route.reshape(-1)
        r2 = r2.to(_route_dtype(x.dtype)).contiguous()
    return (x2, w, w21, w22, w12, bias, bias_up, r2), checked, use_op


def _signature(args: tuple, checked: CheckedCall) -> backends.CallSignature:
    x2, w12, r2 = args[0], args[4], args[7]
    return backends.CallSignature(
        x2.device,
        x2.dtype,
        backends.token_bucket(x2.shape[0]),
        *checked.sizes,
        w12 is not None,
        r2 is not None,
        checked.needs_grad,
    )


def upscaled_linear(
    x: Tensor,
    w: Tensor,
    w21: Tensor,
    w22: Tensor,
    w12: Tensor | None = None,
    bias: Tensor | None = None,
    bias_up: Tensor | None = None,
    route: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Fused upscaled linear ``[y ; y_up] = [[W, r*W12], [W21, W22]] [x ; x_up] + [b ; b_up]``.

    Args:
        x: ``(..., d_in + e_in)``, the concatenated stream ``[x ; x_up]``.
        w: ``(d_out, d_in)`` frozen pretrained weight (must not require grad; never gets a gradient).
        w21: ``(e_out, d_in)``; w22: ``(e_out, e_in)``: expansion weights (gradients when they require it).
        w12: ``(d_out, e_in)`` or None. None (SCALE-Preserve) skips the term entirely.
        bias: ``(d_out,)`` frozen bias or None; bias_up: ``(e_out,)`` or None.
        route: ``x.shape[:-1]`` bool mask or float gate scaling the W12 term per token (None = all ones).
            A float gate that requires grad receives a gradient.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default: see :mod:`scale_kernels.backends`;
            :func:`explain_dispatch` shows the choice for given arguments).

    Returns:
        ``(..., d_out + e_out)``: ``[y ; y_up]`` in x's dtype (under ``torch.autocast``: the autocast dtype,
        like ``nn.Linear``). ``e_in`` and ``e_out`` may be 0.

    NaN/inf in ``x`` propagate exactly like in the reference (a route-0 token whose ``x_up`` is NaN gets a NaN
    original output, as ``(x_up W12^T) * 0`` does in PyTorch); see docs/compatibility.md.
    Works under ``torch.compile(fullgraph=True)``, ``torch.autocast``, ``torch.utils.checkpoint`` and
    ``torch.func.vmap`` (these run the ``torch.library`` custom op; plain eager calls run the backend under a
    lighter autograd.Function with the same backward); ``torch.func.grad`` and the other functorch autodiff
    transforms raise a RuntimeError.
    """
    args, checked, use_op = _prepare(x, w, w21, w22, w12, bias, bias_up, route)
    x2, train = args[0], checked.needs_grad
    if use_op:
        name = backends.resolve_backend(backend, x2.device, x2.dtype, args[4] is not None, args[7] is not None, train)
        y = _upscaled_linear_op(*args, name)
    else:
        name = backends.decide(backend, _signature(args, checked)).backend
        backends.record_backend(name)
        y = _EagerUpscaledLinear.apply(*args, name) if train else backends.get_backend(name).forward(*args)
    return y if x2 is x else y.reshape(*x.shape[:-1], checked.sizes.d_out + checked.sizes.e_out)


def explain_dispatch(
    *args: Tensor | None, backend: str | None = None, **kwargs: Tensor | None
) -> backends.DispatchDecision:
    """Which backend :func:`upscaled_linear` called with the same arguments (and the same grad mode,
    ``use_backend`` and env var) would run, and why: the source (argument / use_backend / env / table /
    heuristic), the reason and the measured table entries it was chosen from. Nothing is computed; ``print()``
    it for a readable summary."""
    prepared, checked, _ = _prepare(*args, **kwargs)
    return backends.decide(backend, _signature(prepared, checked))
