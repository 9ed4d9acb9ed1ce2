"""Non-finite values in x propagate like in PyTorch: never zeroed by masking, in every backend.

The contract (docs/compatibility.md): y and every gradient have NaN/+inf/-inf exactly where the plain
PyTorch reference has them. One stated exception of *kind* only: ``droute`` is computed as
``<x_up, dy0 W12>``, so an inf in x_up can give +-inf where PyTorch's ``<dy0, x_up W12^T>`` gives NaN; it is
non-finite in exactly the same places. The property-based version is in test_fuzz_upscaled_linear.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_operands, triton_usable

import scale_kernels as sk

NAN, INF = float("nan"), float("inf")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")),
]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter

D_IN, E_IN, D_OUT, E_OUT = 5, 3, 4, 2


def _ops(route: str = "random", w12: str = "trainable"):
    ops = make_operands(lead=(6,), d_in=D_IN, e_in=E_IN, d_out=D_OUT, e_out=E_OUT, route=route, w12=w12)
    if ops.route is not None and ops.route.dtype == torch.bool:
        ops.route = torch.tensor([False, True, False, True, False, True])
    return ops


def _poison(ops, token: int, col: int, value: float):
    with torch.no_grad():
        ops.x[token, col] = value
    return ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_route0_token_with_non_finite_x_up_is_not_masked(backend, value):
    """route = 0 token, x_up non-finite: PyTorch computes (x_up W12^T) * 0 = NaN in the original columns, so
    the kernel must too (a kernel that skipped or masked the W12 term for route-0 tokens would give finite
    numbers here)."""
    ops = _poison(_ops(), token=0, col=D_IN + 1, value=value)
    y = sk.upscaled_linear(*ops.to(torch.float32).args(), backend=backend)
    assert y[0, :D_OUT].isnan().all()  # inf * 0 and NaN * 0 are both NaN
    assert not y[0, D_OUT:].isfinite().any()  # W22 x_up: the expansion columns see it too
    assert y[1:].isfinite().all()  # other tokens untouched
    assert_matches_reference(ops, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("col", [D_IN - 1, D_IN], ids=["x0", "x1"])  # the last x0 / first x1 column
@pytest.mark.parametrize("route", ["none", "random", "soft"])
def test_non_finite_x_matches_reference_pattern(backend, value, col, route):
    """Forward and all gradients: same NaN/inf pattern as the fp64 PyTorch reference."""
    ops = _poison(_ops(route=route), token=1, col=col, value=value)
    assert_matches_reference(ops, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_x_up_without_w12_leaves_original_columns_finite(backend):
    """SCALE-Preserve (no W12): the original outputs never read x_up, exactly like the reference."""
    ops = _poison(_ops(w12="none"), token=2, col=D_IN, value=NAN)
    y = sk.upscaled_linear(*ops.to(torch.float32).args(), backend=backend)
    assert y[:, :D_OUT].isfinite().all() and y[2, D_OUT:].isnan().all()
    assert_matches_reference(ops, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_droute_with_empty_w12_term_and_nan_x_up(backend):
    """d_out == 0: the W12 term is empty, so PyTorch's droute is exactly 0 even for a NaN x_up."""
    x = torch.tensor([[0.5, NAN]], requires_grad=True)
    w = w21 = w22 = w12 = torch.zeros(0, 1)
    route = torch.tensor([0.3], requires_grad=True)
    y = sk.upscaled_linear(x, w, w21, w22, w12, route=route, backend=backend)
    (droute,) = torch.autograd.grad(y.sum(), [route])
    assert droute.item() == 0.0
