"""Layer benchmark: forward / backward / train step of the upscaled linear against the baselines.

    python -m benchmarks.bench_layer                # the full grid (benchmarks.cases) on CUDA, bf16
    python -m benchmarks.bench_layer --smoke        # tiny CPU shapes, each case once

Implementations: ``scale_kernels[auto]`` (what users get: the automatic per-shape choice; each record says
which backend ran) and ``scale_kernels[<backend>]`` for every usable backend (``--backends`` narrows them,
``auto`` included), then the baselines. Passes: ``forward`` runs under ``torch.no_grad`` (inference / decode);
``backward`` replays the backward of one retained graph with a fixed upstream gradient; ``train_step`` is
forward + backward (no optimizer). The ``.grad`` of the parameters and of ``x`` is reset to None before each
timed run. With ``--out`` the results file is rewritten after every case, so a run stopped by a timeout keeps
the cases it finished.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from scale_kernels import backends as package_backends

from . import cli
from .cases import MODES, PASSES, LayerCase, layer_cases
from .impls import AUTO, BASELINES, HANDWRITTEN_COMPILED, Workload, build_workload, usable_backends
from .results import failure_status, finalize, merge_results, new_results, timing_fields
from .schema import impl_backend, load_json, package_impl, write_json
from .timing import TimerConfig, free_memory, measure, peak_memory_mb, synchronize


def pass_fn(workload: Workload, pass_name: str) -> Callable[[], object]:
    """A zero-argument callable running ``pass_name`` once on ``workload``."""
    module, x, route, dy = workload.module, workload.x, workload.route, workload.dy
    if pass_name == "forward":

        def forward() -> object:
            with torch.no_grad():
                return module(x, route)

        return forward
    if pass_name == "backward":
        y = module(x, route)
        return lambda: y.backward(dy, retain_graph=True)
    if pass_name == "train_step":
        return lambda: module(x, route).backward(dy)
    raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")


def measure_pass(
    impl: str, case: LayerCase, workload: Workload, pass_name: str, device: torch.device, timer: TimerConfig
) -> dict:
    """One record: timings, TFLOP/s and peak memory of ``pass_name``, or the failure status.

    A function of its own so that the pass's retained graph is freed on return, before the next pass's
    peak memory is measured.
    """
    rec = {"case": case.as_dict(), "pass": pass_name, "impl": impl, "flops": workload.flops(pass_name)}
    try:
        package_backends.record_backend(None)
        fn = pass_fn(workload, pass_name)
        timing = measure(fn, device, timer, grad_to_none=workload.trainable())
        peak = peak_memory_mb(fn, device, grad_to_none=workload.trainable())
        synchronize(device)
        rec.update(timing_fields(timing, peak), tflops=rec["flops"] / (timing.median_ms * 1e-3) / 1e12)
        if impl_backend(impl) is not None:  # which backend really ran (for auto: the per-shape choice)
            rec["ran_backend"] = package_backends.last_backend()
    except Exception as exc:  # a failed case is recorded, never dropped or turned into a number
        rec["status"] = failure_status(exc)
    return rec


def bench_workload(
    impl: str,
    case: LayerCase,
    workload: Workload,
    passes: tuple[str, ...],
    device: torch.device,
    timer: TimerConfig,
) -> list[dict]:
    """One record per pass that ``workload`` supports."""
    records = []
    for pass_name in (p for p in passes if p in workload.passes):
        records.append(measure_pass(impl, case, workload, pass_name, device, timer))
        free_memory(device)
    return records


def bench_case(
    case: LayerCase,
    impls: list[str],
    passes: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    timer: TimerConfig,
    compile_backend: str,
) -> list[dict]:
    """All implementations on one case, built and freed one at a time."""
    records = []
    for impl in impls:
        if impl == HANDWRITTEN_COMPILED:
            # a fresh compile per case: no silent fallback to eager once the recompile limit is hit
            torch._dynamo.reset()
        try:
            workload = build_workload(impl, case, device, dtype, compile_backend)
        except Exception as exc:
            records.append({"case": case.as_dict(), "pass": passes[0], "impl": impl, "status": failure_status(exc)})
            continue
        records.extend(bench_workload(impl, case, workload, passes, device, timer))
        del workload
        free_memory(device)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("python -m benchmarks.bench_layer", __doc__)
    cli.add_common_args(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts T (default: grid)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes d (e = d / 4)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the handwritten_compiled baseline",
    )
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns the finalized results object (not written)."""
    device, dtype = cli.resolve_device(args), cli.resolve_dtype(args)
    timer = cli.resolve_timer(args, warmup=3, iters=20)
    requested = args.backends or [AUTO, *package_backends.BACKEND_NAMES]
    backends = usable_backends(device, dtype, requested)
    impls = [package_impl(b) for b, reason in backends.items() if reason is None] + list(args.baselines)
    cases = layer_cases(
        args.smoke,
        tuple(args.tokens) if args.tokens else None,
        tuple(args.hidden) if args.hidden else None,
        tuple(args.modes) if args.modes else None,
    )
    settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "compile_backend": args.compile_backend,
        "impls": impls,
        "skipped_backends": {b: r for b, r in backends.items() if r is not None},
        "passes": list(args.passes),
        **cli.timer_settings(timer, device),
    }
    payload = new_results("layer", args.smoke, device, settings)
    earlier = load_json(args.out) if args.out and args.append and args.out.exists() else None
    for i, case in enumerate(cases):
        print(f"[bench_layer] {i + 1}/{len(cases)} {case.label}", file=sys.stderr, flush=True)
        payload["records"].extend(
            bench_case(case, impls, tuple(args.passes), device, dtype, timer, args.compile_backend)
        )
        if args.out:  # progress: a run stopped by a timeout keeps every finished case
            write_json(merge_results(earlier, payload) if earlier else finalize(payload), args.out)
    return finalize(payload)


def main(argv: list[str] | None = None) -> int:
    return cli.main_for("layer", build_parser, run, argv, run_writes_out=True)


if __name__ == "__main__":
    sys.exit(main())
