"""Argument checks for :func:`scale_kernels.upscaled_linear`.

Every check runs before any kernel is launched and raises a ``ValueError`` / ``TypeError`` that names
the offending argument and what was expected, so a user never sees a Triton compile error or a silent
wrong answer.

The checks depend only on the call's *signature* (per tensor: type, layout, shape, dtype, device,
requires_grad; plus the grad mode), so a signature that passed once is remembered and later calls with it
skip them (a bounded cache; never under ``torch.compile``, which traces the checks once anyway). The opt-in
finite-value check reads values and runs on every call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch

_OP = "upscaled_linear"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHECK_FINITE_ENV_VAR = "SCALE_KERNELS_CHECK_FINITE"
_check_finite: ContextVar[bool | None] = ContextVar("scale_kernels_check_finite", default=None)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_SIGNATURE_CACHE_SIZE = 1024
_checked: dict[tuple, CheckedCall] = {}


@contextlib.contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``upscaled_linear`` also rejects non-finite *configuration* values with a ValueError
    before any kernel runs: NaN/inf in ``w``, ``w21``, ``w22``, ``w12``, ``bias``, ``bias_up`` or a float
    ``route`` gate (a NaN gate makes every original output of its token NaN). ``x`` is never checked: NaN/inf
    in activations propagate like in PyTorch.

    Off by default: the check reads tensor values, which costs a host-device sync per call on a GPU. Also
    enabled by the environment variable ``SCALE_KERNELS_CHECK_FINITE=1``. Skipped inside ``torch.compile``
    (a data-dependent branch would break the graph).
    """
    token = _check_finite.set(enabled)
    try:
        yield
    finally:
        _check_finite.reset(token)


def finite_checks_enabled() -> bool:
    """Whether :func:`check_finite` (or ``SCALE_KERNELS_CHECK_FINITE=1``) is in force."""
    enabled = _check_finite.get()
    if enabled is not None:
        return enabled
    return os.environ.get(CHECK_FINITE_ENV_VAR, "0").strip() not in ("", "0")


def _check_values_finite(named: list[tuple[str, torch.Tensor | None]]) -> None:
    for name, t in named:
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"{_OP}: {name} has {bad} non-finite (NaN/inf) value(s) of {t.numel()}; every output that reads "
                f"them would be NaN/inf (check_finite is enabled)"
            )


class BlockSizes(NamedTuple):
    """Widths of the 2x2 block matrix ``[[W, W12], [W21, W22]]``."""

    d_in: int
    e_in: int
    d_out: int
    e_out: int


class CheckedCall(NamedTuple):
    """A validated call: its block widths, whether it needs any gradient (grad mode on and x, W21, W22,
    bias_up, or W12 / the route gate of a W12 term requires grad), and whether every argument is a plain
    ``torch.Tensor`` / ``nn.Parameter`` (not a subclass such as FakeTensor or DTensor)."""

    sizes: BlockSizes
    needs_grad: bool
    plain_tensors: bool


def check_tensor(name: str, t: object, ndim: int | None = None, op: str = _OP) -> torch.Tensor:
    """``t`` itself if it is a dense tensor (of ``ndim`` dimensions when given); else TypeError / ValueError
    naming ``op`` and the argument ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; use .to_dense()")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_route_dtype(route: torch.Tensor, op: str = _OP) -> None:
    """TypeError naming ``op`` unless ``route`` is a bool mask or a floating-point gate."""
    if not (route.dtype == torch.bool or route.dtype.is_floating_point):
        raise TypeError(
            f"{op}: route must be a bool mask or a floating-point gate, got {route.dtype}; "
            f"use route.bool() for a 0/1 integer mask"
        )


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{_OP}: {name} must have shape {meaning} = {expected}, got {tuple(t.shape)}")


def _signature(tensors: tuple) -> tuple | None:
    """Everything the shape/dtype/device/grad checks read, or None when an argument is not a plain tensor
    (such a call is always checked in full)."""
    parts: list = [torch.is_grad_enabled()]
    for t in tensors:
        if t is None:
            parts.append(None)
        elif type(t) in _PLAIN_TYPES:
            parts.append((t.shape, t.dtype, t.device, t.layout, t.requires_grad))
        else:
            return None
    return tuple(parts)


def check_upscaled_linear_args(
    x: torch.Tensor,
    w: torch.Tensor,
    w21: torch.Tensor,
    w22: torch.Tensor,
    w12: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_up: torch.Tensor | None,
    route: torch.Tensor | None,
) -> CheckedCall:
    """Validate the arguments of ``upscaled_linear``; returns the block sizes and whether a gradient is needed.

    Shapes: ``x (..., d_in + e_in)``, ``w (d_out, d_in)``, ``w21 (e_out, d_in)``, ``w22 (e_out, e_in)``,
    ``w12 (d_out, e_in) | None``, ``bias (d_out,) | None``, ``bias_up (e_out,) | None``,
    ``route x.shape[:-1] | None`` (bool or floating point).
    """
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _signature((x, w, w21, w22, w12, bias, bias_up, route))
    checked = _checked.get(key) if key is not None else None
    if checked is None:
        sizes = _check_signature(x, w, w21, w22, w12, bias, bias_up, route)
        grads = (x, w21, w22, w12, bias_up, route if w12 is not None else None)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads)
        checked = CheckedCall(sizes, needs_grad, key is not None)
        if key is not None:
            if len(_checked) >= _SIGNATURE_CACHE_SIZE:
                _checked.clear()
            _checked[key] = checked
    if not compiling and finite_checks_enabled():
        _check_values_finite([("w", w), ("w21", w21), ("w22", w22), ("w12", w12), ("bias", bias),
                              ("bias_up", bias_up), ("route", route)])  # fmt: skip
    return checked


def _check_signature(x, w, w21, w22, w12, bias, bias_up, route) -> BlockSizes:
    """Every check that depends only on the call's signature (see :func:`_signature`)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least 1 dimension (..., d_in + e_in), got a 0-D tensor")
    check_tensor("w", w, 2)
    check_tensor("w21", w21, 2)
    check_tensor("w22", w22, 2)
    d_out, d_in = w.shape
    e_out = w21.shape[0]
    e_in = x.shape[-1] - d_in
    if e_in < 0:
        raise ValueError(
            f"{_OP}: x's last dim ({x.shape[-1]}) is smaller than w's input width d_in={d_in}; "
            f"x must have shape (..., d_in + e_in)"
        )
    _check_shape("w21", w21, (e_out, d_in), f"(e_out, d_in) with d_in={d_in} from w")
    _check_shape("w22", w22, (e_out, e_in), f"(e_out, e_in) with e_out={e_out} from w21, e_in=x.shape[-1]-d_in")
    if w12 is not None:
        check_tensor("w12", w12, 2)
        _check_shape("w12", w12, (d_out, e_in), f"(d_out, e_in) with d_out={d_out} from w, e_in={e_in}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        _check_shape("bias", bias, (d_out,), "(d_out,)")
    if bias_up is not None:
        check_tensor("bias_up", bias_up, 1)
        _check_shape("bias_up", bias_up, (e_out,), "(e_out,)")

    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    named = [("w", w), ("w21", w21), ("w22", w22), ("w12", w12), ("bias", bias), ("bias_up", bias_up)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} must be on x's device {x.device}, got {t.device}")
    for name, t in (("w", w), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{_OP}: {name} requires grad, but it is the frozen pretrained {name} and never gets a "
                f"gradient; call {name}.requires_grad_(False) or pass {name}.detach()"
            )

    if route is not None:
        check_tensor("route", route)
        if tuple(route.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"{_OP}: route must have x's leading shape {tuple(x.shape[:-1])} (one value per token), "
                f"got {tuple(route.shape)}"
            )
        check_route_dtype(route)
        if route.device != x.device:
            raise ValueError(f"{_OP}: route must be on x's device {x.device}, got {route.device}")
    return BlockSizes(d_in=d_in, e_in=e_in, d_out=d_out, e_out=e_out)
