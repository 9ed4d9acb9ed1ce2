"""Timing and peak memory of a callable.

On CUDA: ``triton.testing.do_bench`` (warm-up, L2 flush between runs, gradients reset to None, quantiles
0.5 / 0.2 / 0.8), or CUDA events with the same flush when do_bench is off or triton is missing. On CPU:
``time.perf_counter`` around each run (the smoke mode runs each case once, untimed warm-up skipped).
Peak memory is ``torch.cuda.max_memory_allocated`` during one run; it is not measured on CPU (None).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)
_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Median and 20th / 80th percentile of the run times, in milliseconds; ``runs`` is None for do_bench."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int | None

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        if not samples_ms:
            raise ValueError("from_samples needs at least one sample")
        q = torch.quantile(torch.tensor(samples_ms, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
        median, p20, p80 = (float(v) for v in q)
        return cls(median, p20, p80, len(samples_ms))


@dataclass(frozen=True)
class TimerConfig:
    """``warmup`` / ``iters``: untimed and timed runs of the event and CPU timers; do_bench works in ms."""

    warmup: int = 3
    iters: int = 20
    use_do_bench: bool = True
    do_bench_warmup_ms: int = 25
    do_bench_rep_ms: int = 100

    def method(self, device: torch.device) -> str:
        """``"do_bench"``, ``"cuda_events"`` or ``"perf_counter"``: what :func:`measure` uses here."""
        if device.type != "cuda":
            return "perf_counter"
        if self.use_do_bench and _do_bench() is not None:
            return "do_bench"
        return "cuda_events"


SMOKE_TIMER = TimerConfig(warmup=0, iters=1, use_do_bench=False)


def _do_bench():
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def measure(
    fn: Callable[[], object],
    device: torch.device,
    config: TimerConfig,
    grad_to_none: Iterable[torch.Tensor] = (),
) -> Timing:
    """Time ``fn`` on ``device``; the ``.grad`` of each tensor in ``grad_to_none`` is reset before a run."""
    grad_to_none = list(grad_to_none)
    method = config.method(device)
    if method == "do_bench":
        median, p20, p80 = _do_bench()(
            fn,
            warmup=config.do_bench_warmup_ms,
            rep=config.do_bench_rep_ms,
            grad_to_none=grad_to_none or None,
            quantiles=list(QUANTILES),
        )
        return Timing(float(median), float(p20), float(p80), None)
    for _ in range(config.warmup):
        _reset_grads(grad_to_none)
        fn()
    if method == "cuda_events":
        return Timing.from_samples(_cuda_event_samples(fn, config.iters, grad_to_none))
    samples = []
    for _ in range(config.iters):
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(samples)


def _cuda_event_samples(fn: Callable[[], object], iters: int, grad_to_none: list[torch.Tensor]) -> list[float]:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in events:
        _reset_grads(grad_to_none)
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device, grad_to_none: Iterable[torch.Tensor] = ()
) -> float | None:
    """``torch.cuda.max_memory_allocated`` (MiB) during one run of ``fn``; None off CUDA (not measured)."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next peak-memory reading starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
