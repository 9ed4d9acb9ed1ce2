"""The ``cuda`` backend (compiled extension ``scale_kernels._C``) against the fp64 reference.

GPU tests skip cleanly without a CUDA device or without the built extension (build: docs/cuda.md;
on a GPU machine run scripts/gpu_check_cuda.sh). The dispatcher-fallback tests run everywhere.

Tolerance (the flash-attention idiom): for every output and gradient,
``max|cuda - ref64| <= 2 * max|torch_same_dtype - ref64| + floor``, where the torch backend in the same
dtype is the yardstick of what rounding that dtype costs; the floor (one ulp of a value of magnitude 2-4
in the dtype: inputs are scaled so outputs are O(1)) covers cases where the torch backend happens to be
exact (tiny K) while the kernel rounds its fp32 sum once in a different order.
"""

from __future__ import annotations

import pytest
import torch

from scale_kernels import available_backends, last_backend, upscaled_linear
from scale_kernels.backends import unavailable_reason
from scale_kernels.reference import upscaled_linear_reference

HAS_CUDA = torch.cuda.is_available()
_REASON = unavailable_reason("cuda", torch.device("cuda"), torch.float32) if HAS_CUDA else "no CUDA device"
_skip_without_ext = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")


def needs_cuda_ext(fn):
    """GPU test of the built extension: marked ``gpu``, skipped with the reason when unavailable."""
    return pytest.mark.gpu(_skip_without_ext(fn))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (leading dims of x, d_in, e_in, d_out, e_out)
SHAPES = [
    ((3, 37), 70, 33, 65, 17),  # 3-D x, odd sizes, several partial tiles
    ((130,), 64, 64, 128, 64),  # tile-aligned (16-byte vector loads)
    ((2, 1), 8, 3, 5, 2),  # tiny, unaligned row stride (scalar loads)
    ((5,), 40, 0, 24, 8),  # e_in = 0
    ((9,), 24, 16, 48, 0),  # e_out = 0 (LM head)
    ((0,), 16, 8, 16, 8),  # M = 0
]
# (w12: none / frozen / trainable, route: None / mask / soft (requires grad) / zeros, bias on/off)
CONFIGS = [
    ("none", None, True),
    ("none", None, False),
    ("frozen", None, True),
    ("frozen", "mask", False),
    ("frozen", "soft", False),
    ("trainable", None, False),
    ("trainable", "mask", True),
    ("trainable", "soft", True),
    ("trainable", "zeros", False),
]


def _shape_id(s) -> str:
    lead, d_in, e_in, d_out, e_out = s
    return f"x{'x'.join(map(str, lead))}_din{d_in}_ein{e_in}_dout{d_out}_eout{e_out}"


def make_inputs(shape, w12_mode, route_kind, bias, *, seed=0, device="cuda", frozen=()):
    """fp64 leaves (O(1) outputs: weights scaled by 1/sqrt(fan-in)); ``frozen`` names extra frozen leaves."""
    lead, d_in, e_in, d_out, e_out = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = max(1, d_in + e_in)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(device)
    t = {
        "x": rnd(*lead, d_in + e_in),
        "w": rnd(d_out, d_in, scale=k**-0.5),
        "w21": rnd(e_out, d_in, scale=k**-0.5),
        "w22": rnd(e_out, e_in, scale=k**-0.5),
        "w12": None if w12_mode == "none" else rnd(d_out, e_in, scale=k**-0.5),
        "bias": rnd(d_out) if bias else None,
        "bias_up": rnd(e_out) if bias else None,
        "route": None,
    }
    if route_kind == "mask":
        t["route"] = (torch.rand(*lead, generator=gen) > 0.5).to(device)
    elif route_kind == "soft":
        t["route"] = torch.rand(*lead, generator=gen, dtype=torch.float64).to(device)
    elif route_kind == "zeros":
        t["route"] = torch.zeros(*lead, dtype=torch.float64, device=device)
    trainable = {"x", "w21", "w22", "bias_up"} | ({"w12"} if w12_mode == "trainable" else set())
    trainable |= {"route"} if route_kind == "soft" else set()
    t["grad_names"] = sorted(n for n in trainable - set(frozen) if t[n] is not None)
    t["dy"] = rnd(*lead, d_out + e_out)
    return t


def run(t, dtype, backend):
    """Forward + backward of ``upscaled_linear`` in ``dtype``: (y, {name: grad})."""
    args = {}
    for name in ("x", "w", "w21", "w22", "w12", "bias", "bias_up", "route"):
        v = t[name]
        if v is not None and v.is_floating_point() and not (name == "route" and dtype == torch.float64):
            v = v.to(torch.float32 if name == "route" else dtype)
        if v is not None and name in t["grad_names"]:
            v = v.detach().requires_grad_(True)
        args[name] = v
    if backend == "reference":
        y = upscaled_linear_reference(*args.values())
    else:
        y = upscaled_linear(*args.values(), backend=backend)
        assert last_backend() == backend
    if t["grad_names"]:  # also at M = 0: the weight gradients must then be zeros
        y.backward(t["dy"].to(dtype))
    return y.detach(), {n: args[n].grad for n in t["grad_names"]}


def _err(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if a is None or ref is None or ref.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_matches_reference(t, dtype, backend="cuda"):
    """``backend`` in ``dtype`` vs the fp64 reference, with the torch backend in ``dtype`` as yardstick."""
    y_ref, g_ref = run(t, torch.float64, "reference")
    y_pt, g_pt = run(t, dtype, "torch")
    y, g = run(t, dtype, backend)
    assert y.dtype == dtype and y.shape == y_ref.shape
    floor = FLOOR[dtype]
    results = [("y", y, y_pt, y_ref)] + [(f"d{n}", g[n], g_pt[n], g_ref[n]) for n in t["grad_names"]]
    for name, out, out_pt, ref in results:
        if ref is None:  # no gradient flowed (M = 0 and nothing requires it)
            continue
        assert out is not None and out.shape == ref.shape, f"{name}: missing or wrong shape"
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        err, err_pt = _err(out, ref), _err(out_pt, ref)
        assert err <= 2 * err_pt + floor, (
            f"{name}: {backend} error {err:.3g} > 2 * torch error {err_pt:.3g} + {floor}"
        )


# ------------------------------------------------------------------------------------------------
# dispatcher (runs everywhere)


def test_cuda_backend_reports_why_it_is_unavailable():
    reason = available_backends("cpu")["cuda"]
    assert reason is not None, "the cuda backend must never claim CPU tensors"
    try:
        import scale_kernels._C  # noqa: F401
    except ImportError:
        assert "SCALE_KERNELS_BUILD_CUDA=1" in reason
    else:
        assert "needs CUDA tensors" in reason


def test_forcing_cuda_backend_on_cpu_raises_clearly_and_auto_falls_back():
    x, w = torch.randn(2, 5), torch.randn(3, 4)
    w21, w22 = torch.randn(2, 4), torch.randn(2, 1)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        upscaled_linear(x, w, w21, w22, backend="cuda")
    upscaled_linear(x, w, w21, w22)
    assert last_backend() == "torch"


# ------------------------------------------------------------------------------------------------
# reference tests (GPU + extension)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("w12_mode,route_kind,bias", CONFIGS, ids=lambda c: str(c))
def test_matches_fp64_reference(dtype, shape, w12_mode, route_kind, bias):
    assert_matches_reference(make_inputs(shape, w12_mode, route_kind, bias), dtype)


@needs_cuda_ext
@pytest.mark.parametrize(
    "frozen", [("x",), ("w21",), ("w22",), ("w21", "w22"), ("x", "w21", "w22"), ("x", "route")], ids=str
)
def test_partial_gradients(frozen):
    """Only some inputs require grad: each launch computes just those (and still matches)."""
    t = make_inputs(((67,), 48, 40, 72, 24), "trainable", "soft", True, frozen=frozen)
    assert_matches_reference(t, torch.bfloat16)


@needs_cuda_ext
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "misaligned"])
def test_strided_x(layout):
    """x as a column slice of a wider tensor (row stride kept), transposed (copied) or 2-byte misaligned."""
    shape = ((70,), 40, 24, 48, 16)
    t = make_inputs(shape, "trainable", "soft", True)
    x = t["x"]
    if layout == "column_slice":
        t["x"] = torch.cat([x, torch.randn_like(x[:, :5])], dim=1)[:, : x.shape[1]]
    elif layout == "transposed":
        t["x"] = x.t().contiguous().t()
    else:  # storage offset of one element: 16-byte vector loads must be disabled
        t["x"] = torch.cat([torch.randn_like(x[:, :1]), x], dim=1)[:, 1:]
    assert not t["x"].is_contiguous()
    assert_matches_reference(t, torch.float16)


@needs_cuda_ext
def test_runs_on_the_current_stream():
    t = make_inputs(((200,), 96, 64, 80, 32), "trainable", "soft", False)
    y0, g0 = run(t, torch.bfloat16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y1, g1 = run(t, torch.bfloat16, "cuda")
    stream.synchronize()
    assert torch.equal(y0, y1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@needs_cuda_ext
def test_deterministic():
    """No atomics: two runs are bitwise identical (droute included)."""
    t = make_inputs(((300,), 130, 200, 70, 90), "trainable", "soft", True)
    (y0, g0), (y1, g1) = run(t, torch.float16, "cuda"), run(t, torch.float16, "cuda")
    assert torch.equal(y0, y1) and all(torch.equal(g0[n], g1[n]) for n in g0)


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
    with pytest.raises(RuntimeError, match="need_droute=True requires x"):
        ops.backward_input(torch.randn(4, 5, device="cuda"), None, w, w21, w22, w12, None, True)


# ------------------------------------------------------------------------------------------------
# all backends agree on a realistic shape


@needs_cuda_ext
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_backends_agree_realistic(dtype):
    """M=4096 tokens, d=2048, e=512, trainable W12 with a soft route: every available backend vs fp64."""
    t = make_inputs(((4096,), 2048, 512, 2048, 512), "trainable", "soft", True, seed=3)
    names = [n for n, r in available_backends("cuda", dtype).items() if r is None]
    assert {"cuda", "torch"} <= set(names), names
    for name in names:
        assert_matches_reference(t, dtype, backend=name)
    if "triton" not in names:
        pytest.skip(
            f"checked {names}; triton backend unavailable: {available_backends('cuda', dtype)['triton']}"
        )
