"""Markdown tables of results files (what the README and ``run_all`` show).

python -m benchmarks.report benchmarks/results/<device>/   # rewrite results.md, print every target
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import targets


def _fmt(value: float | str | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else f"{value:.{digits}g}"


def _case_label(case: dict | None) -> str:
    if not case:
        return "-"
    if "tokens" in case:
        return f"{case['mode']} T={case['tokens']} d={case['d']} e={case['e']}"
    ckpt = "ckpt on" if case.get("gradient_checkpointing") else "ckpt off"
    shape = f"{case['shape']} " if "shape" in case else ""
    return f"{shape}{case.get('mode', '')} B={case.get('batch_size')} S={case.get('seq_len')} {ckpt}".strip()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _header(payload: dict) -> list[str]:
    env, settings = payload["env"], payload["settings"]
    title = f"## {payload['kind']} benchmark"
    lines = [title, ""]
    if payload["smoke"]:
        lines += [f"> **{payload['label']}.**", ""]
    lines.append(
        f"Device: **{env['device_name']}**; dtype {settings.get('dtype')}; timer {settings.get('timer')}; "
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; commit {str(env.get('git_commit'))[:10]}; {env['timestamp_utc']}."
    )
    skipped = settings.get("skipped_backends") or {}
    if skipped:
        lines.append("Backends not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".")
    return lines + [""]


def _cell(rec: dict) -> str:
    if rec["status"] != "ok":
        return rec["status"].split(":")[0]
    thr = ""
    if "tflops" in rec:
        thr = f", {rec['tflops']:.3g} TF/s"
    elif "tokens_per_s" in rec:
        thr = f", {rec['tokens_per_s']:.4g} tok/s"
    mem = "" if rec.get("peak_mem_mb") is None else f", {rec['peak_mem_mb']:.0f} MiB"
    ran = f" [ran {rec['ran_backend']}]" if rec["impl"].endswith("[auto]") and rec.get("ran_backend") else ""
    return f"{rec['median_ms']:.3g} ms ({rec['p20_ms']:.3g}-{rec['p80_ms']:.3g}){thr}{mem}{ran}"


def _records_tables(payload: dict) -> list[str]:
    lines = []
    impls = list(dict.fromkeys(r["impl"] for r in payload["records"]))
    for pass_name in dict.fromkeys(r["pass"] for r in payload["records"]):
        recs = [r for r in payload["records"] if r["pass"] == pass_name]
        cases = list(dict.fromkeys(json.dumps(r["case"], sort_keys=True) for r in recs))
        by_key = {(json.dumps(r["case"], sort_keys=True), r["impl"]): r for r in recs}
        rows = [
            [_case_label(json.loads(c))] + [_cell(by_key[(c, i)]) if (c, i) in by_key else "-" for i in impls]
            for c in cases
        ]
        lines += [f"### {pass_name}: median (p20-p80)", ""] + _table(["case", *impls], rows) + [""]
    return lines


def _comparison_table(payload: dict) -> list[str]:
    comps = payload["comparisons"]
    if not comps:
        return ["No package-vs-baseline comparisons (no package record and baseline record both ok).", ""]
    rows = [
        [
            c["pass"],
            _case_label(c["case"]),
            c["impl"],
            c["baseline"],
            _fmt(c["speedup"]),
            _fmt(c["throughput_ratio"]),
            _fmt(c["mem_ratio"]),
        ]
        for c in comps
    ]
    header = ["pass", "case", "impl", "baseline", "speedup", "throughput ratio", "memory ratio"]
    return ["### ratios against each baseline (speedup > 1: package faster)", ""] + _table(header, rows) + [""]


def targets_table(rows: list[dict]) -> list[str]:
    """The targets: one line per evaluated (case, pass) of ``scale_kernels[auto]``."""
    body = [
        [
            f"{t['id']} (#{t.get('issue', '?')})",
            t.get("impl") or "-",
            _case_label(t.get("case")) + (f" {t['pass']}" if t.get("pass") else ""),
            _fmt(t.get("value")),
            f"{t['op']} {t['threshold']}",
            t["status"] + ("" if t.get("on_target_hardware") else " (not H100 bf16)"),
            t.get("reason", ""),
        ]
        for t in rows
    ]
    return _table(["target", "impl", "case", "value", "needs", "status", "note"], body) + [""]


def render(payload: dict) -> str:
    """Markdown of one results file: header, timings per pass, ratios, targets."""
    lines = _header(payload) + _records_tables(payload) + _comparison_table(payload)
    lines += ["### targets", ""] + targets_table(payload["targets"])
    return "\n".join(lines)


def render_all(payloads: list[dict]) -> str:
    """One Markdown document for several results files (e.g. layer + model of one run)."""
    parts = ["# scale_kernels benchmark results", ""]
    if any(p["smoke"] for p in payloads):
        parts += [
            "**These include CPU smoke runs: tiny shapes run once; they check the scripts and are not "
            "performance numbers.**",
            "",
        ]
    return "\n".join(parts + [render(p) for p in payloads])


def write_report(folder: Path) -> tuple[Path, list[str]]:
    """Rewrite ``folder/results.md`` from the results files there; returns it and the target summary lines."""
    payloads = targets.folder_payloads(folder)
    md = folder / "results.md"
    md.write_text(render_all(payloads) + "\n")
    return md, targets.summary_lines(payloads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("folder", type=Path, help="a results folder (layer.json / model.json / host.json)")
    md, lines = write_report(parser.parse_args(argv).folder)
    print("\n".join(lines))
    print(f"[report] wrote {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
