"""CPU-side checks of the CUDA extension sources (no GPU needed).

1. ``csrc/decode.cu`` compiles with nvcc for sm_80 and sm_90a, and ``csrc/binding.cpp`` passes ``g++
   -fsyntax-only`` against torch's headers (both skipped with the reason when not feasible).
2. The CPU test library (``scripts.check_cuda_compile``): the extension's very ops (``csrc/ops.h``: argument
   checks, decode kernel for <= 64 tokens, ATen GEMMs otherwise, both backward ops) registered for CPU tensors
   as ``torch.ops.scale_kernels_cuda_emu``, the decode kernel's device code run by the CPU emulation
   (``csrc/emulate/``). Through it, the ``cuda`` backend passes the shared reference test (forward and every
   gradient, fp32/fp16/bf16) and every bad argument raises a TypeError/ValueError naming it. What this cannot
   show (nvcc code generation, real tensor-core numerics, the CUDA parts of the binding, timing, the memory
   model) is left to tests/test_ops_cuda_extension.py and compute-sanitizer on a GPU (scripts/gpu_check_cuda.sh).
3. The torch-free argument checker on hand-made tensor descriptions (devices, storage and sizes a CPU test
   cannot produce).
4. ``setup.py`` builds nothing without SCALE_KERNELS_BUILD_CUDA=1 and fails clearly with it when it cannot.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_matches_reference, make_non_contiguous, make_operands

import scale_kernels as sk
from scale_kernels.ops import cuda_upscaled_linear as cuda_backend
from scripts import check_cuda_compile as check

ROOT = Path(__file__).resolve().parent.parent


NVCC = check.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/bin, /usr/local/cuda/bin): compile checks skip",
)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])


# ------------------------------------------------------------------------------------------------
# 1. compile checks


def test_every_cuda_source_is_checked():
    assert [p.name for p in check.cu_sources()] == ["decode.cu"]


@needs_nvcc
@pytest.mark.parametrize("src", [p.name for p in check.cu_sources()])
def test_cu_compiles_for_sm80_and_sm90a(src, tmp_path):
    cmd = check.nvcc_command(NVCC, check.CSRC / src, tmp_path / "out.o", check.DEFAULT_ARCHS)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {src}:\n{proc.stdout}{proc.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0


@needs_nvcc
def test_binding_cpp_syntax(tmp_path):
    cmd = check.binding_syntax_command(NVCC, tmp_path / "stub")
    if isinstance(cmd, str):
        pytest.skip(f"binding.cpp syntax check not feasible here: {cmd}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"g++ -fsyntax-only binding.cpp failed:\n{proc.stderr}"


def _op_schemas() -> dict[str, torch._C.FunctionSchema]:
    """The m.def(...) schemas of csrc/ops.h, parsed by torch's own schema parser."""
    src = (check.CSRC / "ops.h").read_text()
    defs = [" ".join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", src, flags=re.S)]
    schemas = [torch._C.parse_schema(d) for d in defs]
    return {s.name: s for s in schemas}


def test_op_schemas_match_the_python_contract():
    """The op schemas parse (else the extension fails at import, on a GPU) and take the arguments in the order
    scale_kernels/ops/cuda_upscaled_linear.py passes them; the CUDA binding registers exactly these."""
    schemas = _op_schemas()
    expected = {
        "forward": ["x", "w", "w21", "w22", "w12", "bias", "bias_up", "route"],
        "backward_input": ["dy", "x", "w", "w21", "w22", "w12", "route", "need_droute"],
        "backward_weight": ["dy", "x", "route", "d_in", "d_out", "need_w21", "need_w22", "need_w12"],
    }
    assert set(schemas) == set(expected)
    for name, args in expected.items():
        assert [a.name for a in schemas[name].arguments] == args, name
    optional = {a.name for s in schemas.values() for a in s.arguments if str(a.type).startswith("Optional[")}
    assert optional == {"w12", "bias", "bias_up", "route", "x"}  # x is optional in backward_input only
    assert [str(r.type) for r in schemas["backward_input"].returns] == ["Tensor", "Tensor"]
    assert str(schemas["backward_weight"].returns[0].type) == "List[Tensor]"
    binding = (check.CSRC / "binding.cpp").read_text()
    assert "TORCH_LIBRARY(scale_kernels_cuda, m) { scale_kernels::ops::define_ops(m); }" in binding
    assert "TORCH_LIBRARY_IMPL(scale_kernels_cuda, CUDA, m)" in binding


def test_check_script_compile_failure_is_reported(tmp_path, monkeypatch):
    """The checker must be able to fail: a broken source gives ok=False with the compiler's message."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { undefined_symbol(); }\n")
    monkeypatch.setattr(check, "cu_sources", lambda: [bad])
    (result,) = check.compile_cu(NVCC, ("80",), tmp_path, jobs=1)
    assert not result.ok and "undefined_symbol" in result.output


# ------------------------------------------------------------------------------------------------
# 2. the extension's ops on CPU tensors (decode kernel emulated)


@pytest.fixture(scope="module")
def cpu_lib(tmp_path_factory):
    """The CPU test library, loaded: torch.ops.scale_kernels_cuda_emu plus its ctypes entry points."""
    try:
        path = check.build_cpu_test_library(tmp_path_factory.mktemp("cpu_lib"))
    except FileNotFoundError as exc:
        pytest.skip(f"cannot build the CPU test library: {exc}")
    except subprocess.CalledProcessError as exc:  # the sources are broken: a failure, not a skip
        pytest.fail(f"building the CPU test library failed:\n{exc.stderr}")
    torch.ops.load_library(str(path))
    lib = ctypes.CDLL(str(path))
    lib.scale_kernels_emu_take_decode_ctas.restype = ctypes.c_int
    lib.scale_kernels_emu_check_forward.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.scale_kernels_emu_check_forward.restype = ctypes.c_int
    lib.scale_kernels_emu_take_decode_ctas()
    return lib


@pytest.fixture
def emulated(cpu_lib, monkeypatch):
    """The ``cuda`` backend module, running its ops on CPU tensors through the CPU test library; returns
    ``decode_ctas()``: the CTAs the emulated decode kernel ran since the previous call."""
    monkeypatch.setattr(cuda_backend, "_OPS", torch.ops.scale_kernels_cuda_emu)
    supported = (torch.float32, torch.float16, torch.bfloat16)
    monkeypatch.setattr(
        cuda_backend, "unavailable_reason", lambda device, dtype: None if dtype in supported else f"no {dtype}"
    )
    cpu_lib.scale_kernels_emu_take_decode_ctas()
    return cpu_lib.scale_kernels_emu_take_decode_ctas


def _decode_ctas(M: int, d_out: int, e_out: int, dtype: torch.dtype) -> int:
    """The decode launch's grid size: 16-feature CTAs over y and y_up; fp32 CTAs take 8 tokens each."""
    grid_y = math.ceil(M / 8) if dtype == torch.float32 else 1
    return (math.ceil(d_out / 16) + math.ceil(e_out / 16)) * grid_y if M else 0


EMU_CASES = {  # (lead, d_in, e_in, d_out, e_out), w12, route
    "odd": (((5,), 37, 66, 65, 5), "trainable", "soft"),
    "odd_3d_random": (((3, 7), 33, 70, 17, 66), "trainable", "random"),
    "frozen_w12_zeros": (((1,), 45, 19, 53, 11), "frozen", "zeros"),
    "preserve": (((16,), 45, 19, 40, 11), "none", "none"),
    "adapt": (((9,), 24, 40, 33, 16), "zeros", "none"),
    "aligned_64": (((64,), 64, 64, 64, 32), "trainable", "ones"),  # 8 token groups, 128-bit loads
    "e_in0": (((9,), 40, 0, 24, 8), "trainable", "soft"),
    "e_out0": (((9,), 24, 16, 48, 0), "trainable", "random"),
    "d_out0": (((9,), 24, 16, 0, 8), "trainable", "soft"),
    "empty": (((0,), 16, 8, 16, 8), "trainable", "soft"),
    "prefill_aten": (((70,), 37, 66, 65, 5), "trainable", "soft"),  # > 64 tokens: the ATen GEMM path
}


@DTYPES
@pytest.mark.parametrize("case", list(EMU_CASES))
def test_emulated_backend_matches_reference(emulated, case, dtype):
    """The shared reference test (forward and every gradient, helpers.assert_matches_reference) with the
    forward's decode kernel emulated for <= 64 tokens; > 64 tokens and the backward run the ATen GEMM paths."""
    sizes, w12, route = EMU_CASES[case]
    ops = make_operands(*sizes, w12=w12, route=route, bias=case != "aligned_64")
    assert_matches_reference(ops, dtype, "cuda")
    lead, _, _, d_out, e_out = sizes
    M = math.prod(lead)
    expected = _decode_ctas(M, d_out, e_out, dtype) if M <= 64 else 0
    assert emulated() == expected  # one forward ran on the backend (the reference runs are plain torch)


@pytest.mark.parametrize("tokens", [1, 2, 8, 9, 16, 17, 33, 63, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_emulated_decode_every_token_count(emulated, tokens, dtype):
    """Every token-group count of the kernel (1, 2, 4, 8 groups of 8; fp32: one group per CTA) with partial
    groups, odd widths and a soft route; forward only (the backward is the ATen path, tested above)."""
    ops = make_operands((tokens,), 35, 29, 47, 19, route="soft", seed=tokens)
    with torch.no_grad():
        assert_matches_reference(ops, dtype, "cuda")
    assert emulated() == _decode_ctas(tokens, 47, 19, dtype)


@pytest.mark.parametrize("layout", ["sliced", "weights_t", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_emulated_decode_strided_operands_are_bitwise_the_contiguous_result(emulated, layout, dtype):
    """A column slice of x (its row stride used as is), transposed weights (copied for the kernel), or x one
    element off 16-byte alignment (scalar loads instead of 128-bit ones): only how values are loaded changes,
    never the summation order, so the forward is bitwise the contiguous one (which is reference-checked)."""
    ops = make_operands((11,), 64, 32, 48, 16, route="soft").to(dtype)
    with torch.no_grad():
        expected = sk.upscaled_linear(*ops.args(), backend="cuda")
        if layout == "misaligned":
            pad = torch.zeros(11, 1, dtype=dtype)
            ops.x = torch.cat([pad, ops.x], dim=1)[:, 1:]
        else:
            ops = make_non_contiguous(ops, layout)
        assert not (ops.x.is_contiguous() and ops.w.is_contiguous())
        got = sk.upscaled_linear(*ops.args(), backend="cuda")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tokens", [5, 70], ids=["decode", "aten"])
def test_emulated_non_finite_inputs_propagate_like_pytorch(emulated, tokens):
    """A route-0 token whose x_up is NaN gets a NaN original output ((x_up W12^T) * 0 in PyTorch); an inf
    weight reaches exactly the outputs that read it. Zero fill at the tile edges must not hide or add any. Also
    the finite values and every gradient against the fp64 reference."""
    ops = make_operands((tokens,), 20, 12, 37, 9, route="zeros")
    with torch.no_grad():
        ops.x[2, 25] = float("nan")
        ops.w21[3, 4] = float("inf")
        fp32 = ops.to(torch.float32)
        got = sk.upscaled_linear(*fp32.args(), backend="cuda")
        ref = sk.upscaled_linear_reference(*fp32.args())
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
    others = torch.arange(tokens) != 2
    assert torch.isnan(got[2]).all() and torch.isinf(got[others, 37 + 3]).all()
    assert_matches_reference(ops, torch.float32, "cuda")


@pytest.mark.parametrize("frozen", [("x",), ("w21", "w22"), ("route",), ("x", "w21", "w22")])
def test_emulated_partial_gradients(emulated, frozen):
    """Only some operands require grad: the ops compute just those and still match."""
    ops = make_operands((7,), 21, 13, 18, 6, route="soft")
    for name in frozen:
        getattr(ops, name).requires_grad_(False)
    assert_matches_reference(ops, torch.bfloat16, "cuda")


@pytest.mark.parametrize("d_out,e_in", [(0, 70), (5, 0)], ids=["d_out0", "e_in0"])
def test_droute_of_an_empty_w12_term_is_exactly_zero(cpu_lib, d_out, e_in):
    """No W12 term (d_out == 0 or e_in == 0): droute is 0 even where x_up is NaN (the reference never
    multiplies it)."""
    M, d_in, e_out = 67, 9, 4
    x = torch.randn(M, d_in + e_in)
    x[:, d_in:] = float("nan")
    dy, route = torch.randn(M, d_out + e_out), torch.rand(M)
    w, w21, w22, w12 = (torch.randn(*s) for s in [(d_out, d_in), (e_out, d_in), (e_out, e_in), (d_out, e_in)])
    _, droute = torch.ops.scale_kernels_cuda_emu.backward_input(dy, x, w, w21, w22, w12, route, True)
    assert torch.equal(droute, torch.zeros(M))


# ------------------------------------------------------------------------------------------------
# bad arguments: always a TypeError / ValueError naming the argument, never a crash


def _good_forward() -> dict:
    """Valid forward arguments: M = 4 tokens, d_in = 4, e_in = 2, d_out = 3, e_out = 2."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "x": r(4, 6),
        "w": r(3, 4),
        "w21": r(2, 4),
        "w22": r(2, 2),
        "w12": r(3, 2),
        "bias": r(3),
        "bias_up": r(2),
        "route": torch.rand(4, generator=g),
    }


BAD_FORWARD = {  # argument -> (replacement, exception, message)
    "x_int": ("x", lambda a: a["x"].int(), TypeError, "x must be float32, float16 or bfloat16, got Int"),
    "x_float64": ("x", lambda a: a["x"].double(), TypeError, "x must be float32, float16 or bfloat16, got Double"),
    "x_1d": ("x", lambda a: a["x"][0], ValueError, r"x must be 2-D \(M, d_in \+ e_in\), got shape \[6\]"),
    "x_3d": ("x", lambda a: a["x"][None], ValueError, r"x must be 2-D .*got shape \[1, 4, 6\]"),
    "w_dtype": ("w", lambda a: a["w"].half(), TypeError, "w must have dtype Float like x, got Half"),
    "w_1d": ("w", lambda a: a["w"][0], ValueError, r"w must be 2-D \(d_out, d_in\), got shape \[4\]"),
    "w_too_wide": ("w", lambda a: torch.randn(3, 7), ValueError, "w has d_in = 7 columns, more than x's width 6"),
    "w21_shape": ("w21", lambda a: torch.randn(2, 3), ValueError, r"w21 must have shape \(2, 4\) = \(e_out, d_in\)"),
    "w22_shape": ("w22", lambda a: torch.randn(2, 3), ValueError, r"w22 must have shape \(2, 2\).*got \[2, 3\]"),
    "w22_dtype": ("w22", lambda a: a["w22"].bfloat16(), TypeError, "w22 must have dtype Float like x, got BFloat16"),
    "w12_shape": ("w12", lambda a: torch.randn(3, 3), ValueError, r"w12 must have shape \(3, 2\) = \(d_out, e_in\)"),
    "w12_dtype": ("w12", lambda a: a["w12"].double(), TypeError, "w12 must have dtype Float like x, got Double"),
    "bias_shape": ("bias", lambda a: torch.randn(4), ValueError, r"bias must have shape \(3,\) = \(d_out,\)"),
    "bias_2d": ("bias", lambda a: torch.randn(3, 1), ValueError, "bias must be 1-D"),
    "bias_dtype": ("bias", lambda a: a["bias"].half(), TypeError, "bias must have dtype Float like x"),
    "bias_up_shape": ("bias_up", lambda a: torch.randn(3), ValueError, r"bias_up must have shape \(2,\)"),
    "route_float64": ("route", lambda a: a["route"].double(), TypeError, "route must have dtype Float"),
    "route_bool": ("route", lambda a: a["route"] > 0.5, TypeError, "route must have dtype Float .*got Bool"),
    "route_shape": ("route", lambda a: torch.rand(5), ValueError, r"route must have shape \(4,\)"),
    "route_2d": ("route", lambda a: torch.rand(4, 1), ValueError, r"route must be 1-D \(M,\)"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_arguments(cpu_lib, case):
    name, bad, exc, msg = BAD_FORWARD[case]
    args = _good_forward()
    args[name] = bad(args)
    with pytest.raises(exc, match=f"scale_kernels_cuda.forward: {msg}"):
        torch.ops.scale_kernels_cuda_emu.forward(*args.values())


def test_forward_accepts_the_good_arguments_and_any_strides(cpu_lib):
    """The baseline of the table above is valid; so are non-contiguous operands (read in place or copied)."""
    a = _good_forward()
    expected = sk.upscaled_linear_reference(*a.values())
    torch.testing.assert_close(torch.ops.scale_kernels_cuda_emu.forward(*a.values()), expected)
    strided = {k: v.t().contiguous().t() if v.dim() == 2 else torch.stack([v, v], 1)[:, 0] for k, v in a.items()}
    assert not any(v.is_contiguous() for v in strided.values())
    torch.testing.assert_close(torch.ops.scale_kernels_cuda_emu.forward(*strided.values()), expected)


def test_the_gpu_test_sequence_that_crashed_raises_cleanly(cpu_lib):
    """tests/test_ops_cuda_extension.py::test_binding_rejects_bad_arguments, call for call, on the CPU ops (the old
    binding segfaulted on a GPU in the second call)."""
    ops = torch.ops.scale_kernels_cuda_emu
    x = torch.randn(4, 6)
    w, w21, w22, w12 = (torch.randn(s) for s in [(3, 4), (2, 4), (2, 2), (3, 2)])
    with pytest.raises(TypeError, match="route must have dtype Float"):
        ops.forward(x, w, w21, w22, w12, None, None, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"w22 must have shape \(2, 2\)"):
        ops.forward(x, w, w21, torch.randn(2, 3), None, None, None, None)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.forward(x, w.half(), w21, w22, None, None, None, None)
    with pytest.raises(ValueError, match="need_droute=True requires x"):
        ops.backward_input(torch.randn(4, 5), None, w, w21, w22, w12, None, True)


def _good_backward() -> dict:
    a = _good_forward()
    return {"dy": torch.randn(4, 5), "x": a["x"], **{k: a[k] for k in ("w", "w21", "w22", "w12", "route")}}


BAD_BACKWARD_INPUT = {
    "dy_width": ("dy", torch.randn(4, 6), ValueError, r"dy must have shape \(4, 5\) = \(M, d_out \+ e_out\)"),
    "dy_int": ("dy", torch.ones(4, 5, dtype=torch.int64), TypeError, "dy must be float32, float16 or bfloat16"),
    "x_rows": ("x", torch.randn(5, 6), ValueError, r"x must have shape \(4, 6\)"),
    "x_dtype": ("x", torch.randn(4, 6).double(), TypeError, "x must have dtype Float like dy"),
    "w21_cols": ("w21", torch.randn(2, 5), ValueError, r"w21 must have shape \(2, 4\)"),
    "w12_shape": ("w12", torch.randn(2, 2), ValueError, r"w12 must have shape \(3, 2\)"),
    "route_shape": ("route", torch.rand(3), ValueError, r"route must have shape \(4,\)"),
    "no_x": ("x", None, ValueError, "need_droute=True requires x"),
    "no_w12": ("w12", None, ValueError, "need_droute=True requires w12"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD_INPUT))
def test_backward_input_rejects_bad_arguments(cpu_lib, case):
    name, bad, exc, msg = BAD_BACKWARD_INPUT[case]
    args = _good_backward()
    args[name] = bad
    with pytest.raises(exc, match=f"scale_kernels_cuda.backward_input: {msg}"):
        torch.ops.scale_kernels_cuda_emu.backward_input(*args.values(), True)


BAD_BACKWARD_WEIGHT = {  # (dy, x, d_in, d_out) changes
    "d_in_too_big": ({"d_in": 7}, ValueError, r"d_in must be in \[0, 6\] \(x's width\), got 7"),
    "d_in_negative": ({"d_in": -1}, ValueError, r"d_in must be in \[0, 6\]"),
    "d_out_too_big": ({"d_out": 6}, ValueError, r"d_out must be in \[0, 5\] \(dy's width\), got 6"),
    "x_rows": ({"x": torch.randn(3, 6)}, ValueError, "x must have M = 4 rows like dy"),
    "x_dtype": ({"x": torch.randn(4, 6).half()}, TypeError, "x must have dtype Float like dy, got Half"),
    "dy_3d": ({"dy": torch.randn(1, 4, 5)}, ValueError, "dy must be 2-D"),
    "route_dtype": ({"route": torch.ones(4, dtype=torch.float16)}, TypeError, "route must have dtype Float"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD_WEIGHT))
def test_backward_weight_rejects_bad_arguments(cpu_lib, case):
    changes, exc, msg = BAD_BACKWARD_WEIGHT[case]
    args = {"dy": torch.randn(4, 5), "x": torch.randn(4, 6), "route": torch.rand(4), "d_in": 4, "d_out": 3}
    args.update(changes)
    with pytest.raises(exc, match=f"scale_kernels_cuda.backward_weight: {msg}"):
        torch.ops.scale_kernels_cuda_emu.backward_weight(*args.values(), True, True, True)


# ------------------------------------------------------------------------------------------------
# 3. the torch-free checker on hand-made descriptions (what a CPU cannot produce)

_MAX_DIMS = 8


class TensorDesc(ctypes.Structure):
    """csrc/arg_check.h TensorDesc."""

    _fields_ = [
        ("present", ctypes.c_int32),
        ("dense", ctypes.c_int32),
        ("device_kind", ctypes.c_int32),
        ("device_index", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * _MAX_DIMS),
        ("strides", ctypes.c_int64 * _MAX_DIMS),
        ("address", ctypes.c_uint64),
        ("dtype_name", ctypes.c_char_p),
    ]


_CUDA, _CPU = 1, 0
_ERROR_KINDS = {0: None, 1: TypeError, 2: ValueError}
_FORWARD_ARGS = ("x", "w", "w21", "w22", "w12", "bias", "bias_up", "route")


def _desc(shape, device_kind=_CUDA, device_index=0, **overrides) -> TensorDesc:
    d = TensorDesc(present=1, dense=1, device_kind=device_kind, device_index=device_index, dtype=2)
    d.dim, d.dtype_name, d.address = len(shape), b"BFloat16", 0x10000
    stride = 1
    for i in reversed(range(min(len(shape), _MAX_DIMS))):
        d.sizes[i], d.strides[i] = shape[i], stride
        stride *= max(shape[i], 1)
    for k, v in overrides.items():
        setattr(d, k, v)
    return d


def _check_forward(lib, descs: dict, device=_CUDA) -> tuple[type | None, str]:
    shapes = {"x": (4, 6), "w": (3, 4), "w21": (2, 4), "w22": (2, 2), "w12": (3, 2), "bias": (3,), "bias_up": (2,)}
    all_descs = {k: _desc(s) for k, s in shapes.items()}
    all_descs["route"] = _desc((4,), dtype=0, dtype_name=b"Float")
    all_descs.update(descs)
    array = (TensorDesc * 8)(*(all_descs[k] for k in _FORWARD_ARGS))
    message = ctypes.create_string_buffer(512)
    kind = lib.scale_kernels_emu_check_forward(device, ctypes.cast(array, ctypes.c_void_p), message, 512)
    return _ERROR_KINDS[kind], message.value.decode()


CHECKER_CASES = {  # replaced descriptions -> (error kind, message)
    "valid": ({}, None, ""),
    "absent_optionals": ({k: TensorDesc() for k in ("w12", "bias", "bias_up", "route")}, None, ""),
    "x_undefined": ({"x": TensorDesc()}, ValueError, "x is required, got None"),
    "x_on_cpu": ({"x": _desc((4, 6), device_kind=_CPU)}, ValueError, "x must be a cuda tensor, got device cpu"),
    "w_other_gpu": ({"w": _desc((3, 4), device_index=1)}, ValueError, "w must be on cuda:0 like the other"),
    "w21_meta": ({"w21": _desc((2, 4), device_kind=2)}, ValueError, "w21 must be a cuda tensor, got device non-CPU"),
    "route_other_gpu": ({"route": _desc((4,), device_index=3, dtype=0)}, ValueError, "route must be on cuda:0"),
    "x_sparse": ({"x": _desc((4, 6), dense=0)}, ValueError, r"x must be a dense \(strided\) tensor"),
    "w_no_storage": ({"w": _desc((3, 4), address=0)}, ValueError, "w has no data"),
    "w_negative_stride": ({"w": _desc((3, 4), strides=(ctypes.c_int64 * 8)(-4, 1))}, ValueError, "negative"),
    "x_9d": ({"x": _desc((1,) * 9)}, ValueError, r"x must be 2-D .*\[1, 1, 1, 1, 1, 1, 1, 1, \.\.\.\]"),
    "too_wide": (
        {"x": _desc((4, 2**31 + 2)), "w": _desc((3, 2**31)), "w21": _desc((2, 2**31))},
        ValueError,
        "block widths must be below 2",
    ),
}


@pytest.mark.parametrize("case", list(CHECKER_CASES))
def test_checker_on_descriptions(cpu_lib, case):
    descs, kind, msg = CHECKER_CASES[case]
    got_kind, got_msg = _check_forward(cpu_lib, descs)
    assert got_kind is kind, got_msg
    assert re.search(msg, got_msg), got_msg


def test_checker_wants_the_ops_device_type(cpu_lib):
    """The CPU op rejects CUDA tensors (and the CUDA op CPU ones): the check names the op's device."""
    kind, msg = _check_forward(cpu_lib, {}, device=_CPU)
    assert kind is ValueError and "x must be a cpu tensor, got device cuda:0" in msg


# ------------------------------------------------------------------------------------------------
# 4. optional build


def _setup_py(env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SCALE_KERNELS_BUILD_CUDA", "SCALE_KERNELS_CUDA_ARCHS")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_setup_builds_nothing_by_default():
    proc = _setup_py({})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"


def test_setup_rejects_old_arch():
    proc = _setup_py({"SCALE_KERNELS_BUILD_CUDA": "1", "SCALE_KERNELS_CUDA_ARCHS": "80;75"})
    assert proc.returncode != 0 and "'75' is not a CUDA architecture >= 80" in proc.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error on a CPU-only torch")
def test_setup_explains_cpu_torch():
    proc = _setup_py({"SCALE_KERNELS_BUILD_CUDA": "1"})
    assert proc.returncode != 0 and "needs a CUDA build of torch" in proc.stderr
