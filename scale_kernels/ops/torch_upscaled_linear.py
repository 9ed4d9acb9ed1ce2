"""``torch`` backend: the upscaled linear composed from vendor GEMMs (cuBLAS on CUDA, the CPU BLAS on CPU).

This is the floor every fused backend has to beat and the CPU path. It never concatenates and never runs a
separate add pass: the forward allocates ONE output ``(M, d_out + e_out)`` and each GEMM writes (``mm(out=)``)
or accumulates (``addmm_``, ``beta = 1``, the add happens inside the GEMM epilogue) straight into its column
slice; the backward does the same into ONE ``dx`` buffer. The route gate scales the rows of the smaller GEMM
operand (``x_up`` in the forward and for ``dW12``; ``dy0`` or the ``(M, e_in)`` product in ``dx``), never an
output block. Per call, with ``x = [x0 ; x1]``, ``dy = [dy0 ; dy1]`` and ``r`` the route gate::

    forward    y[:, :d_out]  = x0 W^T (+ b)          then  += (r * x1) W12^T
               y[:, d_out:]  = x0 W21^T (+ b_up)     then  += x1 W22^T
    dx         dx[:, :d_in]  = dy0 W                 then  += dy1 W21
               dx[:, d_in:]  = dy1 W22               then  += r * (dy0 W12)     (droute = rowsum(x1 * (dy0 W12)))
    weights    dW21 = dy1^T x0,  dW22 = dy1^T x1,  dW12 = dy0^T (r * x1);   dW is never computed

Writing into slices costs no hidden copy. ``torch.mm(a, b, out=s)`` / ``s.addmm_(a, b)`` with a column slice
``s`` of strides ``(ld, 1)``, ``ld >= s.shape[1]``: ATen's CUDA ``addmm_out_cuda_impl`` (aten/src/ATen/native/
cuda/Blas.cpp) runs ``prepare_matrix_for_cublas`` on the result, whose branch ``strides[1] == 1 and
strides[0] >= max(1, sizes[1])`` borrows the tensor (no clone) and passes ``ldc = strides[0]`` to cuBLAS; the
same branch accepts column slices of ``x`` / ``dy`` as GEMM inputs (``lda = D``); only a tensor with neither
unit stride is cloned. ``mm(out=)`` is ``addmm`` with ``beta = 0`` and ``result is self``, so nothing is copied
in. The CPU ``addmm_impl_cpu_`` has the same stride cases; ``tests/test_ops_upscaled_linear.py`` profiles a
forward and backward on CPU and finds no ``copy_`` / ``clone`` / ``cat`` / ``add``. One cost remains when a
bias is present: ``addmm(bias, a, b, out=slice)`` copies the broadcast bias into the slice and then runs the
GEMM with ``beta = 1`` (cuBLASLt's fused-bias epilogue is only taken for a contiguous result), i.e. one extra
write + read of that block; Llama-style layers have no bias.

Shapes (2-D, token-major): x ``(M, d_in + e_in)``, dy ``(M, d_out + e_out)``, route ``(M,)`` (float32, or
float64 for float64 operands) or None. Storage layout decision (why ``[W | W12]`` is not one buffer):
docs/dispatch.md, "Why [W | W12] and [W21 | W22] are not stored as one buffer".
"""

from __future__ import annotations

import torch

name = "torch"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _scale_rows(a: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """``route[m] * a[m, :]`` in ``a``'s dtype, computed in route's precision (one rounding)."""
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    return torch.mul(a, route.unsqueeze(1), out=out)


def forward(x, w, w21, w22, w12, bias, bias_up, route) -> torch.Tensor:
    """``[y ; y_up]`` of shape ``(M, d_out + e_out)``, written block by block into one buffer."""
    d_out, d_in = w.shape
    e_out, e_in = w22.shape
    x0, x1 = x.split_with_sizes((d_in, e_in), 1)  # one call for both views: this path runs at decode sizes too
    out = x.new_empty(x.shape[0], d_out + e_out)
    y, y_up = out.split_with_sizes((d_out, e_out), 1)
    if bias is not None:
        torch.addmm(bias, x0, w.mT, out=y)
    else:
        torch.mm(x0, w.mT, out=y)
    if w12 is not None:
        y.addmm_(x1 if route is None else _scale_rows(x1, route), w12.mT)
    if bias_up is not None:
        torch.addmm(bias_up, x0, w21.mT, out=y_up)
    else:
        torch.mm(x0, w21.mT, out=y_up)
    y_up.addmm_(x1, w22.mT)
    return out


def backward_input(dy, x, w, w21, w22, w12, route, need_droute: bool):
    """``dx = [dy0 W + dy1 W21 ; r*(dy0 W12) + dy1 W22]`` and ``droute[m] = <x1[m], (dy0 W12)[m]>``.

    ``x`` is only read for ``droute``. With a route and no ``droute``, the gate scales the smaller of
    ``dy0`` ``(M, d_out)`` and the product ``dy0 W12`` ``(M, e_in)``.
    """
    d_out, d_in = w.shape
    e_out, e_in = w22.shape
    dy0, dy1 = dy.split_with_sizes((d_out, e_out), 1)
    dx = dy.new_empty(dy.shape[0], d_in + e_in)
    dx0, dx1 = dx.split_with_sizes((d_in, e_in), 1)
    torch.mm(dy0, w, out=dx0)
    dx0.addmm_(dy1, w21)
    torch.mm(dy1, w22, out=dx1)
    droute = None
    if w12 is None:
        return dx, droute
    if route is None:
        dx1.addmm_(dy0, w12)
    elif need_droute or e_in <= d_out:
        g = dy0 @ w12  # (M, e_in)
        if need_droute:  # an empty W12 term (d_out == 0) has droute exactly 0, even for a NaN x_up
            x1 = x[:, d_in:]
            droute = g.to(route.dtype, copy=True).mul_(x1).sum(dim=1) if d_out else route.new_zeros(route.shape)
        dx1.addcmul_(g, route.unsqueeze(1))
    else:
        dx1.addmm_(_scale_rows(dy0, route), w12)
    return dx, droute


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    """``dW21 = dy1^T x0``, ``dW22 = dy1^T x1``, ``dW12 = dy0^T (r * x1)``; None where not needed.

    The route scales the smaller of ``x1`` ``(M, e_in)`` and ``dy0`` ``(M, d_out)``.
    """
    dy0, dy1 = dy.split_with_sizes((d_out, dy.shape[1] - d_out), 1)
    x0, x1 = x.split_with_sizes((d_in, x.shape[1] - d_in), 1)
    dw21 = dy1.mT @ x0 if need_w21 else None
    dw22 = dy1.mT @ x1 if need_w22 else None
    dw12 = None
    if need_w12:
        if route is None:
            dw12 = dy0.mT @ x1
        elif x1.shape[1] <= d_out:
            dw12 = dy0.mT @ _scale_rows(x1, route)
        else:
            dw12 = _scale_rows(dy0, route).mT @ x1
    return dw21, dw22, dw12
