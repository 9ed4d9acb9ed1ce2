"""Bad input to upscaled_linear: a clear ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch
from helpers import make_operands

import scale_kernels as sk
from scale_kernels import backends, validation
from scale_kernels.validation import CHECK_FINITE_ENV_VAR, check_finite


def _base():
    return make_operands(lead=(2, 3), d_in=4, e_in=2, d_out=5, e_out=3, route="soft").to(torch.float32)


def _with(**changes):
    ops = _base()
    for k, v in changes.items():
        setattr(ops, k, v(ops) if callable(v) else v)
    return ops


def _poison(name: str, value: float):
    """A copy of operand ``name`` with one non-finite entry."""

    def change(ops):
        t = getattr(ops, name).detach().clone()
        t.view(-1)[0] = value
        return t

    return change


class Case(NamedTuple):
    id: str
    changes: dict
    exc: type
    pattern: str
    context: object = contextlib.nullcontext  # a factory of the context the call runs in


NAN, INF = float("nan"), float("inf")
CASES = [
    # types, layouts, ranks
    Case("x not a tensor", dict(x=[1.0]), TypeError, r"x must be a torch.Tensor"),
    Case("route not tensor", dict(route=1.0), TypeError, r"route must be a torch.Tensor"),
    Case("x 0-D", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension"),
    Case("w not 2-D", dict(w=torch.randn(5, 4, 1)), ValueError, r"w must be 2-D"),
    Case("w21 1-D", dict(w21=torch.randn(4)), ValueError, r"w21 must be 2-D, got shape \(4,\)"),
    Case("w12 1-D", dict(w12=torch.randn(2)), ValueError, r"w12 must be 2-D"),
    Case("bias_up 2-D", dict(bias_up=torch.randn(3, 1)), ValueError, r"bias_up must be 1-D"),
    Case("x sparse", dict(x=lambda o: o.x.detach().to_sparse()), TypeError, r"x must be a dense \(strided\) tensor"),
    Case("w sparse", dict(w=lambda o: o.w.to_sparse()), TypeError, r"w must be a dense \(strided\) tensor"),
    # widths
    Case("x narrower than d_in", dict(x=torch.randn(2, 3, 3)), ValueError, r"x's last dim \(3\).*d_in=4"),
    Case("x wider than d_in + e_in", dict(x=torch.randn(2, 3, 7)), ValueError,
         r"w22 must have shape \(e_out, e_in\) .*e_in=x.shape\[-1\]-d_in = \(3, 3\), got \(3, 2\)"),
    Case("w21 wrong d_in", dict(w21=torch.randn(3, 5)), ValueError, r"w21 must have shape .*\(3, 4\)"),
    Case("w22 wrong e_in", dict(w22=torch.randn(3, 3)), ValueError, r"w22 must have shape .*\(3, 2\)"),
    Case("w12 wrong shape", dict(w12=torch.randn(4, 2)), ValueError, r"w12 must have shape .*\(5, 2\)"),
    Case("bias wrong shape", dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(d_out,\) = \(5,\)"),
    Case("bias_up wrong shape", dict(bias_up=torch.randn(2)), ValueError, r"bias_up must have shape \(e_out,\)"),
    # dtypes
    Case("dtype mismatch", dict(w22=lambda o: o.w22.half()), TypeError, r"w22 must have x's dtype torch.float32"),
    Case("bias dtype", dict(bias=lambda o: o.bias.double()), TypeError, r"bias must have x's dtype torch.float32"),
    Case("int dtype", dict(x=lambda o: o.x.long()), TypeError, r"x must be float32, float16, bfloat16"),
    Case("complex dtype", dict(x=lambda o: o.x.detach().cfloat()), TypeError, r"x must be float32.*complex64"),
    # devices
    Case("device mismatch", dict(w12=lambda o: o.w12.to("meta")), ValueError, r"w12 must be on x's device cpu"),
    Case("bias_up device", dict(bias_up=lambda o: o.bias_up.to("meta")), ValueError,
         r"bias_up must be on x's device cpu"),
    Case("route device", dict(route=lambda o: o.route.to("meta")), ValueError, r"route must be on x's device cpu"),
    # route
    Case("route wrong shape", dict(route=torch.ones(3, 2, dtype=torch.bool)), ValueError,
         r"route must have x's leading shape \(2, 3\)"),
    Case("route wrong rank", dict(route=torch.ones(6, dtype=torch.bool)), ValueError,
         r"route must have x's leading shape \(2, 3\).*got \(6,\)"),
    Case("route int", dict(route=torch.ones(2, 3, dtype=torch.long)), TypeError,
         r"route must be a bool mask.*route.bool\(\)"),
    # frozen weights
    Case("w requires grad", dict(w=lambda o: o.w.clone().requires_grad_(True)), ValueError,
         r"w requires grad.*frozen pretrained w"),
    Case("bias requires grad", dict(bias=lambda o: o.bias.clone().requires_grad_(True)), ValueError,
         r"bias requires grad"),
    # non-finite configuration values (detectable only by reading them: opt-in, see check_finite)
    Case("route NaN gate", dict(route=_poison("route", NAN)), ValueError,
         r"route has 1 non-finite \(NaN/inf\) value\(s\) of 6", check_finite),
    Case("route inf gate", dict(route=_poison("route", INF)), ValueError, r"route has 1 non-finite", check_finite),
    Case("w12 NaN", dict(w12=_poison("w12", NAN)), ValueError, r"w12 has 1 non-finite", check_finite),
    Case("w inf", dict(w=_poison("w", -INF)), ValueError, r"w has 1 non-finite", check_finite),
    Case("bias_up NaN", dict(bias_up=_poison("bias_up", NAN)), ValueError, r"bias_up has 1 non-finite", check_finite),
]  # fmt: skip


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail loudly if any backend is reached: every check must run before a kernel is launched."""

    def launched(name):
        raise AssertionError(f"backend {name!r} was reached before the input was rejected")

    monkeypatch.setattr(backends, "get_backend", launched)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_argument(case, no_kernel):
    ops = _with(**case.changes)
    with case.context(), pytest.raises(case.exc, match=case.pattern):
        sk.upscaled_linear(*ops.args())


def test_valid_base_case_passes():
    ops = _base()
    assert sk.upscaled_linear(*ops.args()).shape == (2, 3, 8)


def test_route_ignored_without_w12():
    """SCALE-Preserve layers have no W12: a route given to them changes nothing."""
    ops = _base()
    a = sk.upscaled_linear(ops.x, ops.w, ops.w21, ops.w22, None, ops.bias, ops.bias_up, ops.route)
    b = sk.upscaled_linear(ops.x, ops.w, ops.w21, ops.w22, None, ops.bias, ops.bias_up, None)
    assert torch.equal(a, b)


def test_finite_checks_are_opt_in_and_never_look_at_x(monkeypatch):
    """Non-finite weights/gates pass by default (they propagate like in PyTorch); with the check on, a
    finite configuration passes and a NaN in x is still allowed (activations are never checked)."""
    monkeypatch.delenv(CHECK_FINITE_ENV_VAR, raising=False)
    ops = _with(w12=_poison("w12", NAN))
    assert sk.upscaled_linear(*ops.args())[..., :5].isnan().any()  # default: no check, NaN propagates
    ops = _with(x=_poison("x", NAN))
    with check_finite():
        y = sk.upscaled_linear(*ops.args())
        assert y.isnan().any() and y.isfinite().any()
        with check_finite(False):
            sk.upscaled_linear(*_with(w12=_poison("w12", NAN)).args())


def test_finite_checks_env_var(monkeypatch):
    ops = _with(route=_poison("route", NAN))
    monkeypatch.setenv(CHECK_FINITE_ENV_VAR, "1")
    with pytest.raises(ValueError, match="route has 1 non-finite"):
        sk.upscaled_linear(*ops.args())
    monkeypatch.setenv(CHECK_FINITE_ENV_VAR, "0")
    sk.upscaled_linear(*ops.args())


# ----------------------------------------------------------------------------------------------------------
# the checks are cached per call signature; the finite-value check never is


def test_checks_run_once_per_signature(monkeypatch):
    calls = []
    real = validation._check_signature
    monkeypatch.setattr(validation, "_check_signature", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(validation, "_checked", {})
    ops = _base()
    for _ in range(3):
        sk.upscaled_linear(*ops.args())
    assert len(calls) == 1
    with torch.no_grad():  # grad mode is part of the signature (it decides whether a frozen w may require grad)
        sk.upscaled_linear(*ops.args())
    sk.upscaled_linear(*ops.to(torch.float64).args())  # dtype
    sk.upscaled_linear(*_with(x=lambda o: o.x[:1], route=lambda o: o.route[:1]).args())  # shape
    sk.upscaled_linear(*_with(route=None).args())  # route kind
    ops.w21.requires_grad_(False)  # requires_grad flags
    sk.upscaled_linear(*ops.args())
    assert len(calls) == 6


def test_a_cached_signature_does_not_hide_a_new_mistake():
    ops = _base()
    sk.upscaled_linear(*ops.args())
    ops.w.requires_grad_(True)
    with pytest.raises(ValueError, match=r"w requires grad.*frozen"):
        sk.upscaled_linear(*ops.args())
    with pytest.raises(ValueError, match="w22 must have shape"):
        sk.upscaled_linear(*_with(w22=lambda o: o.w22[:, :1]).args())


def test_finite_check_is_never_cached():
    ops = _base()
    with check_finite():
        sk.upscaled_linear(*ops.args())
        with torch.no_grad():
            ops.w12[0, 0] = NAN  # same tensor, same signature: only its values changed
        with pytest.raises(ValueError, match="w12 has 1 non-finite"):
            sk.upscaled_linear(*ops.args())
