"""The trade-off plot of a sweep: old-domain forgetting vs new-domain adaptation per run, Pareto front marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_tradeoff(comparison: dict[str, Any], path: str | Path) -> Path:
    """Two panels over new-domain perplexity change (x, left = more adaptation): old-domain perplexity change
    (forgetting) and KL(base || model) on the old domain. Filled markers: trained runs; hollow: eval-only
    views; lines join a variant's seed-averaged learning rates; the dashed line is the Pareto front."""
    pts = comparison["points"]
    fig, (ax_f, ax_kl) = plt.subplots(1, 2, figsize=(15, 6.5))
    labels = list(dict.fromkeys(p["label"] for p in pts))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    base = comparison["base"]
    for label in labels:
        mine = [p for p in pts if p["label"] == label]
        hollow = mine[0]["kind"] == "view"
        style = {"facecolors": "none", "edgecolors": [colors[label]]} if hollow else {"color": colors[label]}
        for ax, key in ((ax_f, "forgetting_pct"), (ax_kl, "old_kl_base")):
            ys = [p[key] for p in mine]
            if any(y is None for y in ys):
                continue
            ax.scatter([p["adaptation_pct"] for p in mine], ys, s=45, label=label, **style)
        curve = comparison["curves"][label]
        if len(curve) > 1:
            xs = [100.0 * (c["new_ppl"] / base["new_ppl"] - 1.0) for c in curve]
            ax_f.plot(xs, [c["forgetting_pct"] for c in curve], color=colors[label], lw=1, ls=":" if hollow else "-")
        for p in mine:
            if not hollow:
                ax_f.annotate(
                    f"{p['lr']:g}",
                    (p["adaptation_pct"], p["forgetting_pct"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 3),
                    color=colors[label],
                )
    front = sorted((p for p in pts if p["on_front"]), key=lambda p: p["adaptation_pct"])
    if front:
        ax_f.plot(
            [p["adaptation_pct"] for p in front],
            [p["forgetting_pct"] for p in front],
            "k--",
            lw=1.2,
            label="Pareto front",
            zorder=0,
        )
        ax_f.scatter(
            [p["adaptation_pct"] for p in front],
            [p["forgetting_pct"] for p in front],
            s=140,
            facecolors="none",
            edgecolors="k",
            lw=1.0,
        )
    for ax in (ax_f, ax_kl):
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.axvline(0.0, color="gray", lw=0.6)
        ax.grid(alpha=0.3)
    ax_f.set(
        title="forgetting vs adaptation (better: lower left); numbers = learning rate",
        xlabel="new-domain perplexity change % (adaptation)",
        ylabel="old-domain perplexity change % (forgetting)",
    )
    ax_kl.set(
        title="distance from the base model on the old domain",
        xlabel="new-domain perplexity change % (adaptation)",
        ylabel="KL(base || model), nats per token",
    )
    ax_f.legend(fontsize=7, loc="best")
    setup = comparison["setup"]
    fig.suptitle(
        f"{setup['model']}: {setup['steps']} steps x {setup['batch_size'] * setup['grad_accum']} x "
        f"{setup['seq_len']} tokens per run; boundary-excluded perplexities"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
