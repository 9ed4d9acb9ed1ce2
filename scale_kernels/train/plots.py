"""Plots of a comparison: training loss and eval perplexity over steps, and forgetting vs adaptation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Four panels: new-domain training loss per step; old- and new-domain eval perplexity per eval step;
    forgetting % (old-domain ppl change) vs adaptation % (new-domain ppl change)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_loss, ax_trade, ax_old, ax_new = axes.flat
    for method, losses in comparison["losses"].items():
        ax_loss.plot([s for s, _ in losses], [v for _, v in losses], label=method)
    for method, points in comparison["curves"].items():
        steps = [p["step"] for p in points]
        ax_old.plot(steps, [p["old"] for p in points], marker="o", label=method)
        ax_new.plot(steps, [p["new"] for p in points], marker="o", label=method)
    ax_loss.set(title="training loss (new domain)", xlabel="step", ylabel="loss")
    ax_old.set(title="old domain: eval perplexity (up = forgetting)", xlabel="step", ylabel="perplexity")
    ax_new.set(title="new domain: eval perplexity (down = adaptation)", xlabel="step", ylabel="perplexity")
    for row in comparison["rows"]:
        ax_trade.scatter(row["adaptation_pct"], row["forgetting_pct"], s=60)
        ax_trade.annotate(row["method"], (row["adaptation_pct"], row["forgetting_pct"]),
                          textcoords="offset points", xytext=(5, 5))
    ax_trade.axhline(0.0, color="gray", lw=0.8)
    ax_trade.axvline(0.0, color="gray", lw=0.8)
    ax_trade.set(title="forgetting vs adaptation (better: lower left)",
                 xlabel="new-domain ppl change % (adaptation)", ylabel="old-domain ppl change % (forgetting)")
    for ax in (ax_loss, ax_old, ax_new):
        ax.legend(fontsize=8)
    budget = comparison["budget"]
    fig.suptitle(f"{budget['model']}: {budget['steps']} steps x "
                 f"{budget['batch_size']}x{budget['grad_accum']} "
                 f"sequences x {budget['seq_len']} tokens (seed {budget['seed']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
