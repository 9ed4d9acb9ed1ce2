"""Plots of a comparison: perplexity curves over steps and the forgetting-vs-adaptation scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_comparison(comparison: dict[str, Any], path: str | Path) -> Path:
    """Three panels: old-domain ppl vs step, new-domain ppl vs step, forgetting % vs adaptation %."""
    fig, (ax_old, ax_new, ax_trade) = plt.subplots(1, 3, figsize=(16, 4.8))
    for method, points in comparison["curves"].items():
        steps = [p["step"] for p in points]
        ax_old.plot(steps, [p["old"] for p in points], marker="o", label=method)
        ax_new.plot(steps, [p["new"] for p in points], marker="o", label=method)
    ax_old.set(title="old domain (forgetting): perplexity", xlabel="step", ylabel="perplexity")
    ax_new.set(title="new domain (adaptation): perplexity", xlabel="step", ylabel="perplexity")
    for row in comparison["rows"]:
        ax_trade.scatter(row["adaptation_pct"], row["forgetting_pct"], s=60)
        ax_trade.annotate(row["method"], (row["adaptation_pct"], row["forgetting_pct"]),
                          textcoords="offset points", xytext=(5, 5))
    ax_trade.axhline(0.0, color="gray", lw=0.8)
    ax_trade.axvline(0.0, color="gray", lw=0.8)
    ax_trade.set(title="forgetting vs adaptation (better: lower left)",
                 xlabel="new-domain ppl change % (adaptation)", ylabel="old-domain ppl change % (forgetting)")
    ax_old.legend(fontsize=8)
    budget = comparison["budget"]
    fig.suptitle(f"{budget['model']}: {budget['steps']} steps x {budget['batch_size']}x{budget['grad_accum']} "
                 f"seqs x {budget['seq_len']} tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
