"""CPU-side checks of the CUDA extension sources (no GPU needed).

1. Every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90a (skipped with the reason when nvcc is absent).
2. ``csrc/binding.cpp`` passes ``g++ -fsyntax-only`` against torch's headers (skipped when not feasible).
3. The tile plans (``csrc/grouped_gemm_plan.h``, shared with the kernels) run through the CPU emulator
   (``csrc/emulate/plan_emulator.cpp``) match the fp64 autograd reference: this checks how each op is
   decomposed into groups/segments/tiles (offsets, strides, route scaling, droute partials, which
   gradients get tiles), NOT the device code (loaders, WMMA/SIMT cores) -- that needs a GPU
   (tests/test_ops_cuda.py).
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

from scale_kernels.reference import upscaled_linear_reference

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
# 3. plan emulation


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        lib = ctypes.CDLL(str(check.build_emulator(tmp_path_factory.mktemp("emu"))))
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build the plan emulator: {getattr(exc, 'stderr', exc)}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.emu_forward.argtypes = [i64] * 5 + [ptr, i64] * 5 + [ptr] * 4
    lib.emu_backward_input.argtypes = [i64] * 5 + [ptr, i64] * 6 + [ptr] * 3
    lib.emu_backward_weight.argtypes = [i64] * 5 + [ptr, i64, ptr, i64] + [ptr] * 4
    return lib


def _p(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _strided(rows: int, cols: int, gen: torch.Generator, pad: int = 5) -> torch.Tensor:
    """A (rows, cols) fp64 view with row stride cols + pad and a 3-element offset (a column slice)."""
    return torch.randn(rows, cols + pad, dtype=torch.float64, generator=gen)[:, 3 : 3 + cols]


def _mat(t: torch.Tensor | None):
    """(pointer, row stride) arguments of a matrix."""
    return (None, 0) if t is None else (_p(t), t.stride(0))


def _tiles(rows: int, cols: int) -> int:
    return math.ceil(rows / 64) * math.ceil(cols / 64) if rows > 0 and cols > 0 else 0


SHAPES = [  # (M, d_in, e_in, d_out, e_out): tile edges, e_in=0, e_out=0, M=0
    (70, 37, 66, 65, 5),
    (129, 33, 130, 3, 64),
    (5, 8, 0, 7, 3),
    (9, 6, 4, 130, 0),
    (0, 6, 4, 5, 3),
]
ROUTES = ["none", "mask", "soft"]


def _case(shape, with_w12: bool, route_kind: str, seed: int = 0):
    M, d_in, e_in, d_out, e_out = shape
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)
    c = {  # every input matrix has its own row stride, so a plan that mixes them up fails
        "x": _strided(M, d_in + e_in, gen),
        "dy": _strided(M, d_out + e_out, gen, pad=6),
        "w": _strided(d_out, d_in, gen, pad=7),
        "w21": _strided(e_out, d_in, gen, pad=8),
        "w22": _strided(e_out, e_in, gen, pad=9),
        "w12": _strided(d_out, e_in, gen, pad=10) if with_w12 else None,
        "bias": rnd(d_out),
        "bias_up": rnd(e_out),
        "route": None,
    }
    if with_w12 and route_kind == "mask":
        c["route"] = (torch.rand(M, generator=gen) > 0.5).float()
    elif with_w12 and route_kind == "soft":
        c["route"] = torch.rand(M, generator=gen).float() * 2 - 0.5
    return c


def _weights_args(c, *activations: str) -> list:
    """(pointer, row stride) of the given activations, then of w, w21, w22, w12."""
    return [a for k in (*activations, "w", "w21", "w22", "w12") for a in _mat(c[k])]


def _reference_grads(c):
    """fp64 autograd of the plain-PyTorch spec: y and every gradient the kernels produce."""
    leaves = {k: c[k].clone().requires_grad_(True) for k in ("x", "w21", "w22", "w12") if c[k] is not None}
    route = None if c["route"] is None else c["route"].double().requires_grad_(True)
    y = upscaled_linear_reference(
        leaves["x"], c["w"], leaves["w21"], leaves["w22"], leaves.get("w12"), c["bias"], c["bias_up"], route
    )
    y.backward(c["dy"])
    grads = {k: v.grad for k, v in leaves.items()}
    grads["route"] = None if route is None else route.grad
    return y.detach(), grads


def _emu_weight_grads(emu, shape, c, outs: dict) -> int:
    """Run the backward-weight plan into ``outs`` (None = gradient not requested); returns its tile count."""
    grads = (_p(outs[k]) for k in ("w21", "w22", "w12"))
    return emu.emu_backward_weight(*shape, *_mat(c["dy"]), *_mat(c["x"]), _p(c["route"]), *grads)


def _nan(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_din{}_ein{}_dout{}_eout{}".format(*s))
@pytest.mark.parametrize("with_w12", [False, True], ids=["no_w12", "w12"])
@pytest.mark.parametrize("route_kind", ROUTES)
def test_plans_match_fp64_reference(emu, shape, with_w12, route_kind):
    if not with_w12 and route_kind != "none":
        pytest.skip("the route only gates the W12 term (the Python layer passes None without w12)")
    M, d_in, e_in, d_out, e_out = shape
    c = _case(shape, with_w12, route_kind)
    y_ref, g_ref = _reference_grads(c)

    y = _nan(M, d_out + e_out)  # NaN prefill: an element no tile writes fails the comparison
    tiles = emu.emu_forward(
        *shape,
        *_weights_args(c, "x"),
        _p(c["bias"]),
        _p(c["bias_up"]),
        _p(c["route"]),
        _p(y),
    )
    assert tiles == _tiles(M, d_out) + _tiles(M, e_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)

    need_droute = c["route"] is not None
    dx = _nan(M, d_in + e_in)
    droute = torch.full((M,), float("nan"), dtype=torch.float32) if need_droute else None
    tiles = emu.emu_backward_input(*shape, *_weights_args(c, "dy", "x"), _p(c["route"]), _p(dx), _p(droute))
    assert tiles == _tiles(M, d_in) + _tiles(M, e_in)
    torch.testing.assert_close(dx, g_ref["x"], rtol=1e-12, atol=1e-12)
    if need_droute:  # partial sums are stored in fp32 (as on the GPU)
        torch.testing.assert_close(droute.double(), g_ref["route"], rtol=1e-5, atol=1e-5)

    dws = {"w21": _nan(e_out, d_in), "w22": _nan(e_out, e_in), "w12": _nan(d_out, e_in) if with_w12 else None}
    tiles = _emu_weight_grads(emu, shape, c, dws)
    assert tiles == _tiles(e_out, d_in) + _tiles(e_out, e_in) + (_tiles(d_out, e_in) if with_w12 else 0)
    for k, v in dws.items():
        if v is not None:
            torch.testing.assert_close(v, g_ref[k], rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.parametrize("wanted", ["w21", "w22", "w12"])
def test_weight_plan_computes_only_requested_grads(emu, wanted):
    M, d_in, e_in, d_out, e_out = shape = (67, 9, 70, 66, 4)
    c = _case(shape, True, "soft", seed=1)
    _, g_ref = _reference_grads(c)
    outs = {"w21": _nan(e_out, d_in), "w22": _nan(e_out, e_in), "w12": _nan(d_out, e_in)}
    tiles = _emu_weight_grads(emu, shape, c, {k: (v if k == wanted else None) for k, v in outs.items()})
    assert tiles == _tiles(*outs[wanted].shape)
    torch.testing.assert_close(outs[wanted], g_ref[wanted], rtol=1e-12, atol=1e-12)
    assert all(outs[k].isnan().all() for k in outs if k != wanted), "a gradient that was not requested was written"


def test_droute_without_partials_is_zero(emu):
    """e_in = 0 with w12 present: no dx1 tile exists, droute must still be written (as zeros)."""
    M, d_in, e_in, d_out, e_out = shape = 7, 5, 0, 6, 2
    c = _case(shape, True, "soft")
    dx, droute = _nan(M, d_in), torch.full((M,), float("nan"), dtype=torch.float32)
    emu.emu_backward_input(*shape, *_weights_args(c, "dy", "x"), _p(c["route"]), _p(dx), _p(droute))
    assert torch.equal(droute, torch.zeros(M))


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
