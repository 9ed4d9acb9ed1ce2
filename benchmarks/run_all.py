"""One command for the whole benchmark: layer + model results (JSON), PNG plots and a Markdown report.

    python -m benchmarks.run_all                       # GPU: writes benchmarks/results/<gpu-name>/
    python -m benchmarks.run_all --smoke               # CPU smoke: writes benchmarks/results/cpu-smoke/

Writes ``layer.json``, ``model.json``, ``layer_*.png``, ``model.png`` and ``results.md`` (all tables and the
targets as met / not met / not evaluated) into ``--out``. ``--layer-args`` / ``--model-args`` pass
extra options to ``benchmarks.bench_layer`` / ``benchmarks.bench_model``
(e.g. ``--model-args "--seq-len 4096"``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import bench_layer, bench_model, cli, report
from .results import default_out_dir, report_failures, save
from .schema import load_json


def build_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("python -m benchmarks.run_all", __doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of everything (checks, not speed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/<device>)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--append", action="store_true", help="merge into the results already in --out")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--layer-args", default="", help="extra bench_layer options, one quoted string")
    parser.add_argument("--model-args", default="", help="extra bench_model options, one quoted string")
    return parser


def _script_argv(args: argparse.Namespace, extra: str) -> list[str]:
    argv = ["--smoke"] if args.smoke else []
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    if args.backends:
        argv += ["--backends", *args.backends]
    return argv + shlex.split(extra)


def _plot(json_path: Path) -> list[Path]:
    """PNGs for one results file; without matplotlib, say so and go on (plot later with benchmarks.plot)."""
    try:
        from . import plot
    except ImportError as exc:
        print(
            f"[run_all] no plots ({exc}); pip install matplotlib, then python -m benchmarks.plot {json_path}",
            file=sys.stderr,
        )
        return []
    return plot.plot_file(json_path)


def run(args: argparse.Namespace) -> Path:
    """Run the selected benchmarks, write every output into the results folder and return it.

    ``results.md`` covers every ``layer.json`` / ``model.json`` in the folder (each with its own header), so
    a run done in chunks with ``--append`` ends with one complete report.
    """
    jobs = [
        (name, mod, extra)
        for name, mod, extra, skip in (
            ("layer", bench_layer, args.layer_args, args.skip_layer),
            ("model", bench_model, args.model_args, args.skip_model),
        )
        if not skip
    ]
    if not jobs:
        raise SystemExit("nothing to run: both --skip-layer and --skip-model given")
    out_dir = args.out
    for name, mod, extra in jobs:
        payload = mod.run(mod.build_parser().parse_args(_script_argv(args, extra)))
        out_dir = Path(out_dir or default_out_dir(payload["env"], args.smoke))
        json_path = save(payload, out_dir / f"{name}.json", args.append)
        pngs = _plot(json_path)
        report_failures(load_json(json_path), f"[run_all] {name}:")
        print(f"[run_all] wrote {json_path} and {len(pngs)} plot(s)", file=sys.stderr)
    md, lines = report.write_report(out_dir)
    for line in lines:
        print(f"[run_all] {line}")
    print(f"[run_all] wrote {md}", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
