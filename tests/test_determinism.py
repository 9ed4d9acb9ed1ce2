"""Determinism: same seed -> bitwise identical results (torch backend); the Triton kernels are bitwise
reproducible run to run (no atomics; split-K partials are summed in a fixed order). Where they are not across
processes on a GPU (the autotuner may pick another tile config), see docs/compatibility.md.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_operands, run, triton_usable

import scale_kernels as sk

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(DEVICE), reason="triton backend unavailable")),
]
# more than one tile in every dimension of every launch under the interpreter (BLOCK 32): M, N and K loops
SIZES = dict(lead=(70,), d_in=45, e_in=40, d_out=50, e_out=35)


def _outputs(backend: str, seed: int) -> list[torch.Tensor]:
    ops = make_operands(**SIZES, route="soft", seed=seed, device=DEVICE if backend == "triton" else "cpu")
    ops = ops.to(torch.float32)
    dy = torch.randn(70, 85, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return run(ops, lambda *a: sk.upscaled_linear(*a, backend=backend), dy.to(ops.x.device))


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == 7  # y and the gradients of x, w21, w22, w12, bias_up, route
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs between runs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_is_bitwise_identical(backend):
    """Forward and every gradient, twice with the same seed: bitwise equal (and a different seed differs, so
    the check is not vacuous)."""
    first, second = _outputs(backend, seed=3), _outputs(backend, seed=3)
    _assert_bitwise(first, second)
    assert not torch.equal(first[0], _outputs(backend, seed=4)[0])


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the autotuner may pick another config per token-count bucket")
def test_triton_interpreter_rows_do_not_depend_on_batch_size():
    """With one fixed tile config (the interpreter) a token's output does not depend on how many other tokens
    share the launch: the K loop order is fixed per output tile. Prefix of the batch -> bitwise equal rows."""
    if not triton_usable():
        pytest.skip("triton backend unavailable")
    ops = make_operands(**SIZES, route="random").to(torch.float32)
    full = sk.upscaled_linear(*ops.args(), backend="triton")
    for k in (1, 33, 64):
        part = sk.upscaled_linear(ops.x[:k], *ops.args()[1:7], ops.route[:k], backend="triton")
        assert torch.equal(part, full[:k]), k


@pytest.mark.skipif(not hasattr(sk, "upscale_model"), reason="scale_kernels.upscale_model (module layer) missing")
def test_training_an_upscaled_model_twice_is_bitwise_identical():
    from helpers_upscale import base_model, train_steps, upscaled

    def trained() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = upscaled(base_model("llama"), mode="route")
        with sk.use_backend("torch"):
            train_steps(model, steps=1)
        return {n: p.detach() for n, p in model.named_parameters()}

    a, b = trained(), trained()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
def test_deterministic_setting_pins_one_config(monkeypatch):
    """SCALE_KERNELS_DETERMINISTIC=1 / torch.use_deterministic_algorithms(True) skip autotuning (first config)."""
    from scale_kernels.ops import triton_upscaled_linear as tk

    configs = ["a", "b", "c"]
    monkeypatch.delenv("SCALE_KERNELS_DETERMINISTIC", raising=False)
    assert tk._first_config_if_deterministic(configs) == configs
    monkeypatch.setenv("SCALE_KERNELS_DETERMINISTIC", "1")
    assert tk._first_config_if_deterministic(configs) == ["a"]
    monkeypatch.delenv("SCALE_KERNELS_DETERMINISTIC")
    torch.use_deterministic_algorithms(True)
    try:
        assert tk._first_config_if_deterministic(configs) == ["a"]
    finally:
        torch.use_deterministic_algorithms(False)
