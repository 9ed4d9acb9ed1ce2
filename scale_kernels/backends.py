"""Choosing the kernel backend of each call: ``torch`` (cuBLAS-composed, the floor and the CPU path),
``triton`` (fused), ``cuda`` (compiled extension).

Priority: the ``backend=`` argument, then :func:`use_backend`, then the ``SCALE_KERNELS_BACKEND`` env var,
then the automatic choice. A forced backend that cannot run the call is a ValueError.

The automatic choice is made per call shape (:class:`CallSignature`: device, dtype, token-count bucket, the four
widths, W12 / route present, forward-only or training). On a CUDA device with a measured dispatch table
(:mod:`scale_kernels.dispatch_table`, written by ``python -m scale_kernels.tune``) a fused backend is chosen
only where the table says it is at least :data:`MIN_SPEEDUP` times faster than the composed ``torch`` path, in
every nearest measured entry, and only if it is usable here. Everything else (no table, shape not measured,
CPU tensors, fp64) runs the composed path: without measurements the only evidence (issue 11, H100) is that the
fused Triton kernels lost to it almost everywhere. :func:`explain_dispatch` says which backend a call gets and
why; :func:`last_backend` says which one ran. The forward and backward of one call always use the backend
chosen at its forward.

State (the forced backend, the last backend) lives in context variables: threads and asyncio tasks each see
their own. Under ``torch.compile`` the choice is made once at trace time and is a constant of the graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from types import ModuleType
from typing import NamedTuple, Protocol

import torch

from . import dispatch_table

BACKEND_NAMES = ("torch", "triton", "cuda")
FUSED_BACKENDS = ("triton", "cuda")
BASELINE_BACKEND = "torch"
ENV_VAR = "SCALE_KERNELS_BACKEND"
MIN_SPEEDUP = 1.02  # a fused backend must beat the composed path by 2% in the table (timing noise margin)
ANY_SIZE = dispatch_table.ANY  # a width / token count unknown when the choice is made (torch.compile)

_MODULES = {
    "torch": "scale_kernels.ops.torch_upscaled_linear",
    "triton": "scale_kernels.ops.triton_upscaled_linear",
    "cuda": "scale_kernels.ops.cuda_upscaled_linear",
}
_forced: ContextVar[str | None] = ContextVar("scale_kernels_forced_backend", default=None)
_last: ContextVar[str | None] = ContextVar("scale_kernels_last_backend", default=None)


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


class CallSignature(NamedTuple):
    """What the automatic choice depends on. ``tokens`` is the token-count bucket (:func:`token_bucket`);
    ``train`` is True when the call needs a gradient (the table's ``"train"`` pass), else ``"forward"``.
    Sizes are :data:`ANY_SIZE` for a choice made at ``torch.compile`` trace time."""

    device: torch.device
    dtype: torch.dtype
    tokens: int
    d_in: int
    e_in: int
    d_out: int
    e_out: int
    has_w12: bool
    has_route: bool
    train: bool


class DispatchDecision(NamedTuple):
    """The backend a call gets, and why.

    ``source``: ``"argument"``, ``"use_backend"``, ``"env"`` (forced), ``"table"`` (measured) or
    ``"heuristic"``; ``measured`` holds the table entries the choice was made from (empty otherwise).
    """

    backend: str
    source: str
    reason: str
    signature: CallSignature
    measured: tuple[dispatch_table.Measurement, ...] = ()

    def __str__(self) -> str:
        lines = [f"backend {self.backend!r} ({self.source}): {self.reason}"]
        for m in self.measured:
            times = ", ".join(f"{b} {ms:.4g} ms" for b, ms in sorted(m.ms.items(), key=lambda kv: kv[1]))
            lines.append(f"  measured at T={m.tokens}: {times}  [{m.table}]")
        return "\n".join(lines)


def token_bucket(tokens: int) -> int:
    """The power of two >= ``tokens`` (0 and 1 stay): calls of similar size share one decision."""
    return tokens if tokens <= 1 else 1 << (tokens - 1).bit_length()


def place_gradients(computed: Iterable[torch.Tensor], needs: Iterable[bool]) -> tuple[torch.Tensor | None, ...]:
    """One slot per entry of ``needs``: the ``computed`` gradients (those needed, in order), None elsewhere."""
    computed = iter(computed)
    return tuple(next(computed) if need else None for need in needs)


def _load(name: str) -> ModuleType | str:
    """The backend module, or the reason it cannot be imported."""
    path = _MODULES[name]
    module = sys.modules.get(path)
    if module is not None:
        return module
    try:
        return importlib.import_module(path)
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


def check_backend_name(name: str) -> None:
    """ValueError unless ``name`` is a backend name or ``"auto"``."""
    if name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or 'auto', got {name!r}")


def requested_backend(backend: str | None = None) -> tuple[str, str]:
    """``(name, source)`` of the backend asked for: the argument, :func:`use_backend`, the env var or auto."""
    if backend is not None:
        return backend, "argument"
    forced = _forced.get()
    if forced is not None:
        return forced, "use_backend"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return (env, "env") if env and env != "auto" else ("auto", "auto")


@functools.lru_cache(maxsize=4096)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _table_decision(sig: CallSignature) -> DispatchDecision | None:
    """The measured choice for ``sig``, or None when no table entry covers it."""
    key = dispatch_table.EntryKey(
        dispatch_table.dtype_name(sig.dtype),
        sig.d_in,
        sig.e_in,
        sig.d_out,
        sig.e_out,
        sig.has_w12,
        sig.has_route,
        "train" if sig.train else "forward",
    )
    measured = tuple(dispatch_table.lookup(_device_name(sig.device), key, sig.tokens))
    if not measured:
        return None
    if any(BASELINE_BACKEND not in m.ms for m in measured):
        reason = f"the table has no time for the {BASELINE_BACKEND!r} baseline here: nothing to compare against"
        return DispatchDecision(BASELINE_BACKEND, "table", reason, sig, measured)
    faster = {}
    for name in FUSED_BACKENDS:
        if unavailable_reason(name, sig.device, sig.dtype) is not None:
            continue
        ratios = [m.ms[BASELINE_BACKEND] / m.ms[name] for m in measured if name in m.ms]
        if len(ratios) == len(measured) and min(ratios) >= MIN_SPEEDUP:
            faster[name] = min(ratios)
    if not faster:
        reason = (
            f"measured: no usable fused backend is >= {MIN_SPEEDUP}x faster than the composed "
            f"{BASELINE_BACKEND!r} path in every matching entry"
        )
        return DispatchDecision(BASELINE_BACKEND, "table", reason, sig, measured)
    best = max(faster, key=faster.get)
    reason = f"measured: {best!r} is {faster[best]:.2f}x faster than the composed {BASELINE_BACKEND!r} path"
    return DispatchDecision(best, "table", reason, sig, measured)


def _heuristic(sig: CallSignature) -> DispatchDecision:
    if sig.device.type != "cuda":
        reason = f"{sig.device.type} tensors: the composed path is the only non-CUDA backend"
    elif sig.dtype == torch.float64:
        reason = "float64: only the composed path supports it"
    else:
        name = _device_name(sig.device)
        tables, notes = dispatch_table.tables_for(name)
        where = "no dispatch table for this shape" if tables else "no dispatch table"
        reason = (
            f"{where} on {name!r} with torch/triton {tuple(dispatch_table.software_key().values())}: the composed "
            "cuBLAS path is the default (measure with `python -m scale_kernels.tune`)"
        )
        if notes:
            reason += "; skipped tables: " + "; ".join(notes)
    return DispatchDecision(BASELINE_BACKEND, "heuristic", reason, sig)


@functools.lru_cache(maxsize=4096)
def _auto_decision(sig: CallSignature) -> DispatchDecision:
    table = None
    if sig.device.type == "cuda" and sig.dtype != torch.float64:
        table = _table_decision(sig)
    return table or _heuristic(sig)


def decide(backend: str | None, sig: CallSignature) -> DispatchDecision:
    """The backend for a call of signature ``sig``; ValueError if a forced backend cannot run it."""
    requested, source = requested_backend(backend)
    if requested == "auto":
        return _auto_decision(sig)
    reason = unavailable_reason(requested, sig.device, sig.dtype)
    if reason is not None:
        raise ValueError(f"upscaled_linear: backend {requested!r} cannot run this call: {reason}")
    return DispatchDecision(requested, source, f"forced by {source}", sig)


@torch.compiler.assume_constant_result
def resolve_backend(
    backend: str | None, device: torch.device, dtype: torch.dtype, has_w12: bool, has_route: bool, train: bool
) -> str:
    """The backend under ``torch.compile``: evaluated once at trace time, a constant of the graph.

    Sizes may be symbolic there (dynamic shapes), and a traced graph must not depend on them, so the widths and
    the token count are wildcards (:data:`ANY_SIZE`): a fused backend is chosen only if the table shows it
    faster in every entry with this dtype and these mode flags.
    """
    sig = CallSignature(device, dtype, ANY_SIZE, ANY_SIZE, ANY_SIZE, ANY_SIZE, ANY_SIZE, has_w12, has_route, train)
    return decide(backend, sig).backend


def reload_dispatch_tables() -> None:
    """Re-read the dispatch tables and forget every cached automatic choice."""
    dispatch_table.reload()
    _auto_decision.cache_clear()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``) inside a ``with`` block (this thread /
    task only). Inside a ``torch.compile``-d function pass ``backend=`` instead: the choice is made at trace time."""
    check_backend_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def last_backend() -> str | None:
    """Name of the backend that ran the most recent ``upscaled_linear`` forward in this thread / task (None
    before any call)."""
    return _last.get()


def record_backend(name: str | None) -> None:
    _last.set(name)
