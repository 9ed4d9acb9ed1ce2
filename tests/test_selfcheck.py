"""``python -m scale_kernels``: every usable backend against the fp64 reference, a verdict line, exit status 1
on a failure, and ``--interpret`` checking the Triton kernels in the interpreter on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from scale_kernels import __main__ as selfcheck

ROOT = Path(__file__).resolve().parents[1]


def _only_torch(monkeypatch) -> None:
    monkeypatch.setattr(selfcheck, "available_backends", lambda device, dtype: {"torch": None, "cuda": "not built"})


def test_a_backend_off_by_a_thousandth_fails_the_verdict_with_exit_status_1(monkeypatch, capsys):
    _only_torch(monkeypatch)
    assert selfcheck.main(["--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "  torch float32    ok: forward and gradients" in out and "  cuda             not usable here" in out
    assert out.splitlines()[-1] == "verdict: ok: every usable backend matches the fp64 reference (torch float32)"
    exact = selfcheck.upscaled_linear
    monkeypatch.setattr(selfcheck, "upscaled_linear", lambda *a, **k: exact(*a, **k) * (1 + 1e-3))
    assert selfcheck.main(["--dtypes", "float32,bfloat16"]) == 1
    out = capsys.readouterr().out
    assert "torch float32    FAILED: W12, biases, bool route: y error" in out and "dw21 error" in out
    assert out.splitlines()[-1].startswith("verdict: FAILED: torch float32 differ")  # bf16's own error hides 1e-3


def test_a_backend_that_raises_is_a_failure_not_a_traceback(monkeypatch, capsys):
    _only_torch(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nwith details")

    monkeypatch.setattr(selfcheck, "upscaled_linear", broken)
    assert selfcheck.main(["--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: W12, biases, bool route: RuntimeError: kernel exploded with details" in out
    assert out.splitlines()[-1].startswith("verdict: FAILED: torch float32")


def test_interpret_reexecutes_with_the_triton_interpreter_and_checks_triton():
    env = {k: v for k, v in os.environ.items() if k != selfcheck.INTERPRET_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "scale_kernels", "--interpret", "--dtypes", "float32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "Triton's interpreter on the CPU" in lines[1] and "not the GPU's code generation" in lines[1]
    assert any(line.startswith("  triton float32   ok: forward and gradients") for line in lines)
    expected = "(torch float32, triton float32)" if not torch.cuda.is_available() else "triton float32"
    assert lines[-1].startswith("verdict: ok: every usable backend matches") and expected in lines[-1]
