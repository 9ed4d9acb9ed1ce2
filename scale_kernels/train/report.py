"""Forgetting vs adaptation across a sweep: one entry per run, the Pareto front, the comparison at matched
new-domain perplexity, and a README whose words are generated from the numbers.

Definitions (all perplexities boundary-excluded, see :mod:`.evaluate`):

* forgetting = old-domain perplexity change in % (after vs the base model; up = forgetting),
  adaptation = new-domain perplexity change in % (down = adaptation).
* A point (a run, or an eval-only view of a run) is on the *Pareto front* when no other point has both a
  lower-or-equal old-domain and a lower-or-equal new-domain perplexity, one of them strictly lower.
* *Matched adaptation*: each variant's curve is its seed-averaged points, one per learning rate, sorted by
  new-domain perplexity. Its forgetting at a target new-domain perplexity ``T`` is interpolated linearly in
  ``log T`` between the two points that bracket ``T``; outside the curve's range there is no value (no
  extrapolation). Targets are the curve points of full fine-tuning and of the variant itself.
* Seed noise of a variant: the largest spread (max - min) of its forgetting over the seeds of one learning
  rate. A difference to full fine-tuning within the larger of the two noises is reported as such.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .methods import VIEW_LABELS

REFERENCE = "full"
SETUP_KEYS = (
    "model",
    "train_data",
    "eval_old",
    "eval_new",
    "eval_fraction",
    "separator",
    "seq_len",
    "batch_size",
    "grad_accum",
    "steps",
    "eval_sequences",
    "width",
    "adapt_fraction",
    "adapt_modules",
    "init",
    "route_tau",
    "route_train",
    "w12_lr_scale",
    "head_lr_scale",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "threads",
    "lora_r",
    "lora_alpha",
)


def _pct(after: float, before: float) -> float:
    return 100.0 * (after - before) / before


def _metrics(prefix: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{prefix}_ppl_before": before["ppl"],
        f"{prefix}_ppl_after": after["ppl"],
        f"{prefix}_ppl_all_before": before["ppl_all"],
        f"{prefix}_ppl_all_after": after["ppl_all"],
        f"{prefix}_kl_base": after.get("kl_base"),
        f"{prefix}_top1_base": after.get("top1_base"),
        f"{prefix}_route_adapt_fraction": after.get("route_adapt_fraction"),
    }


def _by_source(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Old-domain metrics per eval source (when the domain has several)."""
    out = {}
    for source, b in (before.get("by_source") or {}).items():
        a = after["by_source"][source]
        out[source] = {
            "ppl_before": b["ppl"],
            "ppl_after": a["ppl"],
            "change_pct": _pct(a["ppl"], b["ppl"]),
            "kl_base": a.get("kl_base"),
            "top1_base": a.get("top1_base"),
        }
    return out


def _changes(entry: dict[str, Any]) -> dict[str, Any]:
    entry["forgetting_pct"] = _pct(entry["old_ppl_after"], entry["old_ppl_before"])
    entry["adaptation_pct"] = _pct(entry["new_ppl_after"], entry["new_ppl_before"])
    entry["forgetting_all_pct"] = _pct(entry["old_ppl_all_after"], entry["old_ppl_all_before"])
    entry["adaptation_all_pct"] = _pct(entry["new_ppl_all_after"], entry["new_ppl_all_before"])
    return entry


def run_entry(spec, results: dict[str, Any], base_eval: dict[str, Any]) -> dict[str, Any]:
    """The comparison entry of one run (``spec``: a :class:`.sweep.RunSpec`)."""
    after = results["after"]
    entry = {
        "name": spec.name,
        "variant": spec.variant.name,
        "method": results["method"],
        "lr": spec.lr,
        "seed": spec.seed,
        "train_tokens": results["train_tokens"],
        **_metrics("old", base_eval["old"], after["old"]),
        **_metrics("new", base_eval["new"], after["new"]),
        "trainable_params": results["details"]["trainable_params"],
        "param_group_lrs": results["details"]["param_group_lrs"],
        "init_max_abs_logit_diff": results["preservation"]["max_abs_logit_diff"],
        "train_seconds": results["train_seconds"],
        "tokens_per_s": results["tokens_per_s"],
        "peak_memory_mb": results["peak_memory_bytes"] / 2**20,
    }
    entry["route_adapt_fraction_train"] = next(
        (x["route_adapt_fraction"] for x in reversed(results["losses"]) if "route_adapt_fraction" in x), None
    )
    entry["old_by_source"] = _by_source(base_eval["old"], after["old"])
    _changes(entry)
    entry["views"] = [
        _changes(
            {
                "view": key,
                "label": VIEW_LABELS[key],
                **_metrics("old", base_eval["old"], v["old"]),
                **_metrics("new", base_eval["new"], v["new"]),
                "old_by_source": _by_source(base_eval["old"], v["old"]),
            }
        )
        for key, v in (after.get("views") or {}).items()
    ]
    return entry


def points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run and every eval-only view as a point ``{label, kind, name, lr, seed, ...metrics}``."""
    out = []
    for r in runs:
        base = {k: r[k] for k in ("lr", "seed")}
        out.append({"label": r["variant"], "kind": "run", "name": r["name"], **base, **_point_metrics(r)})
        for v in r["views"]:
            out.append(
                {
                    "label": f"{r['variant']} [{v['label']}]",
                    "kind": "view",
                    "name": f"{r['name']} [{v['label']}]",
                    **base,
                    **_point_metrics(v),
                }
            )
    return out


def _point_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("old_ppl_after", "new_ppl_after", "forgetting_pct", "adaptation_pct", "old_kl_base", "old_top1_base")
    return {k: entry[k] for k in keys}


def pareto_front(pts: list[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point dominates (lower-or-equal old and new perplexity, one lower)."""
    front = []
    for i, p in enumerate(pts):
        dominated = any(
            q["old_ppl_after"] <= p["old_ppl_after"]
            and q["new_ppl_after"] <= p["new_ppl_after"]
            and (q["old_ppl_after"] < p["old_ppl_after"] or q["new_ppl_after"] < p["new_ppl_after"])
            for j, q in enumerate(pts)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def curves(pts: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per label: seed-averaged points ``{lr, new_ppl, forgetting_pct, seeds}``, sorted by new_ppl."""
    by_label: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for p in pts:
        by_label[p["label"]][p["lr"]].append(p)
    out = {}
    for label, by_lr in by_label.items():
        rows = [
            {
                "lr": lr,
                "new_ppl": math.exp(sum(math.log(p["new_ppl_after"]) for p in ps) / len(ps)),
                "forgetting_pct": sum(p["forgetting_pct"] for p in ps) / len(ps),
                "seeds": len(ps),
            }
            for lr, ps in by_lr.items()
        ]
        out[label] = sorted(rows, key=lambda r: r["new_ppl"])
    return out


def seed_noise(pts: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per label: the largest forgetting spread (max - min, % points) over the seeds of one learning rate."""
    spreads: dict[str, list[float]] = defaultdict(list)
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for p in pts:
        groups[(p["label"], p["lr"])].append(p["forgetting_pct"])
    for (label, _), values in groups.items():
        if len(values) > 1:
            spreads[label].append(max(values) - min(values))
    return {p["label"]: (max(spreads[p["label"]]) if spreads[p["label"]] else None) for p in pts}


def interpolate(curve: list[dict[str, float]], new_ppl: float) -> float | None:
    """Forgetting % of ``curve`` at ``new_ppl``: linear in log(new_ppl) between the bracketing points."""
    x = math.log(new_ppl)
    xs = [math.log(c["new_ppl"]) for c in curve]
    if not curve or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    for (x0, c0), (x1, c1) in zip(zip(xs, curve), zip(xs[1:], curve[1:])):
        if x0 - 1e-12 <= x <= x1 + 1e-12:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return c0["forgetting_pct"] + t * (c1["forgetting_pct"] - c0["forgetting_pct"])
    return curve[0]["forgetting_pct"]  # a single-point curve at exactly new_ppl


def matched(
    curve_of: dict[str, list[dict[str, float]]], noise: dict[str, float | None], reference: str = REFERENCE
) -> dict[str, dict[str, Any]]:
    """Per non-reference label: its forgetting and the reference's at every matched target, and a verdict
    (``less`` / ``more`` / ``within seed noise`` / ``mixed`` / ``no overlap``)."""
    out: dict[str, dict[str, Any]] = {}
    ref = curve_of.get(reference)
    if not ref:
        return out
    for label, curve in curve_of.items():
        if label == reference:
            continue
        targets = sorted({c["new_ppl"] for c in ref} | {c["new_ppl"] for c in curve})
        rows = []
        for t in targets:
            mine, theirs = interpolate(curve, t), interpolate(ref, t)
            if mine is not None and theirs is not None:
                rows.append(
                    {
                        "new_ppl": t,
                        "forgetting_pct": mine,
                        "reference_forgetting_pct": theirs,
                        "difference": mine - theirs,
                    }
                )
        tolerance = max(noise.get(label) or 0.0, noise.get(reference) or 0.0)
        diffs = [r["difference"] for r in rows]
        if not rows:
            verdict = "no overlap"
        elif all(abs(d) <= tolerance for d in diffs):
            verdict = "within seed noise"
        elif all(d < -tolerance for d in diffs):
            verdict = "less"
        elif all(d > tolerance for d in diffs):
            verdict = "more"
        else:
            verdict = "mixed"
        out[label] = {
            "rows": rows,
            "verdict": verdict,
            "tolerance": tolerance,
            "new_ppl_range": [curve[0]["new_ppl"], curve[-1]["new_ppl"]],
            "reference_range": [ref[0]["new_ppl"], ref[-1]["new_ppl"]],
        }
    return out


def build_comparison(
    base: dict[str, Any], results: list[tuple[Any, dict[str, Any]]], cfg: TrainConfig, meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole comparison: set-up, base model, ``runs`` (one entry each), points, front, curves, matched
    comparison and the generated headline."""
    base_eval = base["evals"][0]
    runs = [run_entry(spec, r, base_eval) for spec, r in results]
    pts = points(runs)
    front = pareto_front(pts)
    for i, p in enumerate(pts):
        p["on_front"] = i in front
    curve_of = curves(pts)
    noise = seed_noise(pts)
    comparison = {
        "setup": {k: cfg.to_dict()[k] for k in SETUP_KEYS},
        "variants": {
            spec.variant.name: {
                "method": spec.variant.method,
                "options": dict(spec.variant.options),
                "description": spec.variant.description,
            }
            for spec, _ in results
        },
        "base": {
            "old_ppl": base_eval["old"]["ppl"],
            "new_ppl": base_eval["new"]["ppl"],
            "old_ppl_all": base_eval["old"]["ppl_all"],
            "new_ppl_all": base_eval["new"]["ppl_all"],
            "eval_tokens_old": base_eval["old"]["tokens"],
            "eval_tokens_new": base_eval["new"]["tokens"],
            "eval_tokens_all_old": base_eval["old"]["tokens_all"],
            "eval_tokens_all_new": base_eval["new"]["tokens_all"],
        },
        "meta": meta,
        "runs": runs,
        "points": pts,
        "curves": curve_of,
        "seed_noise": noise,
        "matched": matched(curve_of, noise),
    }
    comparison["headline"] = headline(comparison)
    return comparison


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def headline(comparison: dict[str, Any]) -> list[str]:
    """The README's headline sentences, generated from the numbers."""
    pts = comparison["points"]
    if not pts:
        return ["No run finished, so there is nothing to compare."]
    on = [p for p in pts if p["on_front"]]
    runs_on = [p["name"] for p in on if p["kind"] == "run"]
    views_on = [p["name"] for p in on if p["kind"] == "view"]
    n_runs = sum(p["kind"] == "run" for p in pts)
    lines = [
        f"Pareto front (no other point has both a lower old-domain and a lower new-domain perplexity): "
        f"{len(runs_on)} of {n_runs} trained runs lie on it"
        + (f" ({_join(runs_on)})" if runs_on else "")
        + (f", and {len(views_on)} eval-only view(s): {_join(views_on)}." if views_on else ".")
    ]
    found = comparison["matched"]
    if REFERENCE not in comparison["curves"]:
        return lines + ["Full fine-tuning was not run, so there is no matched-adaptation comparison."]
    scale = {label: m for label, m in found.items() if label.startswith("scale-")}
    trained = {label: m for label, m in scale.items() if "[" not in label}
    views = {label: m for label, m in scale.items() if "[" in label}
    for group, title in ((trained, "trained SCALE variants"), (views, "eval-only views of SCALE runs")):
        for label, m in group.items():
            lines.append(_verdict_sentence(label, m))
        if group:
            lines.append(f"Among the {title}: {_group_answer(group)}")
    return lines


def _group_answer(group: dict[str, dict[str, Any]]) -> str:
    """Whether any of ``group`` forgets less than full fine-tuning at matched adaptation, in words."""
    less = [label for label, m in group.items() if m["verdict"] == "less"]
    if less:
        verb = "forgets" if len(less) == 1 else "forget"
        return f"yes, {_join(less)} {verb} less than full fine-tuning at matched adaptation."
    if all(m["verdict"] == "no overlap" for m in group.values()):
        return (
            "no matched comparison is possible: none reaches a new-domain perplexity inside full fine-tuning's "
            "measured range, so none is shown to forget less than full fine-tuning at matched adaptation."
        )
    return "none forgets less than full fine-tuning at matched adaptation (beyond seed noise)."


def _ppl_range(lo: float, hi: float) -> str:
    """``"39.30-46.74"``, or one value when the range is one point."""
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _verdict_sentence(label: str, m: dict[str, Any]) -> str:
    if m["verdict"] == "no overlap":
        own, ref = _ppl_range(*m["new_ppl_range"]), _ppl_range(*m["reference_range"])
        reaches = f"new-domain perplexities {own}" if "-" in own else f"a new-domain perplexity of {own}"
        measured = f"range {ref}" if "-" in ref else f"value {ref}"
        return f"{label} reaches {reaches}, outside full fine-tuning's measured {measured}: no matched comparison."
    diffs = [r["difference"] for r in m["rows"]]
    span = f"{min(diffs):+.1f} to {max(diffs):+.1f}" if len(diffs) > 1 else f"{diffs[0]:+.1f}"
    words = {
        "less": "forgets less than",
        "more": "forgets more than",
        "mixed": "forgets neither consistently less nor more than",
        "within seed noise": "forgets as much (within seed noise) as",
    }[m["verdict"]]
    return (
        f"{label} {words} full fine-tuning at matched new-domain perplexity: old-domain perplexity "
        f"change {span} percentage points relative to full fine-tuning at {len(diffs)} matched point(s) "
        f"(seed noise {m['tolerance']:.1f} points)."
    )


# ---------------------------------------------------------------------- README
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _run_row(r: dict[str, Any], front: set[str], name: str) -> str:
    routed = "/".join(_fmt(r.get(f"{d}_route_adapt_fraction"), ".0%") for d in ("old", "new"))
    sources = ", ".join(f"{s.removeprefix('builtin:')} {v['change_pct']:+.1f}%" for s, v in r["old_by_source"].items())
    return (
        f"| {name} | {r['old_ppl_after']:.2f} ({r['forgetting_pct']:+.1f}%) | {sources or '—'} "
        f"| {r['new_ppl_after']:.2f} ({r['adaptation_pct']:+.1f}%) | {_fmt(r['old_kl_base'], '.4f')} "
        f"| {_fmt(r['old_top1_base'], '.1%')} | {routed} "
        f"| {r['forgetting_all_pct']:+.1f}% / {r['adaptation_all_pct']:+.1f}% "
        f"| {'yes' if name in front else ''} |"
    )


TABLE_HEAD = (
    "| run | old-domain ppl (change) | old change by source | new-domain ppl (change) | KL(base‖model) old "
    "| top-1 = base old | routed to adaptation old/new | all-token change old / new | on front |\n"
    "|---|---|---|---|---:|---:|---:|---|---|"
)


def preservation_sentence(runs: list[dict[str, Any]]) -> str:
    """Every run's check that its prepared model computes the base model at step 0, in one sentence."""
    if not runs:
        return ""
    worst = max(runs, key=lambda r: r["init_max_abs_logit_diff"])
    return (
        f"Every run started from the base model's function: the largest |Δ logits| between a prepared model "
        f"and the base model at step 0 was {worst['init_max_abs_logit_diff']:.2g} ({worst['name']})."
    )


def _source_summary(runs: list[dict[str, Any]]) -> str:
    """A bullet: the range of the old-domain change per source over the trained runs (or '')."""
    sources = list(runs[0]["old_by_source"]) if runs else []
    if not sources:
        return ""
    parts = []
    for source in sources:
        changes = [r["old_by_source"][source]["change_pct"] for r in runs]
        parts.append(f"{source} {min(changes):+.1f}% to {max(changes):+.1f}%")
    return (
        "* Old-domain change by source over the trained runs: " + "; ".join(parts) + ". Old-domain text that "
        "shares names, topics or layout with the training data (a translation of it, for instance) can become "
        "more predictable while unrelated text is forgotten: read the change by source next to the combined one."
    )


def readme(comparison: dict[str, Any]) -> str:
    """The results README (Markdown), every statement generated from ``comparison``."""
    meta, setup, base = comparison["meta"], comparison["setup"], comparison["base"]
    runs = comparison["runs"]
    front = {p["name"] for p in comparison["points"] if p["on_front"]}
    tokens = runs[0]["train_tokens"] if runs else setup["steps"] * setup["batch_size"] * setup["seq_len"]
    out = [
        f"# {meta.get('title', 'Continual pre-training: forgetting vs adaptation')}",
        "",
        "*Generated from `comparison.json` by `scale_kernels.train.report`: the words follow the numbers.*",
        "",
        "## Headline",
        "",
    ]
    out += [f"* {line}" for line in comparison["headline"]]
    out += [
        "",
        "![forgetting vs adaptation](tradeoff.png)",
        "",
        "## Command, machine, time",
        "",
        "```",
        meta.get("command", "(not recorded)"),
        "```",
        "",
        f"* Machine: {meta.get('machine', 'not recorded')}.",
        f"* Wall time: {meta['wall_seconds'] / 60:.1f} min over {meta['invocations']} invocation(s), "
        f"{meta['jobs']} run(s) at once, {setup['threads'] or 'default'} thread(s) per run.",
        f"* Failed runs: {', '.join(meta['failures']) or 'none'}.",
        "",
        "## Set-up",
        "",
        f"* Model `{setup['model']}`; train on {', '.join(setup['train_data'])}; new domain (adaptation): "
        f"{', '.join(setup['eval_new'] or ['every 20th document of the training data'])}; old domain "
        f"(forgetting): {', '.join(setup['eval_old'])}.",
        f"* Every run: {setup['steps']} steps x {setup['batch_size'] * setup['grad_accum']} sequences x "
        f"{setup['seq_len']} tokens = {tokens:,} training tokens; AdamW, linear warmup (no step at the full "
        f"rate) then cosine to {setup['min_lr_ratio']:g} x lr, gradient clipping {setup['max_grad_norm']:g}, "
        f"{setup['precision']}.",
        f"* Evaluation: {base['eval_tokens_old']:,} old-domain and {base['eval_tokens_new']:,} new-domain target "
        f"tokens after excluding packing boundaries ({base['eval_tokens_all_old']:,} / "
        f"{base['eval_tokens_all_new']:,} in all). Documents are joined by {json.dumps(setup['separator'])} "
        "(not the instruct model's EOS chat token); a boundary target is a separator token or the first token "
        "after it. Base model: old-domain perplexity "
        f"{base['old_ppl']:.2f} ({base['old_ppl_all']:.2f} all tokens), new-domain {base['new_ppl']:.2f} "
        f"({base['new_ppl_all']:.2f}).",
        f"* SCALE: width +{setup['width']:.0%}; W12 (adapt/route) only in the top {setup['adapt_fraction']:.0%} "
        f"of the layers' {', '.join(setup['adapt_modules'] or ['all'])} projections; learning rates per group: "
        f"expansion lr, W12 {setup['w12_lr_scale']:g} x lr, W_head_up {setup['head_lr_scale']:g} x lr. Routed "
        f"variants pick, per token, the preservation path (route 0; exactly the base model when the head "
        f"is gated) or the adaptation path with the rule cos(p_preserve, p_adapt) < {setup['route_tau']:g} -> "
        f"adaptation (route_train={setup['route_train']}: the rule also picks the trained path after the "
        "warmup; see docs/training.md).",
        "",
        "Variants:",
        "",
    ]
    for name, v in comparison["variants"].items():
        options = ", ".join(f"{k}={val}" for k, val in v["options"].items())
        out.append(f"* `{name}`: method `{v['method']}`{f' ({options})' if options else ''}. {v['description']}")
    out += [
        "",
        "## Runs",
        "",
        "Perplexities are boundary-excluded; changes are relative to the base model. KL and top-1 agreement "
        "are measured against the base model on the old domain (0 and 100% for the base model). "
        + preservation_sentence(runs),
        "",
        TABLE_HEAD,
    ]
    out += [_run_row(r, front, r["name"]) for r in runs]
    views = [(r, v) for r in runs for v in r["views"]]
    if views:
        out += [
            "",
            "## Eval-only views",
            "",
            "The same trained weights predicting another way (no extra training): "
            + "; ".join(f"*{label}*" for label in sorted({v["label"] for _, v in views}))
            + ".",
            "",
            TABLE_HEAD,
        ]
        out += [_run_row(v, front, f"{r['name']} [{v['label']}]") for r, v in views]
    out += [
        "",
        "## Matched adaptation",
        "",
        "Each variant's seed-averaged points (one per learning rate), sorted by new-domain perplexity, are "
        "interpolated linearly in log(new-domain perplexity); the table compares the old-domain perplexity "
        "change with full fine-tuning's at the same new-domain perplexity, only where both curves cover it "
        "(no extrapolation). Difference < 0: forgets less than full fine-tuning.",
        "",
        "| variant | new-domain ppl | forgetting | full FT forgetting | difference (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, m in comparison["matched"].items():
        if not m["rows"]:
            own, ref = _ppl_range(*m["new_ppl_range"]), _ppl_range(*m["reference_range"])
            out.append(f"| {label} | no overlap ({own} vs {ref}) | | | |")
        for row in m["rows"]:
            out.append(
                f"| {label} | {row['new_ppl']:.2f} | {row['forgetting_pct']:+.1f}% "
                f"| {row['reference_forgetting_pct']:+.1f}% | {row['difference']:+.1f} |"
            )
    noise = {k: v for k, v in comparison["seed_noise"].items() if v is not None}
    out += [
        "",
        "Seed noise (largest forgetting spread over seeds at one learning rate, percentage points): "
        + (", ".join(f"{k} {v:.1f}" for k, v in noise.items()) or "not measured (one seed per point)")
        + ".",
        "",
        "## Reading it",
        "",
        "* A small model (135M parameters) and a short budget on a CPU: this measures the direction and "
        "the trade-off of each method early in continual pre-training, not converged results; GPU-scale "
        "runs are not measured here.",
        "* The old-domain perplexity excludes the packing boundaries; the all-token column shows how much "
        "a plain packed perplexity would differ.",
        "* Eval-only views reuse a run's weights: they show what the gate or the rule does at deployment, "
        "not what training with it would give.",
        _source_summary(runs),
        "",
    ]
    return "\n".join(out)


def write_report(comparison: dict[str, Any], out_dir: Path) -> None:
    """``comparison.json``, ``README.md`` and (with matplotlib) ``tradeoff.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2), encoding="utf-8")
    (out_dir / "README.md").write_text(readme(comparison), encoding="utf-8")
    try:
        from .plots import plot_tradeoff
    except ImportError:
        print("[report] matplotlib not installed: no plot (pip install matplotlib)", flush=True)
        return
    plot_tradeoff(comparison, out_dir / "tradeoff.png")


def demo_conclusion(comparison: dict[str, Any]) -> str:
    """One paragraph comparing the first non-reference run with full fine-tuning (the demo's last words)."""
    runs = comparison["runs"]
    ref = next((r for r in runs if r["variant"] == REFERENCE), None)
    other = next((r for r in runs if r["variant"] != REFERENCE), None)
    if ref is None or other is None:
        return "Conclusion: the demo needs a full fine-tuning run and one other run; see the failures above."
    name = other["variant"]
    forgot = "less" if other["forgetting_pct"] < ref["forgetting_pct"] else "more"
    adapted = "more" if other["adaptation_pct"] < ref["adaptation_pct"] else "less"
    routed = other.get("old_route_adapt_fraction")
    routed_text = "" if routed is None else f" and sent {routed:.0%} of old-domain tokens to its adaptation path"
    return (
        f"Conclusion: after {other['train_tokens']:,} training tokens, {name} changed the old-domain "
        f"perplexity by {other['forgetting_pct']:+.1f}% (full fine-tuning: {ref['forgetting_pct']:+.1f}%) and "
        f"the new-domain perplexity by {other['adaptation_pct']:+.1f}% ({ref['adaptation_pct']:+.1f}%): it "
        f"forgot {forgot} and adapted {adapted} than full fine-tuning. On the old domain it kept "
        f"{other['old_top1_base']:.0%} of the base model's top-1 predictions (full fine-tuning "
        f"{ref['old_top1_base']:.0%}){routed_text}. One learning rate and one seed each on a small budget: "
        "this shows the direction, not the trade-off; `scale-cpt sweep` measures whole curves."
    )
