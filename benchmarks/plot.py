"""Render results JSON files to PNGs (matplotlib, no display needed).

    python -m benchmarks.plot benchmarks/results/<device>/layer.json benchmarks/results/<device>/model.json

Layer files give ``layer_<pass>.png`` (median time vs tokens with p20-p80 bars, one panel per mode x d, one
line per implementation) and ``layer_speedup.png`` (package speedup over the hand-written module). Model
files give ``model.png`` (tokens/s and peak memory per variant, checkpointing off / on). PNGs are written
next to the JSON unless ``--out-dir`` is given; a smoke run's plots carry the smoke label in their title.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .schema import is_package, load_json  # noqa: E402

HANDWRITTEN = "handwritten"


def _title(payload: dict, what: str) -> str:
    env = payload["env"]
    prefix = "CPU SMOKE RUN (not performance numbers): " if payload["smoke"] else ""
    return f"{prefix}{what}\n{env['device_name']}, {payload['settings'].get('dtype')}, torch {env['torch']}"


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def _grid(keys_rows: list, keys_cols: list, title: str):
    fig, axes = plt.subplots(
        len(keys_rows),
        len(keys_cols),
        squeeze=False,
        figsize=(max(7.0, 4.5 * len(keys_cols)), 3.2 * len(keys_rows) + 0.6),
    )
    fig.suptitle(title, fontsize=9)
    return fig, axes


def _tokens_axis(ax, tokens: set[int]) -> None:
    """Log x axis labelled with the token counts that were run."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted(tokens), [str(t) for t in sorted(tokens)])
    ax.set_xlabel("tokens T")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_pass(payload: dict, pass_name: str, out_dir: Path) -> Path | None:
    """Median time (log) vs tokens (log), p20-p80 error bars; rows = mode, columns = d."""
    recs = [r for r in _ok(payload["records"]) if r["pass"] == pass_name]
    if not recs:
        return None
    modes = list(dict.fromkeys(r["case"]["mode"] for r in recs))
    dims = sorted({r["case"]["d"] for r in recs})
    fig, axes = _grid(modes, dims, _title(payload, f"layer {pass_name}"))
    for i, mode in enumerate(modes):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for impl in dict.fromkeys(r["impl"] for r in recs):
                pts = sorted(
                    (r["case"]["tokens"], r)
                    for r in recs
                    if r["impl"] == impl and r["case"]["mode"] == mode and r["case"]["d"] == d
                )
                if not pts:
                    continue
                xs = [t for t, _ in pts]
                med = [r["median_ms"] for _, r in pts]
                err = [
                    [r["median_ms"] - r["p20_ms"] for _, r in pts],
                    [r["p80_ms"] - r["median_ms"] for _, r in pts],
                ]
                ax.errorbar(xs, med, yerr=err, marker="o", ms=3, capsize=2, label=impl)
            _tokens_axis(ax, {r["case"]["tokens"] for r in recs})
            ax.set(yscale="log", ylabel="ms", title=f"{mode}, d={d}, e={d // 4}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out_dir / f"layer_{pass_name}.png")


def plot_layer_speedup(payload: dict, out_dir: Path) -> Path | None:
    """Speedup of each package backend over the hand-written module vs tokens; rows = pass, cols = d."""
    comps = [c for c in payload["comparisons"] if c["baseline"] == HANDWRITTEN and c["speedup"] is not None]
    if not comps:
        return None
    passes = list(dict.fromkeys(c["pass"] for c in comps))
    dims = sorted({c["case"]["d"] for c in comps})
    fig, axes = _grid(passes, dims, _title(payload, "speedup over the hand-written module"))
    for i, pass_name in enumerate(passes):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            sel = [c for c in comps if c["pass"] == pass_name and c["case"]["d"] == d]
            for impl, mode in dict.fromkeys((c["impl"], c["case"]["mode"]) for c in sel):
                pts = sorted(
                    (c["case"]["tokens"], c["speedup"]) for c in sel if c["impl"] == impl and c["case"]["mode"] == mode
                )
                ax.plot([t for t, _ in pts], [s for _, s in pts], marker="o", ms=3, label=f"{impl} {mode}")
            ax.axhline(1.0, color="gray", lw=0.8)
            _tokens_axis(ax, {c["case"]["tokens"] for c in comps})
            ax.set(ylabel="speedup", title=f"{pass_name}, d={d}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    return _save(fig, out_dir / "layer_speedup.png")


def plot_model(payload: dict, out_dir: Path) -> Path | None:
    """Bars of tokens/s and peak memory per variant, grouped by gradient checkpointing off / on."""
    recs = _ok(payload["records"])
    if not recs:
        return None
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    groups = [False, True]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(_title(payload, "model train step"), fontsize=9)
    width = 0.8 / len(impls)
    for k, (key, label) in enumerate((("tokens_per_s", "tokens/s"), ("peak_mem_mb", "peak memory (MiB)"))):
        ax = axes[k]
        for n, impl in enumerate(impls):
            vals = []
            for ckpt in groups:
                rec = next(
                    (r for r in recs if r["impl"] == impl and r["case"]["gradient_checkpointing"] == ckpt),
                    None,
                )
                vals.append(rec.get(key) if rec and rec.get(key) is not None else 0.0)
            ax.bar(
                [g + n * width for g in range(len(groups))],
                vals,
                width,
                label=impl,
                hatch="//" if is_package(impl) else None,
            )
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], ["checkpointing off", "checkpointing on"])
        ax.set_ylabel(label)
        if key == "peak_mem_mb" and all(r.get("peak_mem_mb") is None for r in recs):
            ax.text(0.5, 0.5, "peak memory not measured (CPU)", ha="center", transform=ax.transAxes)
    axes[0].legend(fontsize=7)
    return _save(fig, out_dir / "model.png")


def plot_file(path: Path, out_dir: Path | None = None) -> list[Path]:
    """All PNGs for one results file; returns the paths written."""
    payload = load_json(path)
    out_dir = Path(out_dir or Path(path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    if payload["kind"] == "layer":
        written = [plot_layer_pass(payload, p, out_dir) for p in dict.fromkeys(r["pass"] for r in payload["records"])]
        written.append(plot_layer_speedup(payload, out_dir))
    else:
        written = [plot_model(payload, out_dir)]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: next to each JSON")
    args = parser.parse_args(argv)
    for path in args.results:
        for png in plot_file(path, args.out_dir):
            print(f"[plot] wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
