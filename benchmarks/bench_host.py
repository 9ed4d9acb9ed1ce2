"""Host-overhead benchmark (CPU): the package op vs the hand-written eager layer where per-call host work matters.

    python -m benchmarks.bench_host                 # M=16, d=256, e=64, every mode -> results/cpu-host/host.json
    python -m benchmarks.bench_host --smoke         # a few rounds (checks the script, not a measurement)

At decode size the GEMMs are small, so the figure is dominated by what each call costs on the host
(validation, backend choice, autograd bookkeeping, op launches). Implementations: ``scale_kernels[auto]``
(what users get; on CPU the composed ``torch`` backend) and ``handwritten``; passes ``forward`` (under
``torch.no_grad``) and ``train_step`` (forward + backward, gradients reset to None before each call).

The CPU may be shared, so the measurement is made robust rather than long: every round times each
(case, pass, implementation) once for ``--calls`` back-to-back calls, the (case, pass) groups in a shuffled
order and the package and the hand-written layer of a group back to back (in random order), and the result is
the median over ``--rounds`` rounds (p20 / p80 kept). Interleaving puts the package and the baseline under the
same load; the load average before and after the run is recorded in ``settings`` so a reader can judge it.
The figure is ``paired_time_ratio``: the median over rounds of package time / hand-written time measured
back to back in that round (target: <= 1.2); ``time_ratio`` (ratio of the medians) is kept too.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

from scale_kernels.backends import last_backend, record_backend

from . import cli
from .bench_layer import pass_fn
from .cases import MODES, LayerCase
from .impls import HANDWRITTEN, build_workload
from .results import RESULTS_ROOT, comparisons, default_out_dir, new_results, save, timing_fields
from .schema import package_impl
from .targets import evaluate
from .timing import Timing

AUTO = package_impl("auto")
PASSES = ("forward", "train_step")


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("python -m benchmarks.bench_host", __doc__)
    parser.add_argument("--smoke", action="store_true", help="3 rounds of 5 calls: checks the script only")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="d (d_in = d_out)")
    parser.add_argument("--extra", type=int, default=64, help="e (e_in = e_out)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 51)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed batch (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: results/cpu-host/host.json)")
    return parser


def _timed(fn, grads: list[torch.Tensor], calls: int) -> float:
    """Milliseconds per call over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        for t in grads:
            t.grad = None
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def run(args: argparse.Namespace) -> dict:
    """Measure; returns the finalized results object (not written)."""
    rounds = args.rounds or (3 if args.smoke else 51)
    calls = args.calls or (5 if args.smoke else 50)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    cases = [LayerCase(args.tokens, args.hidden, args.extra, mode) for mode in args.modes]
    jobs = []  # (case, pass, impl, fn, grads, backend that ran)
    for case in cases:
        for impl in (AUTO, HANDWRITTEN):
            workload = build_workload(impl, case, device, dtype)
            for pass_name in PASSES:
                record_backend(None)
                fn = pass_fn(workload, pass_name)
                fn()  # warm-up: first-call work (validation cache, dispatch cache, allocator) is not timed
                jobs.append((case, pass_name, impl, fn, workload.trainable(), last_backend()))
    load_before = _load()
    samples: list[list[float]] = [[] for _ in jobs]
    pairs: dict[tuple, list[int]] = {}  # (case, pass) -> the indices of its package and hand-written jobs
    for i, (case, pass_name, *_rest) in enumerate(jobs):
        pairs.setdefault((case, pass_name), []).append(i)
    groups = list(pairs.values())
    rng = random.Random(args.seed)
    for r in range(rounds):
        rng.shuffle(groups)
        for group in groups:  # the two implementations of a (case, pass) back to back: the same load
            for i in rng.sample(group, len(group)):
                fn, grads = jobs[i][3:5]
                samples[i].append(_timed(fn, grads, calls))
        print(f"[bench_host] round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    settings = {
        "dtype": "float32",
        "timer": "perf_counter, interleaved rounds",
        "rounds": rounds,
        "calls_per_sample": calls,
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": _load(),
    }
    payload = new_results("host", args.smoke, device, settings)
    for (case, pass_name, impl, _, _, ran), times in zip(jobs, samples):
        rec = {"case": case.as_dict(), "pass": pass_name, "impl": impl, "flops": case.flops(pass_name)}
        rec.update(timing_fields(Timing.from_samples(times), None), samples_ms=times)
        if impl == AUTO:
            rec["ran_backend"] = ran
        payload["records"].append(rec)
    payload["comparisons"] = comparisons(payload["records"])
    for comp in payload["comparisons"]:
        comp.update(_paired_ratio(payload["records"], comp))
    payload["targets"] = evaluate(payload)
    return payload


def _paired_ratio(records: list[dict], comp: dict) -> dict:
    """Median (p20, p80) over rounds of package time / baseline time measured back to back in that round: under
    bursty load both sides of a pair see the same load, so this is steadier than the ratio of the medians."""
    times = {r["impl"]: r["samples_ms"] for r in records if r["case"] == comp["case"] and r["pass"] == comp["pass"]}
    ratios = [a / b for a, b in zip(times[comp["impl"]], times[comp["baseline"]])]
    q = Timing.from_samples(ratios)
    return {"paired_time_ratio": q.median_ms, "paired_time_ratio_p20": q.p20_ms, "paired_time_ratio_p80": q.p80_ms}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    payload = run(args)
    default = default_out_dir(payload["env"], True) if args.smoke else RESULTS_ROOT / "cpu-host"
    out = args.out or default / "host.json"
    print(f"[bench_host] wrote {save(payload, out)}", file=sys.stderr)
    for comp in payload["comparisons"]:
        ratio, p20, p80 = comp["paired_time_ratio"], comp["paired_time_ratio_p20"], comp["paired_time_ratio_p80"]
        where = f"{comp['case']['mode']:8s} {comp['pass']:10s}"
        print(f"[bench_host] {where} package/hand-written = {ratio:.2f} (p20-p80 {p20:.2f}-{p80:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
