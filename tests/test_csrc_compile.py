"""CPU-side checks of the CUDA extension sources (no GPU needed).

1. Every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90a (skipped with the reason when nvcc is absent).
2. ``csrc/binding.cpp`` passes ``g++ -fsyntax-only`` against torch's headers (skipped when not feasible).
3. The kernels' real device code (``csrc/tile_gemm.cuh`` on the plans of ``grouped_gemm_plan.h``), run on
   CPU threads by ``csrc/emulate/kernel_emulator.cpp``, passes the shared reference test in fp32/fp16/bf16
   through the whole autograd path. What this cannot show (nvcc code generation, real tensor-core
   numerics, the binding, timing/memory-model effects) is left to tests/test_ops_cuda.py on a GPU.
4. ``setup.py`` builds nothing without SCALE_KERNELS_BUILD_CUDA=1 and fails clearly with it when it cannot.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_matches_reference, make_operands, run

import scale_kernels as sk
from scale_kernels import backends

ROOT = Path(__file__).resolve().parent.parent


def _load_check_script():
    spec = importlib.util.spec_from_file_location("check_cuda_compile", ROOT / "scripts" / "check_cuda_compile.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


check = _load_check_script()
NVCC = check.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/bin, /usr/local/cuda/bin): compile checks skip",
)


# ------------------------------------------------------------------------------------------------
# 1-2. compile checks


def test_every_cuda_source_is_checked():
    names = {p.name for p in check.cu_sources()}
    assert {"forward.cu", "backward_input.cu", "backward_weight.cu"} <= names


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


def _binding_schemas() -> dict[str, torch._C.FunctionSchema]:
    """The m.def(...) schemas of csrc/binding.cpp, parsed by torch's own schema parser."""
    src = (check.CSRC / "binding.cpp").read_text()
    defs = [" ".join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", src, flags=re.S)]
    schemas = [torch._C.parse_schema(d) for d in defs]
    return {s.name: s for s in schemas}


def test_binding_schemas_match_the_python_contract():
    """The op schemas parse (else the extension fails at import, on a GPU) and take the arguments in the order
    scale_kernels/ops/cuda_upscaled_linear.py passes them."""
    schemas = _binding_schemas()
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
    impls = set(re.findall(r'm\.impl\("(\w+)"', (check.CSRC / "binding.cpp").read_text()))
    assert impls == set(expected), "every op needs a CUDA implementation"


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
# 3. kernel emulation: the real device code of csrc/tile_gemm.cuh, run on CPU threads

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ScalarType in upscaled_linear_params.h


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        lib = ctypes.CDLL(str(check.build_emulator(tmp_path_factory.mktemp("emu"))))
    except FileNotFoundError as exc:
        pytest.skip(f"cannot build the kernel emulator: {exc}")
    except subprocess.CalledProcessError as exc:  # the sources are broken: a failure, not a skip
        pytest.fail(f"building csrc/emulate/kernel_emulator.cpp failed:\n{exc.stderr}")
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.emu_forward.argtypes = [i32] + [i64] * 5 + [ptr, i64] * 5 + [ptr] * 4
    lib.emu_backward_input.argtypes = [i32] + [i64] * 5 + [ptr, i64] * 6 + [ptr] * 3
    lib.emu_backward_weight.argtypes = [i32] + [i64] * 5 + [ptr, i64] * 2 + [ptr] * 4
    return lib


def _p(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _mat(t: torch.Tensor | None) -> tuple:
    """(pointer, row stride) of a matrix with unit column stride (what the binding passes)."""
    if t is None:
        return (None, 0)
    assert t.stride(1) == 1 or t.shape[1] <= 1, "the binding copies such a matrix; do it before calling"
    return (_p(t), t.stride(0))


def _nan(*shape, dtype=torch.float32) -> torch.Tensor:
    """NaN-filled output: an element that no tile writes fails every comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


class EmulatedCudaBackend:
    """The ``cuda`` backend with the kernels run by the CPU emulator instead of the GPU (the role of
    csrc/binding.cpp: unit column strides, output allocation, dims), on CPU tensors."""

    name = "cuda"

    def __init__(self, lib):
        self.lib = lib
        self.tiles: list[int] = []  # grid size of every emulated launch

    def unavailable_reason(self, device, dtype):
        return None if dtype in _DTYPE_CODES else f"the cuda backend supports fp32/fp16/bf16, got {dtype}"

    @staticmethod
    def _dims(x_width, w, w21):
        d_out, d_in = w.shape
        return d_in, x_width - d_in, d_out, w21.shape[0]

    def forward(self, x, w, w21, w22, w12, bias, bias_up, route):
        d_in, e_in, d_out, e_out = self._dims(x.shape[1], w, w21)
        y = _nan(x.shape[0], d_out + e_out, dtype=x.dtype)
        weights = [a for t in (x, w, w21, w22, w12) for a in _mat(t)]
        self.tiles.append(
            self.lib.emu_forward(
                _DTYPE_CODES[x.dtype],
                x.shape[0],
                d_in,
                e_in,
                d_out,
                e_out,
                *weights,
                _p(bias),
                _p(bias_up),
                _p(route),
                _p(y),
            )
        )
        return y

    def backward_input(self, dy, x, w, w21, w22, w12, route, need_droute):
        d_in, e_in, d_out, e_out = self._dims(w.shape[1] + w22.shape[1], w, w21)
        dx = _nan(dy.shape[0], d_in + e_in, dtype=dy.dtype)
        droute = _nan(dy.shape[0]) if need_droute else None
        mats = [a for t in (dy, x if need_droute else None, w, w21, w22, w12) for a in _mat(t)]
        self.tiles.append(
            self.lib.emu_backward_input(
                _DTYPE_CODES[dy.dtype], dy.shape[0], d_in, e_in, d_out, e_out, *mats, _p(route), _p(dx), _p(droute)
            )
        )
        return dx, droute

    def backward_weight(self, dy, x, route, d_in, d_out, need_w21, need_w22, need_w12):
        e_in, e_out = x.shape[1] - d_in, dy.shape[1] - d_out
        shapes = {"w21": (e_out, d_in), "w22": (e_out, e_in), "w12": (d_out, e_in)}
        needs = {"w21": need_w21, "w22": need_w22, "w12": need_w12}
        grads = {k: _nan(*shapes[k], dtype=dy.dtype) if needs[k] else None for k in shapes}
        self.tiles.append(
            self.lib.emu_backward_weight(
                _DTYPE_CODES[dy.dtype],
                dy.shape[0],
                d_in,
                e_in,
                d_out,
                e_out,
                *_mat(dy),
                *_mat(x),
                _p(route),
                *(_p(g) for g in grads.values()),
            )
        )
        return tuple(grads.values())


@pytest.fixture
def emulated(emu, monkeypatch):
    """Route backend 'cuda' of the dispatcher to the emulated kernels for this test."""
    fake = EmulatedCudaBackend(emu)
    real_load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: fake if name == "cuda" else real_load(name))
    return fake


def _tiles(rows: int, cols: int) -> int:
    return math.ceil(rows / 64) * math.ceil(cols / 64) if rows > 0 and cols > 0 else 0


EMU_CASES = {  # (lead, d_in, e_in, d_out, e_out), w12, route
    "odd": (((70,), 37, 66, 65, 5), "trainable", "soft"),
    "odd_3d_random": (((3, 23), 33, 70, 17, 66), "trainable", "random"),
    "frozen_w12": (((67,), 45, 19, 53, 11), "frozen", "soft"),
    "preserve": (((67,), 45, 19, 130, 11), "none", "none"),
    "aligned": (((64,), 64, 64, 64, 64), "trainable", "zeros"),
    # 16-byte aligned rows (128-bit loads) with partial tiles: K = 40 = 32 + 8, N = 72 = 64 + 8
    "vec_edges": (((70,), 40, 24, 72, 24), "trainable", "soft"),
    "e_in0": (((9,), 40, 0, 24, 8), "trainable", "soft"),
    "e_out0": (((9,), 24, 16, 48, 0), "trainable", "random"),
    "empty": (((0,), 16, 8, 16, 8), "trainable", "soft"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(EMU_CASES))
def test_emulated_kernels_match_reference(emulated, case, dtype):
    """The same reference test as every backend (helpers.assert_matches_reference), kernels emulated."""
    sizes, w12, route = EMU_CASES[case]
    ops = make_operands(*sizes, w12=w12, route=route, bias=case != "aligned")
    assert_matches_reference(ops, dtype, "cuda")
    assert emulated.tiles, "the emulated kernels did not run"


def test_emulated_grid_sizes(emulated):
    """One launch per op, with exactly one tile per 64 x 64 block of each output that is computed."""
    ops = make_operands((70,), 37, 66, 65, 5, route="soft").to(torch.float32)
    sk.upscaled_linear(*ops.args(), backend="cuda").sum().backward()
    M, d_in, e_in, d_out, e_out = 70, 37, 66, 65, 5
    assert emulated.tiles == [
        _tiles(M, d_out) + _tiles(M, e_out),
        _tiles(M, d_in) + _tiles(M, e_in),
        _tiles(e_out, d_in) + _tiles(e_out, e_in) + _tiles(d_out, e_in),
    ]


@pytest.mark.parametrize("wanted", ["w21", "w22", "w12"])
def test_emulated_weight_launch_writes_only_requested_grads(emulated, wanted):
    ops = make_operands((67,), 9, 70, 66, 4, route="soft").to(torch.float32)
    x, dy = ops.x.detach(), torch.randn(67, 70)
    grads = emulated.backward_weight(dy, x, ops.route.detach(), 9, 66, *(k == wanted for k in ("w21", "w22", "w12")))
    for k, g in zip(("w21", "w22", "w12"), grads):
        assert (g is not None) == (k == wanted)
    (g,) = (g for g in grads if g is not None)
    ref = {
        "w21": dy[:, 66:].t() @ x[:, :9],
        "w22": dy[:, 66:].t() @ x[:, 9:],
        "w12": (dy[:, :66] * ops.route[:, None]).t() @ x[:, 9:],
    }
    torch.testing.assert_close(g, ref[wanted].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_out,e_in", [(0, 70), (5, 0)], ids=["d_out0", "e_in0"])
def test_emulated_droute_of_an_empty_w12_term_is_exactly_zero(emu, d_out, e_in):
    """No W12 term (d_out == 0 or e_in == 0): droute is 0 even where x_up is NaN (the reference never
    multiplies it), also when the empty w12 comes with a non-null pointer (torch gives null, others may not)."""
    M, d_in, e_out = 67, 9, 4
    x = torch.randn(M, d_in + e_in)
    x[:, d_in:] = float("nan")
    dy, route = torch.randn(M, d_out + e_out), torch.rand(M)
    w, w21, w22 = (torch.randn(*s) for s in [(d_out, d_in), (e_out, d_in), (e_out, e_in)])
    w12_storage = torch.randn(1)  # non-null pointer for the empty (d_out, e_in) block
    dx, droute = _nan(M, d_in + e_in), _nan(M)
    mats = [a for t in (dy, x, w, w21, w22) for a in _mat(t)] + [_p(w12_storage), max(e_in, 1)]
    emu.emu_backward_input(0, M, d_in, e_in, d_out, e_out, *mats, _p(route), _p(dx), _p(droute))
    assert torch.equal(droute, torch.zeros(M))


@pytest.mark.parametrize("layout", ["column_slice", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_emulated_strided_x_is_bitwise_the_contiguous_result(emulated, layout, dtype):
    """A column slice of a wider x (its row stride used as is) or one element off 16-byte alignment takes
    the scalar load path instead of 128-bit loads; the values, and so the result, must not change."""
    ops = make_operands((70,), 64, 64, 64, 64, route="soft").to(dtype)
    dy = torch.randn(70, 128, dtype=dtype)
    expected = run(ops, lambda *a: sk.upscaled_linear(*a, backend="cuda"), dy)
    x = ops.x.detach()
    pad = torch.zeros(70, 1, dtype=dtype)
    ops.x = torch.cat([x, pad], 1)[:, :128] if layout == "column_slice" else torch.cat([pad, x], 1)[:, 1:]
    ops.x.requires_grad_(True)
    assert not ops.x.is_contiguous()
    got = run(ops, lambda *a: sk.upscaled_linear(*a, backend="cuda"), dy)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


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
