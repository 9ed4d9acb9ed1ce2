"""Command-line options shared by the benchmark scripts (device, dtype, smoke mode, timer, output)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from scale_kernels.dispatch_table import DTYPES

from .timing import SMOKE_TIMER, TimerConfig


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: ``doc`` (its module docstring) as the description, verbatim."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, each case run once (CPU by default): checks the script, not speed",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cpu with --smoke, else cuda)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bfloat16 (the targets' dtype); float32 with --smoke",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="package backends to run (default: every backend available_backends() allows)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (event/CPU timers)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (event/CPU timers)")
    parser.add_argument("--no-do-bench", action="store_true", help="time with CUDA events instead of do_bench")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON path (default: benchmarks/results/<device>/<kind>.json)",
    )
    parser.add_argument(
        "--append", action="store_true", help="merge into the results file at --out (runs done in chunks)"
    )


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device to run on; asking for CUDA without one is an error (no silent fallback to CPU)."""
    name = args.device or ("cpu" if args.smoke else "cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run on a GPU, or use --smoke (CPU) / --device cpu")
    return device


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[args.dtype or ("float32" if args.smoke else "bfloat16")]


def resolve_timer(args: argparse.Namespace, warmup: int, iters: int) -> TimerConfig:
    """Smoke: each case once. Otherwise ``warmup``/``iters`` (overridable) and do_bench unless disabled."""
    base = SMOKE_TIMER if args.smoke else TimerConfig(warmup=warmup, iters=iters, use_do_bench=not args.no_do_bench)
    return TimerConfig(
        warmup=base.warmup if args.warmup is None else args.warmup,
        iters=base.iters if args.iters is None else args.iters,
        use_do_bench=base.use_do_bench and not args.no_do_bench,
        do_bench_warmup_ms=base.do_bench_warmup_ms,
        do_bench_rep_ms=base.do_bench_rep_ms,
    )


def timer_settings(timer: TimerConfig, device: torch.device) -> dict:
    return {
        "timer": timer.method(device),
        "warmup": timer.warmup,
        "iters": timer.iters,
        "do_bench_warmup_ms": timer.do_bench_warmup_ms,
        "do_bench_rep_ms": timer.do_bench_rep_ms,
    }


def main_for(
    kind: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], dict],
    argv: list[str] | None,
    run_writes_out: bool = False,
) -> int:
    """Entry point of a benchmark script: parse, run, save (``--out`` / ``--append``), list failures.

    ``run_writes_out``: given ``--out``, ``run`` has written that file itself (merged when ``--append``), so it
    is not written again."""
    from .results import default_out_dir, report_failures, save

    args = build_parser().parse_args(argv)
    payload = run(args)
    if run_writes_out and args.out:
        out = args.out
    else:
        out = save(payload, args.out or default_out_dir(payload["env"], args.smoke) / f"{kind}.json", args.append)
    print(f"[bench_{kind}] wrote {out}", file=sys.stderr)
    report_failures(payload, f"[bench_{kind}]")
    return 0
