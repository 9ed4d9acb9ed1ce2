"""``python -m scale_kernels.tune``: measure which backend is fastest per call shape on this GPU and write the
dispatch table that the automatic backend choice reads (format and search path: :mod:`scale_kernels.dispatch_table`).

    python -m scale_kernels.tune                                  # default grid, at most 5 minutes
    python -m scale_kernels.tune --shape 4096,1024,4096,1024 --tokens 1 16 4096 16384 --time-budget 60
    python -m scale_kernels.tune --out table.json                 # somewhere else (then point
                                                                  #   SCALE_KERNELS_DISPATCH_TABLES at it)

For every shape ``d_in,e_in,d_out,e_out``, token count, mode (``preserve``: no W12; ``adapt``: W12;
``route``: W12 gated by a 50% bool mask) and pass (``forward`` under ``torch.no_grad``; ``train``: forward +
backward with x, W21, W22 and W12 trainable) it times every usable backend (median of
``triton.testing.do_bench`` on CUDA, gradients reset between runs; the first, autotuning call is not timed).
The table is rewritten after every entry, so a run stopped by ``--time-budget`` (or Ctrl-C) leaves a valid,
partial table (``"complete": false``); the most important entries come first (shapes in the given order, then
token counts from large to small). ``python -m scale_kernels.tune --help`` lists every option.

From Python, :func:`shapes_of` collects the shapes of a model's ``ScaleLinear`` layers for ``--shape``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import backends, dispatch_table
from .dispatch_table import DTYPES
from .functional import upscaled_linear

DEFAULT_SHAPES = ((4096, 1024, 4096, 1024), (2048, 512, 2048, 512))
DEFAULT_TOKENS = (16384, 4096, 1024, 256, 64, 16, 4, 1)  # powers of 4: every M is within a factor 2 of one
MODES = ("preserve", "adapt", "route")


def shapes_of(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """The distinct ``(d_in, e_in, d_out, e_out)`` of the ``ScaleLinear`` layers in ``model`` (in model order)."""
    from .modules import ScaleLinear

    shapes = [
        (m.in_features, m.extra_in, m.out_features, m.extra_out) for m in model.modules() if isinstance(m, ScaleLinear)
    ]
    return list(dict.fromkeys(shapes))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _call(
    shape: tuple[int, int, int, int], tokens: int, mode: str, train: bool, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[str], None], list[torch.Tensor]]:
    """A function running one call on a backend (by name), and the tensors whose gradients it fills."""
    d_in, e_in, d_out, e_out = shape
    torch.manual_seed(0)

    def rnd(*size: int, grad: bool = False) -> torch.Tensor:
        return (torch.randn(*size, device=device) / max(size[-1], 1) ** 0.5).to(dtype).requires_grad_(grad)

    x = rnd(tokens, d_in + e_in, grad=train)
    w, w21, w22 = rnd(d_out, d_in), rnd(e_out, d_in, grad=train), rnd(e_out, e_in, grad=train)
    w12 = rnd(d_out, e_in, grad=train) if mode != "preserve" else None
    route = (torch.rand(tokens, device=device) < 0.5) if mode == "route" else None
    dy = rnd(tokens, d_out + e_out)
    grads = [t for t in (x, w21, w22, w12) if t is not None and train]

    def run(backend: str) -> None:
        if train:
            upscaled_linear(x, w, w21, w22, w12, route=route, backend=backend).backward(dy)
        else:
            with torch.no_grad():
                upscaled_linear(x, w, w21, w22, w12, route=route, backend=backend)

    return run, grads


def _timer(device: torch.device, rep_ms: int) -> tuple[str, Callable]:
    """``(name, time(fn, grads) -> median ms)``: do_bench on CUDA (CUDA events without triton), else a CPU clock."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return "cuda_events", lambda fn, grads: _event_median(fn, grads)

        def bench(fn, grads):
            return float(do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, grad_to_none=grads, quantiles=[0.5])[0])

        return "do_bench", bench
    return "perf_counter", lambda fn, grads: _cpu_median(fn, grads)


def _reset(grads: list[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def _event_median(fn, grads, iters: int = 20) -> float:
    times = []
    for _ in range(iters):
        _reset(grads)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(torch.tensor(times).median())


def _cpu_median(fn, grads, iters: int = 5) -> float:
    times = []
    for _ in range(iters):
        _reset(grads)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(torch.tensor(times).median())


def _grid(shapes, tokens, modes, passes) -> list[tuple]:
    return [(s, t, m, p) for s in shapes for t in sorted(tokens, reverse=True) for m in modes for p in passes]


def tune(
    shapes: Iterable[tuple[int, int, int, int]] = DEFAULT_SHAPES,
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    modes: Iterable[str] = MODES,
    passes: Iterable[str] = dispatch_table.PASSES,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    backend_names: Iterable[str] | None = None,
    out: Path | None = None,
    time_budget_s: float = 300.0,
    rep_ms: int = 50,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> Path:
    """Measure and write a dispatch table; returns its path. See the module docstring for what is measured."""
    device = torch.device(device)
    reasons = backends.available_backends(device, dtype)
    names = [n for n in (backend_names or backends.BACKEND_NAMES) if n in reasons]
    usable = [n for n in names if reasons[n] is None]
    skipped = {n: reasons[n] for n in names if n not in usable}
    if backends.BASELINE_BACKEND not in usable:
        raise ValueError(f"the {backends.BASELINE_BACKEND!r} baseline must be measured (backends: {names})")
    timer_name, timer = _timer(device, rep_ms)
    name = _device_name(device)
    table = dispatch_table.new_table(name, timer_name)
    if out is None:
        folder = dispatch_table.search_paths()[0]
        out = folder / dispatch_table.default_file_name(name) if folder.suffix != ".json" else folder
    grid = _grid(list(shapes), list(tokens), list(modes), list(passes))
    log(f"[tune] {name}, {dispatch_table.dtype_name(dtype)}, backends {usable} (not usable: {skipped or 'none'})")
    log(f"[tune] {len(grid)} entries, time budget {time_budget_s:.0f} s, writing {out}")
    start = time.monotonic()
    for i, (shape, t, mode, pass_name) in enumerate(grid):
        if time.monotonic() - start > time_budget_s:
            log(f"[tune] time budget spent after {i}/{len(grid)} entries: the table is partial")
            break
        run, grads = _call(shape, t, mode, pass_name == "train", device, dtype)
        ms, failed = {}, {}
        for backend in usable:
            try:
                run(backend)  # first call: autotuning / compilation, not timed
                ms[backend] = timer(functools.partial(run, backend), grads)
            except Exception as exc:  # a backend that fails a shape is recorded, never timed
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                failed[backend] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        key = dispatch_table.EntryKey(
            dispatch_table.dtype_name(dtype), *shape, mode != "preserve", mode == "route", pass_name
        )
        table["entries"].append(dispatch_table.entry(key, t, ms, failed))
        dispatch_table.write(table, out)
        done = i + 1
        eta = (time.monotonic() - start) / done * (len(grid) - done)
        times = ", ".join(f"{b} {v:.4g} ms" for b, v in ms.items()) + "".join(f", {b} failed" for b in failed)
        log(f"[tune] {done}/{len(grid)} {shape} T={t} {mode} {pass_name}: {times} (~{eta:.0f} s left)")
    table["complete"] = len(table["entries"]) == len(grid)
    dispatch_table.write(table, out)
    backends.reload_dispatch_tables()
    log(f"[tune] wrote {out} ({len(table['entries'])} entries); the automatic backend choice now reads it")
    return Path(out)


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is d_in,e_in,d_out,e_out (four integers), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scale_kernels.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=_shape, action="append", help="d_in,e_in,d_out,e_out (repeatable)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="token counts M")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--passes", nargs="+", choices=dispatch_table.PASSES, default=list(dispatch_table.PASSES))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the command only)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (float32 on CPU)")
    parser.add_argument("--backends", nargs="+", choices=backends.BACKEND_NAMES, default=None)
    parser.add_argument("--out", type=Path, default=None, help="table file (default: the user table folder)")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds; stops with a partial table")
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench measuring time per backend and entry")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune: CUDA is not available (the table is per GPU); use --device cpu to check the command")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    tune(
        args.shape or DEFAULT_SHAPES,
        args.tokens,
        modes=args.modes,
        passes=args.passes,
        device=device,
        dtype=dtype,
        backend_names=args.backends,
        out=args.out,
        time_budget_s=args.time_budget,
        rep_ms=args.rep_ms,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
