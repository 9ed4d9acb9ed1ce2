"""Bad input to upscaled_linear: a clear ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from helpers import make_operands

import scale_kernels as sk


def _base():
    return make_operands(lead=(2, 3), d_in=4, e_in=2, d_out=5, e_out=3, route="random").to(torch.float32)


def _with(**changes):
    ops = _base()
    for k, v in changes.items():
        setattr(ops, k, v(ops) if callable(v) else v)
    return ops


CASES = [
    ("x not a tensor", dict(x=[1.0]), TypeError, r"x must be a torch.Tensor"),
    ("x 0-D", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension"),
    ("x narrower than d_in", dict(x=torch.randn(2, 3, 3)), ValueError, r"x's last dim \(3\).*d_in=4"),
    ("w not 2-D", dict(w=torch.randn(5, 4, 1)), ValueError, r"w must be 2-D"),
    ("w21 wrong d_in", dict(w21=torch.randn(3, 5)), ValueError, r"w21 must have shape .*\(3, 4\)"),
    ("w22 wrong e_in", dict(w22=torch.randn(3, 3)), ValueError, r"w22 must have shape .*\(3, 2\)"),
    ("w12 wrong shape", dict(w12=torch.randn(4, 2)), ValueError, r"w12 must have shape .*\(5, 2\)"),
    ("bias wrong shape", dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(d_out,\) = \(5,\)"),
    ("bias_up 2-D", dict(bias_up=torch.randn(3, 1)), ValueError, r"bias_up must be 1-D"),
    ("dtype mismatch", dict(w22=lambda o: o.w22.half()), TypeError, r"w22 must have x's dtype torch.float32"),
    ("int dtype", dict(x=lambda o: o.x.long()), TypeError, r"x must be float32, float16, bfloat16"),
    ("route wrong shape", dict(route=torch.ones(3, 2, dtype=torch.bool)), ValueError,
     r"route must have x's leading shape \(2, 3\)"),
    ("route int", dict(route=torch.ones(2, 3, dtype=torch.long)), TypeError,
     r"route must be a bool mask.*route.bool\(\)"),
    ("route not tensor", dict(route=1.0), TypeError, r"route must be a torch.Tensor"),
    ("device mismatch", dict(w12=lambda o: o.w12.to("meta")), ValueError, r"w12 must be on x's device cpu"),
    ("route device", dict(route=lambda o: o.route.to("meta")), ValueError, r"route must be on x's device cpu"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(case):
    _, changes, exc, pattern = case
    ops = _with(**changes)
    with pytest.raises(exc, match=pattern):
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
