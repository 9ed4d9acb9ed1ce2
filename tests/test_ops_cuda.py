"""The ``cuda`` backend (compiled extension ``scale_kernels._C``) against the fp64 reference.

GPU tests are marked ``gpu`` and skip with the reason without a CUDA device or without the built extension
(build: docs/cuda.md; on a GPU machine run scripts/gpu_check_cuda.sh). Tolerances: the shared rule of
``helpers.assert_matches_reference`` (kernel error <= 2 x plain-PyTorch error in the same dtype + a few ulps).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_operands, run

import scale_kernels as sk
from scale_kernels.backends import unavailable_reason

HAS_CUDA = torch.cuda.is_available()
_REASON = unavailable_reason("cuda", torch.device("cuda"), torch.float32) if HAS_CUDA else "no CUDA device"
_skip_without_ext = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")


def needs_cuda_ext(fn):
    """GPU test of the built extension: marked ``gpu``, skipped with the reason when it cannot run."""
    return pytest.mark.gpu(_skip_without_ext(fn))


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
SIZES = {  # lead, d_in, e_in, d_out, e_out
    "odd_3d": ((3, 37), 70, 33, 65, 17),  # several partial tiles in every dimension
    "aligned": ((130,), 64, 64, 128, 64),  # whole tiles, 16-byte vector loads
    "vec_edges": ((70,), 40, 24, 72, 24),  # 16-byte vector loads with partial K and N tiles
    "tiny": ((2, 1), 8, 3, 5, 2),  # odd row stride: scalar loads only
    "e_in0": ((5,), 40, 0, 24, 8),  # input not widened
    "e_out0": ((9,), 24, 16, 48, 0),  # LM head: logits only
    "empty": ((0,), 16, 8, 16, 8),  # M = 0: weight gradients are zeros
}


def _ops(size: str, **kw):
    lead, d_in, e_in, d_out, e_out = SIZES[size]
    return make_operands(lead, d_in, e_in, d_out, e_out, device="cuda", **kw)


def _cuda(*args):
    return sk.upscaled_linear(*args, backend="cuda")


# ------------------------------------------------------------------------------------------------
# dispatcher (runs everywhere)


def test_unbuilt_extension_says_how_to_build_it():
    try:
        import scale_kernels._C  # noqa: F401
    except ImportError:
        assert "SCALE_KERNELS_BUILD_CUDA=1" in sk.available_backends("cpu")["cuda"]
    else:
        assert "needs CUDA tensors" in sk.available_backends("cpu")["cuda"]


# ------------------------------------------------------------------------------------------------
# reference tests (GPU + extension)


@needs_cuda_ext
@DTYPES
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("route", ["none", "zeros", "random", "soft"])
@pytest.mark.parametrize("w12", ["none", "frozen", "trainable"])
def test_matches_reference(dtype, size, route, w12):
    if w12 == "none" and route != "none":
        pytest.skip("without W12 the route has nothing to gate (covered by route='none')")
    assert_matches_reference(_ops(size, w12=w12, route=route, bias=route != "zeros"), dtype, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("frozen", [("x",), ("w21",), ("w22",), ("w21", "w22"), ("x", "w21", "w22"), ("route",)])
def test_partial_gradients(frozen):
    """Only some operands require grad: the launches compute just those and still match."""
    ops = _ops("odd_3d", route="soft")
    for name in frozen:
        getattr(ops, name).requires_grad_(False)
    assert_matches_reference(ops, torch.bfloat16, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "misaligned", "transposed_w21"])
def test_strided_operands(layout):
    """x as a column slice (its row stride is used as is), transposed (copied), or one element off 16-byte
    alignment (vector loads disabled); a transposed weight (copied). Strides change only how values are
    loaded, never the summation order, so the result is bitwise the contiguous one (reference-checked in
    test_matches_reference["aligned"])."""
    ops = _ops("aligned", route="soft").to(torch.float16)  # .to() makes dense copies: re-stride after it
    dy = torch.randn(130, 128 + 64, device="cuda")
    expected = run(ops, _cuda, dy)
    x = ops.x.detach()
    if layout == "column_slice":
        ops.x = torch.cat([x, torch.randn_like(x[:, :5])], dim=1)[:, : x.shape[1]]
    elif layout == "transposed":
        ops.x = x.t().contiguous().t()
    elif layout == "misaligned":
        ops.x = torch.cat([torch.randn_like(x[:, :1]), x], dim=1)[:, 1:]
    else:
        ops.w21 = ops.w21.detach().t().contiguous().t().requires_grad_(True)
    ops.x.requires_grad_(True)
    assert not (ops.x.is_contiguous() and ops.w21.is_contiguous())
    assert all(torch.equal(a, b) for a, b in zip(expected, run(ops, _cuda, dy)))


@needs_cuda_ext
def test_runs_on_the_current_stream():
    ops = _ops("odd_3d", route="soft").to(torch.bfloat16)
    dy = torch.randn(*ops.x.shape[:-1], 65 + 17, device="cuda")
    expected = run(ops, _cuda, dy)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run(ops, _cuda, dy)
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@needs_cuda_ext
def test_deterministic():
    """No atomics, fixed-order droute reduction: two runs are bitwise identical."""
    ops = make_operands((300,), 130, 200, 70, 90, route="soft", device="cuda").to(torch.float16)
    dy = torch.randn(300, 160, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(run(ops, _cuda, dy), run(ops, _cuda, dy)))


@needs_cuda_ext
def test_binding_rejects_bad_arguments():
    ops = torch.ops.scale_kernels_cuda
    x = torch.randn(4, 6, device="cuda")
    w, w21, w22, w12 = (torch.randn(s, device="cuda") for s in [(3, 4), (2, 4), (2, 2), (3, 2)])
    with pytest.raises(RuntimeError, match="route must have dtype Float"):
        ops.forward(x, w, w21, w22, w12, None, None, torch.ones(4, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"w22 must have shape \(2, 2\)"):
        ops.forward(x, w, w21, torch.randn(2, 3, device="cuda"), None, None, None, None)
    with pytest.raises(RuntimeError, match="w must have dtype"):
        ops.forward(x, w.half(), w21, w22, None, None, None, None)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ops.forward(x.cpu(), w, w21, w22, None, None, None, None)
    with pytest.raises(RuntimeError, match="need_droute=True requires x"):
        ops.backward_input(torch.randn(4, 5, device="cuda"), None, w, w21, w22, w12, None, True)


# ------------------------------------------------------------------------------------------------
# every backend agrees on a realistic shape


@needs_cuda_ext
@pytest.mark.slow
@DTYPES
@pytest.mark.parametrize("lead", [(4096,), (7,)], ids=["prefill", "decode"])
def test_all_backends_agree_realistic(dtype, lead):
    """M = 4096 (and 7) tokens, d = 2048, e = 512, trainable W12 with a soft route: each backend vs fp64."""
    ops = make_operands(lead, 2048, 512, 2048, 512, route="soft", device="cuda", seed=3)
    report = sk.available_backends("cuda", dtype)
    usable = [name for name, reason in report.items() if reason is None]
    assert {"cuda", "torch"} <= set(usable), report
    for name in usable:
        assert_matches_reference(ops, dtype, name)
    if "triton" not in usable:
        pytest.skip(f"cuda and torch agree; triton unavailable: {report['triton']}")
