"""The public ``upscaled_linear`` op: validation, backend dispatch, ``torch.library`` registration, autograd.

Math (per token, ``x = [x0 ; x1]`` with ``x0`` of width d_in and ``x1`` of width e_in)::

    y0 = W x0 + r * (W12 x1) + b          (d_out)
    y1 = W21 x0 + W22 x1 + b_up           (e_out)

Backward, with ``g = dy0 W12``::

    dx0 = dy0 W + dy1 W21      dx1 = r * g + dy1 W22      dr = <x1, g>
    dW21 = dy1^T x0            dW22 = dy1^T x1            dW12 = (r * dy0)^T x1      db_up = sum(dy1)

``W`` and ``b`` are frozen: their gradients are never computed. Each other gradient is computed only
when its input requires grad, and ``x`` is saved only when a weight or route gradient needs it.
"""

from __future__ import annotations

import torch

from . import backends
from .validation import check_upscaled_linear_args

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
    x, w, w21, w22, w12, bias, bias_up, route, backend = inputs
    need = {
        "x": x.requires_grad,
        "w21": w21.requires_grad,
        "w22": w22.requires_grad,
        "w12": w12 is not None and w12.requires_grad,
        "bias_up": bias_up is not None and bias_up.requires_grad,
        "route": route is not None and route.requires_grad,
    }
    ctx.need = need
    ctx.backend = backend
    ctx.d_in, ctx.d_out = w.shape[1], w.shape[0]
    # weights are live parameters (saving them costs no memory); x is an activation, kept only when a
    # weight or route gradient needs it
    keep_x = need["w21"] or need["w22"] or need["w12"] or need["route"]
    ctx.save_for_backward(x if keep_x else None, w, w21, w22, w12, route)


def _backward(ctx, dy):
    x, w, w21, w22, w12, route = ctx.saved_tensors
    need = ctx.need
    dy = dy.contiguous()
    dx = dw21 = dw22 = dw12 = dbias_up = droute = None
    if need["x"] or need["route"]:
        dx, droute = _backward_input_op(dy, x, w, w21, w22, w12, route, need["route"], ctx.backend)
        dx = dx if need["x"] else None
        droute = droute if need["route"] else None
    if need["w21"] or need["w22"] or need["w12"]:
        grads = iter(
            _backward_weight_op(dy, x, route, ctx.d_in, ctx.d_out, need["w21"], need["w22"], need["w12"], ctx.backend)
        )
        dw21 = next(grads) if need["w21"] else None
        dw22 = next(grads) if need["w22"] else None
        dw12 = next(grads) if need["w12"] else None
    if need["bias_up"]:
        dbias_up = dy[:, ctx.d_out :].sum(dim=0)
    return dx, None, dw21, dw22, dw12, None, dbias_up, droute, None


_upscaled_linear_op.register_autograd(_backward, setup_context=_setup_context)


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
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default: see :mod:`scale_kernels.backends`).

    Returns:
        ``(..., d_out + e_out)``: ``[y ; y_up]`` in x's dtype. ``e_in`` and ``e_out`` may be 0.
    """
    sizes = check_upscaled_linear_args(x, w, w21, w22, w12, bias, bias_up, route)
    name = backends.resolve_backend(backend, x.device, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = None
    if route is not None and w12 is not None:
        r2 = route.reshape(-1).to(_route_dtype(x.dtype)).contiguous()
    y = _upscaled_linear_op(x2, w, w21, w22, w12, bias, bias_up, r2, name)
    return y.reshape(*lead, sizes.d_out + sizes.e_out)
