"""Shared test helpers: random upscaled-linear operands and the reference tolerance rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import scale_kernels as sk
from scale_kernels.reference import error_limit


@dataclass
class Operands:
    x: torch.Tensor
    w: torch.Tensor
    w21: torch.Tensor
    w22: torch.Tensor
    w12: torch.Tensor | None
    bias: torch.Tensor | None
    bias_up: torch.Tensor | None
    route: torch.Tensor | None

    def args(self) -> tuple:
        return (self.x, self.w, self.w21, self.w22, self.w12, self.bias, self.bias_up, self.route)

    def to(self, dtype: torch.dtype) -> Operands:
        """Detached copies in ``dtype`` with the same requires_grad flags (route keeps a bool dtype)."""

        def conv(t):
            if t is None:
                return None
            out = t.detach().to(dtype if t.is_floating_point() else t.dtype)
            return out.requires_grad_(t.requires_grad)

        return Operands(*(conv(t) for t in self.args()))

    def differentiable(self) -> list[tuple[str, torch.Tensor]]:
        names = ("x", "w", "w21", "w22", "w12", "bias", "bias_up", "route")
        return [(n, t) for n, t in zip(names, self.args()) if t is not None and t.requires_grad]


def make_operands(
    lead: tuple[int, ...] = (37,),
    d_in: int = 45,
    e_in: int = 19,
    d_out: int = 53,
    e_out: int = 11,
    *,
    w12: str = "trainable",
    bias: bool = True,
    route: str = "none",
    device: str = "cpu",
    seed: int = 0,
) -> Operands:
    """fp64 operands. ``w12``: none/frozen/trainable/zeros (zero-initialised and trainable, the SCALE-Adapt
    init); ``route``: none/zeros/ones/random/soft."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)
        return t.requires_grad_(grad)

    x = rnd(*lead, d_in + e_in)
    w = rnd(d_out, d_in, scale=d_in**-0.5, grad=False)
    w21 = rnd(e_out, d_in, scale=d_in**-0.5)
    w22 = rnd(e_out, e_in, scale=max(e_in, 1) ** -0.5)
    w12_t = None
    if w12 != "none":
        w12_t = rnd(d_out, e_in, scale=max(e_in, 1) ** -0.5, grad=w12 in ("trainable", "zeros"))
        if w12 == "zeros":
            w12_t = torch.zeros_like(w12_t).requires_grad_(True)
    b = rnd(d_out, grad=False) if bias else None
    bu = rnd(e_out) if bias else None
    r = None
    if route == "zeros":
        r = torch.zeros(lead, dtype=torch.bool, device=device)
    elif route == "ones":
        r = torch.ones(lead, dtype=torch.bool, device=device)
    elif route == "random":
        r = (torch.rand(lead, generator=g) < 0.5).to(device)
    elif route == "soft":
        r = torch.rand(lead, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    return Operands(x, w, w21, w22, w12_t, b, bu, r)


def run(ops: Operands, fn, dy: torch.Tensor) -> list[torch.Tensor]:
    """Output and the gradients of every differentiable operand for upstream gradient ``dy``."""
    y = fn(*ops.args())
    diff = [t for _, t in ops.differentiable()]
    # y need not require grad: a soft route is unused without W12, so it can be the only "differentiable" input
    grads = torch.autograd.grad(y, diff, dy.to(y.dtype), allow_unused=True) if y.requires_grad else [None] * len(diff)
    return [y.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, diff)]


def assert_matches_reference(
    ops: Operands, dtype: torch.dtype, backend: str, seed: int = 1, layout: str = "contiguous"
) -> None:
    """Kernel in ``dtype`` vs fp64 reference, forward and every gradient.

    ``layout`` (see :func:`make_non_contiguous`) is applied to the kernel's operands after the dtype cast (a
    cast makes a sliced tensor contiguous again).

    Tolerance rule (flash-attention's idiom): the kernel's max error against the fp64 reference must be at
    most twice the error of plain PyTorch in the same dtype, plus a floor of a few ulps of the output's
    scale (plain PyTorch can be exact, e.g. a bias gradient that sums few terms).
    """
    ref = run(ops, sk.upscaled_linear_reference, _dy(ops, seed))
    plain = run(ops.to(dtype), sk.upscaled_linear_reference, _dy(ops, seed))
    kernel_ops = make_non_contiguous(ops.to(dtype), layout)
    kernel = run(kernel_ops, lambda *a: sk.upscaled_linear(*a, backend=backend), _dy(ops, seed))
    assert sk.last_backend() == backend
    names = ["y"] + [n for n, _ in ops.differentiable()]
    for name, r, p, k in zip(names, ref, plain, kernel):
        assert k.dtype == p.dtype and k.shape == r.shape, (name, k.dtype, p.dtype, k.shape, r.shape)
        # droute = <x_up, dy0 W12> (one product cheaper than PyTorch's <dy0, x_up W12^T>): an inf in x_up
        # gives +-inf where PyTorch sums +inf and -inf to NaN, so only its finite/non-finite pattern is exact
        assert_within_reference_tolerance(name, k, r, p, exact_non_finite_kind=name != "route")


def assert_within_reference_tolerance(
    name: str, kernel: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, exact_non_finite_kind: bool = True
) -> None:
    """The tolerance rule of :func:`assert_matches_reference` for one tensor.

    Non-finite values must sit exactly where the fp64 reference has them, with the same kind (NaN, +inf,
    -inf) if ``exact_non_finite_kind``: a NaN or inf in the input propagates like in PyTorch, it is never
    zeroed by masking. The finite entries obey the error rule (``plain`` is plain PyTorch in the kernel's dtype).
    """
    kinds = (torch.isnan, torch.isposinf, torch.isneginf) if exact_non_finite_kind else (torch.isfinite,)
    for kind in kinds:
        mismatch = kind(kernel) != kind(ref)
        where = mismatch.nonzero()[:5].tolist()
        assert not mismatch.any(), f"{name}: {kind.__name__} pattern differs from the reference at {where}"
    finite = torch.isfinite(ref)
    r, p, k = ref[finite], plain[finite].double(), kernel[finite].double()
    if not r.numel():
        return
    err = (k - r).abs().max().item()
    limit = error_limit(r, p, kernel.dtype)
    msg = f"{name}: kernel err {err:.3e} > limit {limit:.3e} (2 x torch-{kernel.dtype} err + 8 ulps)"
    assert err <= limit, msg


def _dy(ops: Operands, seed: int) -> torch.Tensor:
    d_out, e_out = ops.w.shape[0], ops.w21.shape[0]
    g = torch.Generator().manual_seed(seed)
    shape = (*ops.x.shape[:-1], d_out + e_out)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(ops.x.device)


def triton_usable(device: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    return sk.available_backends(device, dtype)["triton"] is None


TRITON_KERNELS = ("_forward_kernel", "_backward_input_kernel", "_backward_weight_kernel")  # the jit functions


def triton_module():
    """``scale_kernels.ops.triton_upscaled_linear``, imported on first use (the import needs triton)."""
    from scale_kernels.ops import triton_upscaled_linear as mod

    return mod


def record_calls(monkeypatch, name: str) -> list[tuple[tuple, object]]:
    """Record ``(args, result)`` of each call of the Triton backend module's function ``name``."""
    mod = triton_module()
    calls = []
    real = getattr(mod, name)

    def spy(*args):
        result = real(*args)
        calls.append((args, result))
        return result

    monkeypatch.setattr(mod, name, spy)
    return calls


def make_non_contiguous(ops: Operands, kind: str) -> Operands:
    """Same values, non-contiguous storage. ``kind``: ``"contiguous"`` (unchanged), ``"sliced"`` (x is a column
    slice of a wider tensor), ``"transposed"`` (x's two leading dims transposed, needs a 2-D lead; route too) or
    ``"weights_t"`` (w, w21, w22, w12 are transposed views of (in, out) tensors). requires_grad flags are kept."""

    def rebuild(t: torch.Tensor | None, view) -> torch.Tensor | None:
        if t is None:
            return None
        return view(t.detach()).requires_grad_(t.requires_grad)

    def sliced(t):
        pad = t.new_full((*t.shape[:-1], 3), float("nan"))  # a read outside the slice shows up as NaN
        wide = torch.cat([pad, t], dim=-1)
        return wide[..., 3:]

    def transposed(t):
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    def weight_t(t):
        return t.t().contiguous().t()

    out = Operands(*ops.args())
    if kind == "sliced":
        out.x = rebuild(ops.x, sliced)
    elif kind == "transposed":
        out.x = rebuild(ops.x, transposed)
        out.route = rebuild(ops.route, transposed)
    elif kind == "weights_t":
        for name in ("w", "w21", "w22", "w12"):
            setattr(out, name, rebuild(getattr(ops, name), weight_t))
    elif kind != "contiguous":
        raise ValueError(f"unknown non-contiguity kind {kind!r}")
    return out
