"""Backend selection: automatic choice, forcing by argument / context / env var, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import make_operands, triton_usable

import scale_kernels as sk
from scale_kernels import backends


def _f32():
    return make_operands(lead=(3,), d_in=4, e_in=2, d_out=5, e_out=3).to(torch.float32)


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    sk.upscaled_linear(*_f32().args())
    assert sk.last_backend() == "torch"


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
def test_force_by_context_env_and_argument(monkeypatch):
    ops = _f32()
    with sk.use_backend("triton"):
        sk.upscaled_linear(*ops.args())
        assert sk.last_backend() == "triton"
        sk.upscaled_linear(*ops.args(), backend="torch")  # the argument wins over the context
        assert sk.last_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    sk.upscaled_linear(*ops.args())
    assert sk.last_backend() == "triton"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        with sk.use_backend("cublas"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'cublas'"):
        sk.upscaled_linear(*_f32().args(), backend="cublas")


def test_unbuilt_cuda_backend_is_a_clear_error():
    reason = sk.available_backends("cpu")["cuda"]
    assert reason is not None
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        sk.upscaled_linear(*_f32().args(), backend="cuda")


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
def test_triton_rejects_fp64_clearly():
    ops = make_operands(lead=(3,), d_in=4, e_in=2, d_out=5, e_out=3)
    with pytest.raises(ValueError, match="float32/float16/bfloat16, got torch.float64"):
        sk.upscaled_linear(*ops.args(), backend="triton")


def test_available_backends_reports_every_backend():
    report = sk.available_backends("cpu", torch.float32)
    assert set(report) == {"torch", "triton", "cuda"} and report["torch"] is None
