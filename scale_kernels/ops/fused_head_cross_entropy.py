"""Fused upscaled LM head + cross-entropy: the loss and its gradients without materialising the logits.

Math, per token ``t`` with ``x_t = [x0_t ; x1_t]`` (widths ``d`` and ``e``) and route gate ``r_t``::

    z_t   = W x0_t + r_t * (W_up x1_t) + b                 (vocab,)  frozen W, b; trainable W_up
    l_t   = logsumexp(z_t) - z_t[y_t]                       (0 where y_t == ignore_index)
    loss  = sum_t l_t * s                                   s = 1 / #non-ignored ("mean") or 1 ("sum")
    dz_t  = s * (softmax(z_t) - onehot(y_t))                (0 where ignored)
    g_t   = dz_t W_up                                       (e,)
    dx0_t = dz_t W      dx1_t = r_t * g_t      dr_t = <g_t, x1_t>      dW_up = sum_t dz_t^T (r_t x1_t)

``dW`` and ``db`` are never computed (W, b are frozen; W may be the tied input embedding). As in
Liger-Kernel's FusedLinearCrossEntropy (the anchor), the tokens are processed in chunks and the gradients are
computed in the forward, where the chunk's logits exist anyway: one ``(chunk, vocab)`` buffer holds a chunk's
logits, then (in place) their gradient, and is reused for every chunk. Backward only scales the stored
gradients by the upstream gradient. ``dW_up`` accumulates in fp32 across chunks; ``dx`` rows are each produced
by one GEMM (fp32 accumulation inside) and stored in x's dtype.

The GEMMs are vendor GEMMs (``torch.mm``/``addmm``: cuBLAS on CUDA). The per-row cross-entropy (online
logsumexp over vocab blocks, then the in-place gradient) is a Triton kernel (``triton`` backend; CPU tensors
under ``TRITON_INTERPRET=1``) or plain PyTorch on the chunk (``torch`` backend, any device).
"""

from __future__ import annotations

import math

import torch

from .. import validation
from .selection import triton_or_torch

Tensor = torch.Tensor

_OP = "fused_head_cross_entropy"
REDUCTIONS = ("mean", "sum")

try:
    import triton
    import triton.language as tl

    from .triton_rounding import FIX_BF16, INTERPRET, round_to
except ImportError:  # pragma: no cover - triton is a Linux dependency of the package
    triton = None
    INTERPRET = False

# widest vocab block one program reads at a time (Liger's MAX_FUSED_SIZE is the same order); small under the
# interpreter so that CPU tests cover the multi-block online logsumexp
MAX_BLOCK_V = 64 if INTERPRET else 32768
_WARPS = 32

if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,
        stride_row,
        labels_ptr,
        loss_ptr,
        scale_ptr,
        V,
        ignore_index,
        HAS_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: ``loss[row] = logsumexp(z) - z[label]``; with HAS_GRAD the row of logits is
        overwritten by ``scale * (softmax(z) - onehot(label))`` (zeros for an ignored row)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        offs = tl.arange(0, BLOCK_V)
        if label == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if HAS_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    zero = tl.zeros([BLOCK_V], dtype=tl.float32)
                    tl.store(row_ptr + cols, zero.to(logits_ptr.dtype.element_ty), mask=cols < V)
            return
        # pass 1: online max / sum of exponentials over the vocab blocks
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        z_label = tl.load(row_ptr + label).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_label)
        if HAS_GRAD:
            # pass 2: the gradient of the row, in place
            scale = tl.load(scale_ptr)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                grad = tl.exp(z - lse) * scale
                grad = tl.where(cols == label, grad - scale, grad)
                tl.store(row_ptr + cols, round_to(grad, logits_ptr.dtype.element_ty, FIX_BF16), mask=cols < V)


def block_v(vocab: int) -> int:
    """Vocab block of the Triton kernel: the whole row when it fits, else ``MAX_BLOCK_V``."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def cross_entropy_rows_triton(
    logits: Tensor, labels: Tensor, loss: Tensor, scale: Tensor, ignore_index: int, need_grad: bool, block: int = 0
) -> None:
    """``logits (n, V)`` (unit column stride) -> ``loss (n,)`` fp32; the gradient overwrites ``logits`` when
    ``need_grad``. ``scale`` is a 0-d fp32 tensor (read on the device: no host sync)."""
    n, vocab = logits.shape
    if n == 0:
        return
    block = block or block_v(vocab)
    _cross_entropy_rows_kernel[(n,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        scale,
        vocab,
        ignore_index,
        HAS_GRAD=need_grad,
        BLOCK_V=block,
        num_warps=1 if INTERPRET else _WARPS,
    )


def cross_entropy_rows_torch(
    logits: Tensor, labels: Tensor, loss: Tensor, scale: Tensor, ignore_index: int, need_grad: bool
) -> None:
    """The same contract as :func:`cross_entropy_rows_triton` in plain PyTorch (fp32 math, fp64 for fp64)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    loss.copy_(torch.where(keep, lse - z.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse)))
    if need_grad:
        grad = torch.exp(z - lse[:, None]) * scale
        grad.scatter_add_(1, safe[:, None], (-scale).expand(labels.shape[0], 1).contiguous())
        logits.copy_(torch.where(keep[:, None], grad, 0.0))


_ROWS = {"torch": cross_entropy_rows_torch, "triton": cross_entropy_rows_triton}


def default_chunk_size(tokens: int, width: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk's logits hold about as many elements as the input ``(tokens, width)``
    (Liger's budget): ``next_pow2(ceil(tokens / ceil(vocab / width)))``, at most ``tokens``."""
    factor = max(1, math.ceil(vocab / max(width, 1)))
    chunk = 1 << max(0, math.ceil(tokens / factor) - 1).bit_length()
    return max(1, min(chunk, tokens))


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc (fp32) += a @ b`` with fp32 accumulation and no rounding of the partial product to a's dtype:
    cuBLAS ``addmm(out_dtype=fp32)`` on CUDA (torch >= 2.8), an fp32 GEMM of the upcast operands elsewhere."""
    if a.dtype != torch.float32 and acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # older torch or GPU without the mixed-dtype GEMM
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def head_loss_and_grads(
    x: Tensor,
    w: Tensor,
    w_up: Tensor | None,
    bias: Tensor | None,
    route: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    need: dict[str, bool],
    backend: str,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss and the gradients for an upstream gradient of 1: ``(loss, dx, dw_up, droute)``.

    ``x (N, d + e)``, ``w (V, d)``, ``w_up (V, e)`` or None, ``bias (V,)`` or None, ``route (N,)`` float or None,
    ``labels (N,)``; all floating operands in one compute dtype. ``need`` names the gradients to compute
    (keys ``x``, ``w_up``, ``route``); those not needed are None. ``loss``, ``dw_up`` and ``droute`` are fp32
    (fp64 for fp64 operands), ``dx`` is in x's dtype.
    """
    n, vocab, d = x.shape[0], w.shape[0], w.shape[1]
    any_grad = any(need.values())
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 accumulators (fp64 for an fp64 reference run)
    if reduction == "mean":
        count = (labels != ignore_index).sum(dtype=acc)
        scale = 1.0 / count  # inf when every label is ignored: the loss is 0 / 0 = nan, as in torch
    else:
        scale = torch.ones((), dtype=acc, device=x.device)
    loss_rows = torch.empty(n, dtype=acc, device=x.device)
    dx = torch.empty_like(x) if need["x"] else None
    dw_up = torch.zeros(w_up.shape, dtype=acc, device=x.device) if need["w_up"] else None
    droute = torch.empty(n, dtype=acc, device=x.device) if need["route"] else None
    chunk = chunk_size or default_chunk_size(n, x.shape[1], vocab)
    buffer = torch.empty(min(chunk, n), vocab, dtype=x.dtype, device=x.device)
    rows_fn = _ROWS[backend]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        z = buffer[: stop - start]
        x0 = x[start:stop, :d]
        torch.mm(x0, w.t(), out=z)
        x1r = None
        if w_up is not None:
            x1 = x[start:stop, d:]
            x1r = x1 if route is None else (x1.to(acc) * route[start:stop, None]).to(x.dtype)
            z.addmm_(x1r, w_up.t())
        if bias is not None:
            z.add_(bias)
        rows_fn(z, labels[start:stop], loss_rows[start:stop], scale, ignore_index, any_grad)
        if not any_grad:
            continue
        if need["x"]:
            dx[start:stop, :d] = z @ w
        if w_up is not None and (need["x"] or need["route"]):
            g = z @ w_up  # (chunk, e)
            if need["x"]:
                dx[start:stop, d:] = g if route is None else (g.to(acc) * route[start:stop, None]).to(x.dtype)
            if need["route"]:
                droute[start:stop] = (g.to(acc) * x[start:stop, d:].to(acc)).sum(-1)
        if need["w_up"]:
            _accumulate_fp32(dw_up, z.t(), x1r)
    loss = loss_rows.sum() / count if reduction == "mean" else loss_rows.sum()
    return loss, dx, dw_up, droute


class FusedHeadCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of :func:`head_loss_and_grads`: gradients computed in forward, scaled in backward.

    Inputs keep their own dtypes (e.g. an fp32 master ``w_up`` under autocast); the computation runs in
    ``compute_dtype`` and each gradient is returned in its input's dtype (``dw_up`` from its fp32 accumulator).
    """

    @staticmethod
    def forward(ctx, x, w, w_up, bias, route, labels, ignore_index, reduction, compute_dtype, backend, chunk_size):
        need = {
            "x": ctx.needs_input_grad[0],
            "w_up": w_up is not None and ctx.needs_input_grad[2],
            "route": route is not None and w_up is not None and ctx.needs_input_grad[4],
        }

        def cast(t):
            return None if t is None else t.detach().to(compute_dtype)

        r = None if route is None else route.detach().to(torch.promote_types(compute_dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):  # operands are cast to compute_dtype explicitly
            loss, dx, dw_up, droute = head_loss_and_grads(
                cast(x),
                cast(w),
                cast(w_up),
                cast(bias),
                r,
                labels,
                ignore_index,
                reduction,
                need,
                backend,
                chunk_size,
            )
        ctx.save_for_backward(dx, dw_up, droute)
        ctx.dtypes = (x.dtype, None if w_up is None else w_up.dtype, None if route is None else route.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dx, dw_up, droute = ctx.saved_tensors
        x_dtype, w_up_dtype, route_dtype = ctx.dtypes

        def scaled(g, dtype):
            if g is None:
                return None
            acc = torch.promote_types(g.dtype, torch.float32)
            return (g.to(acc) * grad_loss.to(acc)).to(dtype)

        return (
            scaled(dx, x_dtype),
            None,
            scaled(dw_up, w_up_dtype),
            None,
            scaled(droute, route_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_tensor(name: str, t: object, dims: int) -> Tensor:
    return validation.check_tensor(name, t, dims, op=_OP)


def check_head_loss_args(
    x: Tensor,
    w: Tensor,
    w_up: Tensor | None,
    bias: Tensor | None,
    route: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
    compute_dtype: torch.dtype,
) -> None:
    """ValueError / TypeError naming the argument for every malformed input (see :func:`fused_head_cross_entropy`)."""
    _check_tensor("x", x, 2)
    _check_tensor("w", w, 2)
    _check_tensor("labels", labels, 1)
    n, d = x.shape[0], w.shape[1]
    e = 0 if w_up is None else _check_tensor("w_up", w_up, 2).shape[1]
    if x.shape[1] != d + e:
        raise ValueError(
            f"x must have shape (tokens, d + e) = (tokens, {d} + {e}) for w {tuple(w.shape)} and w_up "
            f"{None if w_up is None else tuple(w_up.shape)}, got {tuple(x.shape)}"
        )
    if w_up is not None and w_up.shape[0] != w.shape[0]:
        raise ValueError(f"w_up must have shape (vocab, e) with vocab = {w.shape[0]}, got {tuple(w_up.shape)}")
    if bias is not None and tuple(_check_tensor("bias", bias, 1).shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one per token of x), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64/int32 tensor, got {labels.dtype}")
    if route is not None:
        _check_tensor("route", route, 1)
        if route.shape[0] != n:
            raise ValueError(f"route must have shape ({n},) (one per token of x), got {tuple(route.shape)}")
        validation.check_route_dtype(route, op=_OP)
    for name, t in (("w", w), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} must be frozen (requires_grad=False): the fused head never computes its gradient")
    for name, t in (("x", x), ("w", w), ("w_up", w_up), ("bias", bias), ("route", route), ("labels", labels)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all operands must share a device")
    if compute_dtype not in validation.SUPPORTED_DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    for name, t in (("w", w), ("w_up", w_up), ("bias", bias)):
        if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}: operands must share a dtype (or run under "
                "torch.autocast, which computes in the autocast dtype)"
            )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if n and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= w.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {w.shape[0]}) or equal ignore_index={ignore_index}; got e.g. "
                f"{labels[bad][:3].tolist()}"
            )


def fused_head_cross_entropy(
    x: Tensor,
    w: Tensor,
    labels: Tensor,
    w_up: Tensor | None = None,
    bias: Tensor | None = None,
    route: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of the upscaled LM head's logits ``W x0 + r * (W_up x1) + b`` without materialising them.

    Args:
        x: ``(tokens, d + e)`` hidden states ``[h ; h_up]`` (any leading dims are flattened by the caller).
        w: ``(vocab, d)`` frozen head weight (may be the tied embedding; must not require grad).
        labels: ``(tokens,)`` targets in ``[0, vocab)`` or ``ignore_index`` (already shifted: this op pairs
            ``x[t]`` with ``labels[t]``).
        w_up: ``(vocab, e)`` trainable ``W_head_up`` or None (the expansion term is skipped, e.g.
            ``original_stream``; then ``e = 0``).
        bias: ``(vocab,)`` frozen bias or None.
        route: ``(tokens,)`` bool mask / float gate multiplying the ``W_up`` term per token (None = 1); a float
            gate that requires grad gets a gradient.
        reduction: ``"mean"`` (over non-ignored tokens; nan when all are ignored, like torch) or ``"sum"``.
        chunk_size: tokens per chunk (default: :func:`default_chunk_size`).
        backend: as ``upscaled_linear``'s; see :func:`scale_kernels.ops.selection.triton_or_torch`.

    Returns the fp32 scalar loss. Gradients: ``x``, ``w_up`` and a float ``route`` (each in its own dtype); never
    ``w`` or ``bias``. Under ``torch.autocast`` the GEMMs run in the autocast dtype while ``w_up`` keeps its
    (e.g. fp32 master) dtype and gets an fp32-accumulated gradient.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = x.dtype if isinstance(x, Tensor) else None
    check_head_loss_args(x, w, w_up, bias, route, labels, ignore_index, reduction, chunk_size, compute_dtype)
    name = triton_or_torch(backend, x.device, compute_dtype)
    if w_up is None:
        route = None
    return FusedHeadCrossEntropy.apply(
        x, w, w_up, bias, route, labels, ignore_index, reduction, compute_dtype, name, chunk_size
    )
