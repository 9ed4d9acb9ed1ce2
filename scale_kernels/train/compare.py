"""Forgetting vs adaptation: run several methods on the same data budget and tabulate them.

Every method runs in its own subprocess (``python -m scale_kernels.train train --config ...``) so peak
memory is measured per method and one failing method does not stop the others. A method whose
``results.json`` already exists with the same configuration is reused, so an interrupted comparison
continues where it stopped. The base model is evaluated once (step 0 is the same function for every
method: all of them preserve the base model at initialisation; each run checks this and records the
max |delta logits|).

Outputs in ``out_dir``: ``<method>/`` (each run), ``comparison.json``, ``comparison.md``, ``comparison.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import DEFAULT_LR, TrainConfig

BASE = "base"


def _same_config(results_path: Path, cfg: TrainConfig) -> bool:
    if not results_path.is_file():
        return False
    try:
        return json.loads(results_path.read_text(encoding="utf-8"))["config"] == cfg.to_dict()
    except (ValueError, KeyError):
        return False


def run_one(cfg: TrainConfig, *, reuse: bool = True, subprocess_run: bool = True) -> dict[str, Any]:
    """Run one configuration (in a subprocess by default) and return its ``results.json`` content."""
    out = Path(cfg.output_dir)
    results_path = out / "results.json"
    if reuse and _same_config(results_path, cfg):
        print(f"[compare] {cfg.method}: reusing {results_path}", flush=True)
        return json.loads(results_path.read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    if subprocess_run:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "scale_kernels.train", "train", "--config", str(config_path)]
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"method {cfg.method!r} failed (exit {proc.returncode}); see the output above")
        return json.loads(results_path.read_text(encoding="utf-8"))
    from .trainer import run_training

    return run_training(cfg)


def run_compare(base_cfg: TrainConfig, methods: list[str], out_dir: str | Path, *, reuse: bool = True,
                subprocess_run: bool = True) -> dict[str, Any]:
    """Evaluate the base model, train every method of ``methods`` with ``base_cfg``'s budget, and write
    ``comparison.{json,md,png}`` into ``out_dir``. Returns the comparison dict."""
    out_dir = Path(out_dir)
    base_cfg = replace(base_cfg, resume=True).validate()
    base_run = replace(base_cfg, method="full", steps=0, eval_at_start=True, output_dir=str(out_dir / BASE))
    base = run_one(base_run,
                   reuse=reuse, subprocess_run=subprocess_run)
    runs: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for method in methods:
        cfg = replace(base_cfg, method=method, eval_at_start=False, output_dir=str(out_dir / method))
        try:
            runs[method] = run_one(cfg, reuse=reuse, subprocess_run=subprocess_run)
        except (RuntimeError, ValueError) as e:
            failures[method] = str(e)
            print(f"[compare] {method} failed: {e}", flush=True)
    comparison = summarize(base, runs, base_cfg)
    comparison["failures"] = failures
    write_reports(comparison, out_dir)
    return comparison


def _pct(after: float, before: float) -> float:
    return 100.0 * (after - before) / before


def summarize(base: dict[str, Any], runs: dict[str, dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """The comparison table (one row per method) plus the curves for the plot."""
    before = base["evals"][0]
    rows = []
    for method, r in runs.items():
        after = r["after"]
        rows.append({
            "method": method,
            "trainable_params": r["details"]["trainable_params"],
            "total_params": r["details"]["total_params"],
            "lr": r["config"]["lr"] if r["config"]["lr"] is not None else DEFAULT_LR[method],
            "old_ppl_before": before["old"]["ppl"], "old_ppl_after": after["old"]["ppl"],
            "forgetting_pct": _pct(after["old"]["ppl"], before["old"]["ppl"]),
            "new_ppl_before": before["new"]["ppl"], "new_ppl_after": after["new"]["ppl"],
            "adaptation_pct": _pct(after["new"]["ppl"], before["new"]["ppl"]),
            "init_max_abs_logit_diff": r["preservation"]["max_abs_logit_diff"],
            "peak_memory_mb": r["peak_memory_bytes"] / 2**20,
            "peak_memory_kind": r["peak_memory_kind"],
            "tokens_per_s": r["tokens_per_s"],
            "train_seconds": r["train_seconds"],
            "route_adapt_fraction_old": after["old"].get("route_adapt_fraction"),
            "route_adapt_fraction_new": after["new"].get("route_adapt_fraction"),
            "details": r["details"],
        })
    curves = {m: [{"step": 0, "old": before["old"]["ppl"], "new": before["new"]["ppl"]}]
              + [{"step": e["step"], "old": e["old"]["ppl"], "new": e["new"]["ppl"]} for e in r["evals"]]
              for m, r in runs.items()}
    losses = {m: [(x["step"], x["loss"]) for x in r["losses"]] for m, r in runs.items()}
    return {"budget": {k: cfg.to_dict()[k] for k in ("model", "steps", "batch_size", "grad_accum", "seq_len",
                                                       "eval_sequences", "train_data", "eval_old", "eval_new",
                                                       "width", "seed", "precision")},
            "base": {"old_ppl": before["old"]["ppl"], "new_ppl": before["new"]["ppl"],
                     "eval_tokens_old": before["old"]["tokens"], "eval_tokens_new": before["new"]["tokens"]},
            "rows": rows, "curves": curves, "losses": losses}


def markdown_table(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown table (perplexities; lower is better; + = worse)."""
    lines = [
        "| method | lr | trainable params | old-domain ppl before → after (forgetting) | "
        "new-domain ppl before → after (adaptation) | init max abs Δlogits | peak mem (MiB) | tokens/s |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in comparison["rows"]:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} "
            f"| {r['old_ppl_before']:.2f} → {r['old_ppl_after']:.2f} ({r['forgetting_pct']:+.1f}%) "
            f"| {r['new_ppl_before']:.2f} → {r['new_ppl_after']:.2f} ({r['adaptation_pct']:+.1f}%) "
            f"| {r['init_max_abs_logit_diff']:.2e} | {r['peak_memory_mb']:.0f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(comparison: dict[str, Any], out_dir: Path) -> None:
    """``comparison.json``, ``comparison.md`` and (with matplotlib) ``comparison.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2), encoding="utf-8")
    (out_dir / "comparison.md").write_text(markdown_table(comparison), encoding="utf-8")
    try:
        from .plots import plot_comparison
    except ImportError:
        print("[compare] matplotlib not installed: no plot (pip install matplotlib)", flush=True)
        return
    plot_comparison(comparison, out_dir / "comparison.png")
