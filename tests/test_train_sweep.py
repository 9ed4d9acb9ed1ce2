"""Sweeps and their report: the parallel, resumable runner (tiny model), the Pareto front, the comparison at
matched new-domain perplexity and the generated headline."""

from __future__ import annotations

import json

import pytest

from scale_kernels.train import report, sweep, trainer
from scale_kernels.train.config import TrainConfig
from scale_kernels.train.sweep import RunSpec, Variant, grid, run_sweep
from scale_kernels.train.testing import SAMPLE_TEXT, make_tiny_model_dir


# ---------------------------------------------------------------------- pure computations
def _point(label, lr, new, old, kind="run", seed=0):
    return {
        "label": label,
        "kind": kind,
        "name": f"{label}_lr{lr}_s{seed}",
        "lr": lr,
        "seed": seed,
        "new_ppl_after": new,
        "old_ppl_after": old,
        "forgetting_pct": 100.0 * (old / 40.0 - 1.0),
        "adaptation_pct": 100.0 * (new / 60.0 - 1.0),
        "old_kl_base": 0.0,
        "old_top1_base": 1.0,
    }


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [
        _point("a", 1, 30.0, 45.0),
        _point("a", 2, 20.0, 50.0),
        _point("b", 1, 30.0, 44.0),
        _point("b", 2, 25.0, 50.0),
        _point("c", 1, 20.0, 50.0),
    ]
    # a@1 is dominated by b@1 (same new, lower old); b@2 by a@2; a@2 and c@1 tie: neither dominates
    assert report.pareto_front(pts) == [1, 2, 4]


def test_matched_adaptation_interpolates_in_log_ppl_without_extrapolating():
    pts = [
        _point("full", 1e-5, 40.0, 41.0),
        _point("full", 1e-4, 20.0, 48.0),
        _point("scale", 1e-4, 40.0**0.5 * 20.0**0.5, 40.0),
        _point("scale", 1e-3, 10.0, 60.0),
        _point("far", 1e-3, 50.0, 40.0),
        _point("far", 1e-2, 45.0, 40.0),
    ]
    curves = report.curves(pts)
    target = 40.0**0.5 * 20.0**0.5  # halfway between full's points in log new-domain perplexity
    full_there = (2.5 + 20.0) / 2  # forgetting % of full FT at 40 and 20 are +2.5% and +20%
    assert report.interpolate(curves["full"], target) == pytest.approx(full_there)
    assert report.interpolate(curves["full"], 50.0) is None and report.interpolate(curves["full"], 10.0) is None
    found = report.matched(curves, report.seed_noise(pts))
    rows = found["scale"]["rows"]
    assert [r["new_ppl"] for r in rows] == pytest.approx([20.0, target])  # scale's curve covers 10..28.3
    assert rows[1]["difference"] == pytest.approx(0.0 - full_there)
    assert found["scale"]["verdict"] == "less"
    assert found["far"]["verdict"] == "no overlap" and not found["far"]["rows"]


def test_seed_noise_turns_small_differences_into_a_noise_verdict():
    pts = [
        _point("full", 1e-4, 20.0, 48.0),
        _point("full", 1e-4, 20.0, 46.0, seed=1),
        _point("full", 1e-5, 40.0, 41.0),
        _point("scale", 1e-3, 20.0, 46.5),
        _point("scale", 1e-4, 40.0, 40.5),
        _point("partly", 1e-3, 20.0, 40.0),  # 17.5 points less at 20 (beyond noise), 1.25 less at 40 (within)
        _point("partly", 1e-4, 40.0, 40.5),
        _point("worse", 1e-3, 20.0, 60.0),
        _point("worse", 1e-4, 40.0, 44.0),
    ]
    noise = report.seed_noise(pts)
    assert noise["full"] == pytest.approx(5.0) and noise["scale"] is None
    verdicts = {k: v["verdict"] for k, v in report.matched(report.curves(pts), noise).items()}
    assert verdicts == {"scale": "within seed noise", "partly": "mixed", "worse": "more"}


def test_grid_runs_every_lr_once_and_the_last_lr_with_every_seed():
    v = Variant("x", "full", (1e-5, 1e-4))
    assert [(r.lr, r.seed) for r in grid([v], [0, 1])] == [(1e-5, 0), (1e-4, 0), (1e-4, 1)]
    assert len(grid([v], [0, 1], all_seeds=True)) == 4
    assert RunSpec(v, 1e-4, 1).name == "x_lr0.0001_s1"


# ---------------------------------------------------------------------- the runner (tiny model, in-process)
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_tiny_model_dir(root / "model")
    (root / "old.txt").write_text(SAMPLE_TEXT * 8, encoding="utf-8")
    (root / "new.txt").write_text("Blessed are the meek, for they shall inherit the earth. " * 40, encoding="utf-8")
    return root


def _base_cfg(files) -> TrainConfig:
    return TrainConfig(
        model=str(files / "model"),
        train_data=[str(files / "new.txt")],
        eval_new=[str(files / "new.txt")],
        eval_old=[str(files / "old.txt"), str(files / "new.txt")],
        seq_len=16,
        batch_size=2,
        steps=3,
        eval_sequences=2,
        progress=False,
        save_final=False,
        backend="torch",
    ).validate()


class _Interrupt(Exception):
    pass


def test_sweep_writes_the_report_isolates_failures_and_resumes(files, tmp_path, monkeypatch):
    variants = [
        Variant("full", "full", (1e-3, 1e-2), description="Full fine-tuning."),
        Variant("broken", "depth", (1e-3,), (("depth_blocks", 99),)),  # fails when it runs
        Variant("scale-preserve", "scale-preserve", (1e-2,)),
    ]
    runs = grid(variants, [0, 1])
    original, calls = trainer.Trainer.train_step, {"n": 0}

    def dies_in_the_fourth_step(self):  # the sweep is killed inside its second training run
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Interrupt
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", dies_in_the_fourth_step)
    with pytest.raises(_Interrupt):
        run_sweep(_base_cfg(files), runs, tmp_path / "out", subprocess_run=False, log=lambda line: None)
    monkeypatch.setattr(trainer.Trainer, "train_step", original)
    lines = []
    comparison = run_sweep(
        _base_cfg(files),
        runs,
        tmp_path / "out",
        subprocess_run=False,
        results_dir=tmp_path / "report",
        meta={"title": "t", "command": "c", "machine": "m"},
        log=lines.append,
    )
    assert lines[0].startswith(f"[sweep] {len(runs)} runs (1 already done)")
    assert list(comparison["meta"]["failures"]) == ["broken_lr0.001_s0", "broken_lr0.001_s1"]
    assert comparison["meta"]["invocations"] == 2
    entries = {r["name"]: r for r in comparison["runs"]}
    assert {"full_lr0.001_s0", "full_lr0.01_s0", "full_lr0.01_s1"} <= set(entries)
    run = entries["full_lr0.01_s1"]
    for key in (
        "method",
        "lr",
        "seed",
        "train_tokens",
        "old_ppl_before",
        "old_ppl_after",
        "new_ppl_before",
        "new_ppl_after",
    ):
        assert run[key] is not None, key
    assert run["train_tokens"] == 3 * 2 * 16 and run["old_ppl_before"] == comparison["base"]["old_ppl"]
    assert list(run["old_by_source"]) == [str(files / "old.txt"), str(files / "new.txt")]
    assert not (tmp_path / "out" / "runs" / "full_lr0.01_s1" / "checkpoints").exists()
    saved = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [r["name"] for r in comparison["runs"]]
    text = (tmp_path / "report" / "README.md").read_text()
    assert comparison["headline"][0] in text and "| full_lr0.01_s1 |" in text
    assert "Old-domain change by source over the trained runs" in text
    assert any(v["view"] == "gated_rule" for v in entries["scale-preserve_lr0.01_s0"]["views"])
    # a third call reuses every finished run: no training at all
    monkeypatch.setattr(sweep, "run_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(trainer.Trainer, "train_step", lambda self: pytest.fail("trained again"))
    with pytest.raises(pytest.fail.Exception):  # only the failed runs are retried
        run_sweep(_base_cfg(files), runs, tmp_path / "out", subprocess_run=False, log=lambda line: None)
    done = [r for r in runs if not r.variant.name == "broken"]
    again = run_sweep(_base_cfg(files), done, tmp_path / "out", subprocess_run=False, log=lambda line: None)
    assert [r["old_ppl_after"] for r in again["runs"]] == [r["old_ppl_after"] for r in comparison["runs"]]


def test_headline_words_follow_the_numbers():
    pts = [
        _point("full", 1e-5, 40.0, 41.0),
        _point("full", 1e-4, 20.0, 48.0),
        _point("scale-route", 1e-4, 30.0, 40.0),
        _point("scale-route", 1e-3, 20.0, 44.0),
    ]
    for i, p in enumerate(pts):
        p["on_front"] = i in report.pareto_front(pts)
    curves = report.curves(pts)
    comparison = {"points": pts, "curves": curves, "matched": report.matched(curves, report.seed_noise(pts))}
    lines = report.headline(comparison)
    assert lines[0].endswith("2 of 4 trained runs lie on it (scale-route_lr0.0001_s0 and scale-route_lr0.001_s0).")
    assert any(line.startswith("scale-route forgets less than full fine-tuning") for line in lines)
    assert lines[-1] == (
        "Among the trained SCALE variants: yes, scale-route forgets less than full fine-tuning at matched adaptation."
    )
    worse = [dict(p, old_ppl_after=60.0, forgetting_pct=50.0) if p["label"] == "scale-route" else p for p in pts]
    curves = report.curves(worse)
    lines = report.headline(
        {"points": worse, "curves": curves, "matched": report.matched(curves, report.seed_noise(worse))}
    )
    assert lines[-1].endswith("none forgets less than full fine-tuning at matched adaptation (beyond seed noise).")
    apart = [dict(p, new_ppl_after=p["new_ppl_after"] * 3) if p["label"] == "scale-route" else p for p in pts]
    curves = report.curves(apart)
    lines = report.headline({"points": apart, "curves": curves, "matched": report.matched(curves, {})})
    assert "outside full fine-tuning's measured range 20.00-40.00: no matched comparison" in lines[-2]
    assert lines[-1].startswith("Among the trained SCALE variants: no matched comparison is possible")
    single = [p for p in apart if p["lr"] == 1e-4]  # one point each: values, not "a-a" ranges
    curves = report.curves(single)
    lines = report.headline({"points": single, "curves": curves, "matched": report.matched(curves, {})})
    assert lines[-2] == (
        "scale-route reaches a new-domain perplexity of 90.00, outside full fine-tuning's measured value 20.00: "
        "no matched comparison."
    )


def test_a_sweep_stopped_early_stops_its_runs_processes():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sweep._CHILDREN.add(child)
    try:
        with pytest.raises(KeyboardInterrupt), sweep._stopping_children_on_exit():
            raise KeyboardInterrupt
        assert child.wait(timeout=30) != 0  # terminated, not finished
    finally:
        sweep._CHILDREN.discard(child)
        if child.poll() is None:
            child.kill()


def test_in_process_runs_cannot_run_in_parallel(tmp_path):
    with pytest.raises(ValueError, match="jobs > 1 needs subprocess_run=True"):
        run_sweep(TrainConfig(), [], tmp_path, jobs=2, subprocess_run=False)
