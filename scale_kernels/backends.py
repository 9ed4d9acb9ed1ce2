"""Choosing the kernel backend: ``torch`` (reference / CPU), ``triton`` (fused), ``cuda`` (compiled extension).

Priority: the ``backend=`` argument, then :func:`use_backend`, then the ``SCALE_KERNELS_BACKEND`` env var,
then the automatic choice (CUDA tensors -> ``triton``, else ``cuda`` if built, else ``torch``; CPU tensors ->
``torch``). :func:`last_backend` reports which backend ran the most recent call.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Protocol

import torch

BACKEND_NAMES = ("torch", "triton", "cuda")
ENV_VAR = "SCALE_KERNELS_BACKEND"

_MODULES = {
    "torch": "scale_kernels.ops.torch_upscaled_linear",
    "triton": "scale_kernels.ops.triton_upscaled_linear",
    "cuda": "scale_kernels.ops.cuda_upscaled_linear",
}
_forced: list[str] = []
_last: list[str | None] = [None]


class KernelBackend(Protocol):
    """What a backend module provides (2-D token-major tensors; ``route`` is ``(M,)`` float or None)."""

    name: str

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if the backend can run on this device/dtype, else a human-readable reason."""

    def forward(self, x, w, w21, w22, w12, bias, bias_up, route) -> torch.Tensor:
        """``(M, d_in + e_in) -> (M, d_out + e_out)``."""

    def backward_input(self, dy, x, w, w21, w22, w12, route, need_droute: bool):
        """Returns ``(dx (M, d_in + e_in), droute (M,) or None)``."""

    def backward_weight(self, dy, x, route, d_in, d_out, need_w21, need_w22, need_w12):
        """Returns ``(dw21, dw22, dw12)``, each None when not needed. Never computes dW."""


def _load(name: str) -> ModuleType | str:
    """The backend module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # triton not installed, extension not built
        return f"{name} backend cannot be imported: {exc}"


def get_backend(name: str) -> KernelBackend:
    """The backend module for ``name`` (raises ValueError if unknown or not importable)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or 'auto', got {name!r}")
    mod = _load(name)
    if isinstance(mod, str):
        raise ValueError(mod)
    return mod  # type: ignore[return-value]


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``name`` can run tensors of this device and dtype, else why not."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or 'auto'"
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    return mod.unavailable_reason(device, dtype)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """Map each backend name to None (usable for this device/dtype) or the reason it is not."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, dtype) for name in BACKEND_NAMES}


def _requested(backend: str | None) -> str:
    if backend is not None:
        return backend
    if _forced:
        return _forced[-1]
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the backend name for a call; raise ValueError if a forced backend cannot run it.

    Evaluated once at trace time under ``torch.compile`` (the choice is a constant of the graph).
    """
    requested = _requested(backend)
    if requested == "auto":
        candidates = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        for name in candidates:
            if unavailable_reason(name, device, dtype) is None:
                return name
        return "torch"
    reason = unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise ValueError(f"upscaled_linear: backend {requested!r} cannot run this call: {reason}")
    return requested


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``) inside a ``with`` block."""
    if name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or 'auto', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def last_backend() -> str | None:
    """Name of the backend that ran the most recent ``upscaled_linear`` forward (None before any call)."""
    return _last[0]


def record_backend(name: str) -> None:
    _last[0] = name
