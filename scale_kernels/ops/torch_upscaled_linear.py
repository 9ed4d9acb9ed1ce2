"""``torch`` backend: plain matmuls, exact same semantics as the fused kernels (CPU fallback).

Shapes (2-D, token-major): x ``(M, d_in + e_in)``, dy ``(M, d_out + e_out)``, route ``(M,)`` or None.
"""

from __future__ import annotations

import torch

from ..reference import upscaled_linear_reference

name = "torch"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def forward(x, w, w21, w22, w12, bias, bias_up, route) -> torch.Tensor:
    """``[y ; y_up]`` of shape ``(M, d_out + e_out)``."""
    return upscaled_linear_reference(x, w, w21, w22, w12, bias, bias_up, route)


def backward_input(dy, x, w, w21, w22, w12, route, need_droute: bool):
    """``dx = [dy0 W + dy1 W21 ; r*(dy0 W12) + dy1 W22]`` and ``droute[m] = <x1[m], (dy0 W12)[m]>``."""
    d_out, d_in = w.shape
    M = dy.shape[0]
    dy0, dy1 = dy[:, :d_out], dy[:, d_out:]
    dx = torch.empty(M, d_in + w22.shape[1], dtype=dy.dtype, device=dy.device)
    torch.addmm(dy0 @ w, dy1, w21, out=dx[:, :d_in])
    dx1 = dy1 @ w22
    droute = None
    if w12 is not None:
        g = dy0 @ w12
        if need_droute:  # an empty W12 term (d_out == 0) has droute exactly 0, even for a NaN x_up
            droute = (g.to(route.dtype) * x[:, d_in:].to(route.dtype)).sum(dim=1) if d_out else route.new_zeros(M)
        if route is not None:
            g = (g * route.unsqueeze(1)).to(dy.dtype)
        dx1 += g
    dx[:, d_in:] = dx1
    return dx, droute


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    """``dW21 = dy1^T x0``, ``dW22 = dy1^T x1``, ``dW12 = (r * dy0)^T x1``; None where not needed."""
    dy0, dy1 = dy[:, :d_out], dy[:, d_out:]
    x0, x1 = x[:, :d_in], x[:, d_in:]
    dw21 = dy1.t() @ x0 if need_w21 else None
    dw22 = dy1.t() @ x1 if need_w22 else None
    dw12 = None
    if need_w12:
        if route is not None:
            dy0 = (dy0 * route.unsqueeze(1)).to(dy.dtype)
        dw12 = dy0.t() @ x1
    return dw21, dw22, dw12
