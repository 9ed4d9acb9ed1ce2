"""Split RMSNorm of ``[x ; x_up]`` in one launch: each slice normalised by its own statistics.

Math, per row ``x = [x0 ; x1]`` (widths ``d`` and ``e``), HF's RMSNorm semantics on each slice::

    rstd_i = 1 / sqrt(mean(x_i^2) + eps)          (fp32)
    n_i    = (x_i * rstd_i) rounded to x's dtype
    y      = [w * n_0 ; w_up * n_1]               stored in x's dtype (the stream dtype)

``w`` is the frozen pretrained weight, ``w_up`` the trainable one; they may have different dtypes (e.g. bf16 and
an fp32 master under the precision policy). Backward (``dn_i = dy_i * w_i``, ``n_i`` unrounded)::

    dx_i = rstd_i * (dn_i - n_i * mean(dn_i * n_i))      dw_up = sum_rows dy_1 * n_1 (fp32)

``dw`` is never computed (a trainable ``w`` is refused: the module layer then uses the plain PyTorch path).

* ``_forward_kernel``: one program per row computes both slices' statistics and writes ``y`` and ``rstd``.
* ``_backward_kernel``: a fixed number of programs, each looping over a strided set of rows, writes ``dx`` and
  keeps an fp32 partial sum of ``dw_up`` per program (summed afterwards: deterministic, no atomics).

:func:`split_rms_norm_torch` is the plain-PyTorch path (CPU and any device; it is also what HF computes).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

MAX_WIDTH = 65536  # a slice is one block of registers per program; wider norms use the torch path
_BACKWARD_PROGRAMS_PER_SM = 4
_INTERPRET_BACKWARD_PROGRAMS = 3

try:
    import triton
    import triton.language as tl

    from .triton_rounding import FIX_BF16, INTERPRET, round_to
except ImportError:  # pragma: no cover - triton is a Linux dependency of the package
    triton = None
    INTERPRET = False


def rms_normalize(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama/Qwen2/Mistral RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))`` computed in fp32, in x's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(dtype)).to(dtype)


def split_rms_norm_torch(x: Tensor, w: Tensor, w_up: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``[x0 ; x1]`` with each slice normalised by its own statistics (widths from the weights)."""
    if w_up.numel() == 0:
        return rms_normalize(x, w, eps)
    x0, x1 = x.split([w.numel(), w_up.numel()], dim=-1)
    return torch.cat([rms_normalize(x0, w, eps), rms_normalize(x1, w_up, eps)], dim=-1)


if triton is not None:

    @triton.jit
    def _normalize(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        n = round_to(x * rstd, y_ptr.dtype.element_ty, FIX_BF16).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, round_to(w * n, y_ptr.dtype.element_ty, FIX_BF16), mask=ok)
        tl.store(rstd_ptr, rstd)

    @triton.jit
    def _forward_kernel(
        x_ptr,
        stride_x,
        w_ptr,
        w_up_ptr,
        y_ptr,
        stride_y,
        rstd_ptr,
        D,
        E,
        eps,
        BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr,
        HAS_UP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row, y_row = x_ptr + row * stride_x, y_ptr + row * stride_y
        _normalize(x_row, w_ptr, y_row, rstd_ptr + 2 * row, D, eps, BLOCK_D)
        if HAS_UP:
            _normalize(x_row + D, w_up_ptr, y_row + D, rstd_ptr + 2 * row + 1, E, eps, BLOCK_E)

    @triton.jit
    def _slice_backward(x_ptr, dy_ptr, w_ptr, dx_ptr, rstd, N, BLOCK: tl.constexpr):
        """Writes ``dx`` of one slice; returns ``dy * n`` (n rounded as in forward) for the weight gradient."""
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        n = x * rstd
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, 0) / N))
        tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty, FIX_BF16), mask=ok)
        return dy * round_to(n, x_ptr.dtype.element_ty, FIX_BF16).to(tl.float32)

    @triton.jit
    def _backward_kernel(
        x_ptr,
        stride_x,
        dy_ptr,
        stride_dy,
        w_ptr,
        w_up_ptr,
        rstd_ptr,
        dx_ptr,
        stride_dx,
        dw_up_ptr,
        M,
        D,
        E,
        BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr,
        HAS_UP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        dw_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for row in range(pid, M, programs):
            r64 = row + tl.zeros([], dtype=tl.int64)  # 64-bit offsets (row is a plain int when interpreted)
            x_row, dy_row, dx_row = x_ptr + r64 * stride_x, dy_ptr + r64 * stride_dy, dx_ptr + r64 * stride_dx
            _slice_backward(x_row, dy_row, w_ptr, dx_row, tl.load(rstd_ptr + 2 * r64), D, BLOCK_D)
            if HAS_UP:
                rstd_up = tl.load(rstd_ptr + 2 * r64 + 1)
                dw_acc += _slice_backward(x_row + D, dy_row + D, w_up_ptr, dx_row + D, rstd_up, E, BLOCK_E)
        if HAS_UP:
            offs = tl.arange(0, BLOCK_E)
            tl.store(dw_up_ptr + pid.to(tl.int64) * E + offs, dw_acc, mask=offs < E)


def _block(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _rows(t: Tensor, width: int) -> Tensor:
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(x: Tensor, w: Tensor, w_up: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x (M, d + e)`` (unit column stride) -> ``(y (M, d + e) in x's dtype, rstd (M, 2) fp32)``."""
    m, d, e = x.shape[0], w.numel(), w_up.numel()
    y = torch.empty(m, d + e, dtype=x.dtype, device=x.device)
    rstd = torch.empty(m, 2, dtype=torch.float32, device=x.device)
    if m:
        _forward_kernel[(m,)](
            x,
            x.stride(0),
            w,
            w_up,
            y,
            y.stride(0),
            rstd,
            d,
            e,
            eps,
            BLOCK_D=_block(d),
            BLOCK_E=_block(e),
            HAS_UP=e > 0,
            num_warps=_warps(d + e),
        )
    return y, rstd


def _warps(width: int) -> int:
    return 1 if INTERPRET else min(16, max(1, width // 512))


def backward_programs(rows: int, device: torch.device) -> int:
    """How many programs share the rows in the backward kernel (each keeps one dw_up partial)."""
    if device.type != "cuda":
        return max(1, min(rows, _INTERPRET_BACKWARD_PROGRAMS))
    from .triton_upscaled_linear import device_facts  # cached per device; that module loads on first GPU use

    return max(1, min(rows, device_facts(device.index).num_sms * _BACKWARD_PROGRAMS_PER_SM))


def backward(dy: Tensor, x: Tensor, w: Tensor, w_up: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx (M, d + e) in x's dtype, dw_up (e,) fp32)``; ``dw`` is never computed."""
    m, d, e = x.shape[0], w.numel(), w_up.numel()
    dx = torch.empty_like(x)
    programs = backward_programs(m, x.device)
    partial = torch.zeros(programs, e, dtype=torch.float32, device=x.device)
    if m:
        _backward_kernel[(programs,)](
            x,
            x.stride(0),
            dy,
            dy.stride(0),
            w,
            w_up,
            rstd,
            dx,
            dx.stride(0),
            partial,
            m,
            d,
            e,
            BLOCK_D=_block(d),
            BLOCK_E=_block(e),
            HAS_UP=e > 0,
            num_warps=_warps(d + e),
        )
    return dx, partial.sum(0)


class SplitRMSNormFunction(torch.autograd.Function):
    """Autograd of the fused split RMSNorm: saves ``x`` and the two fp32 ``rstd`` per row."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, w_up: Tensor, eps: float) -> Tensor:
        shape = x.shape
        x2 = _rows(x, shape[-1])
        y, rstd = forward(x2, w, w_up, eps)
        ctx.save_for_backward(x2, w, w_up, rstd)
        return y.reshape(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x2, w, w_up, rstd = ctx.saved_tensors
        dx, dw_up = backward(_rows(dy, x2.shape[-1]), x2, w, w_up, rstd)
        dx = dx.reshape(dy.shape) if ctx.needs_input_grad[0] else None
        dw_up = dw_up.to(w_up.dtype) if ctx.needs_input_grad[2] else None
        return dx, None, dw_up, None


def split_rms_norm(x: Tensor, w: Tensor, w_up: Tensor, eps: float) -> Tensor:
    """The fused split RMSNorm (Triton). ``x (..., d + e)``, frozen ``w (d,)``, trainable ``w_up (e,)``.

    Raises ValueError naming the argument for a trainable ``w``, mismatched widths or devices, a non-finite or
    negative ``eps``; callers that cannot use the kernels (the ``triton`` backend unavailable here, see
    :func:`scale_kernels.backends.unavailable_reason`, or a slice wider than :data:`MAX_WIDTH`) use
    :func:`split_rms_norm_torch`.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    for name, t in (("weight", w), ("weight_up", w_up)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if w.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): the fused split RMSNorm never computes dweight")
    if x.shape[-1] != w.numel() + w_up.numel():
        raise ValueError(f"x must have shape (..., d + e) = (..., {w.numel()} + {w_up.numel()}), got {tuple(x.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return SplitRMSNormFunction.apply(x, w, w_up, float(eps))
