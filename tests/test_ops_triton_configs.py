"""Every Triton kernel with every tile config of its lists against the fp64 reference, and the tuning rules.

The Triton interpreter (CPU) runs a single small config, so code that differs between configs (tile counts,
masks at the last tile, the d(route) partial-sum rows, split-K ranges) would go untested. Here each kernel is
re-wrapped in a one-config autotuner per tile of its lists (prefill, decode and fp32 classes) and its
launcher runs on multi-tile shapes whose widths are not multiples of the largest BLOCK_N, on the pointer
path (odd widths, fp32) and on the TMA-descriptor path (16-byte aligned fp16; the interpreter emulates the
descriptors), and the weight-gradient kernel also with its token dimension split. Each output is compared
with the torch backend in fp64 under the shared tolerance rule (tests/helpers.py). A second test runs the
real autotuner over several configs, first call included: no output may depend on which configs it tried.
The last test compiles the kernels for sm_90 (no GPU needed) and fails on a compile error or a spill.
"""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    TRITON_KERNELS,
    assert_matches_reference,
    assert_within_reference_tolerance,
    make_operands,
    record_calls,
    triton_module,
    triton_usable,
)

from scale_kernels import backends

pytestmark = pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")

# several column tiles for every BLOCK_N (16..256), no width a multiple of the largest BLOCK_N, several M tiles
# for the small ones; widths that are not 16-byte aligned in fp32: the pointer path
POINTER = dict(lead=(37,), d_in=70, e_in=300, d_out=45, e_out=261)
# the same in fp16 with every width a multiple of 8 elements: the TMA path
TMA = dict(lead=(37,), d_in=72, e_in=296, d_out=40, e_out=264)
# weight gradients split over 520 tokens: fewer than two 128x128 tiles per (interpreter) SM, three splits
SPLIT = dict(lead=(520,), d_in=40, e_in=72, d_out=48, e_out=72)
LAYOUTS = {  # name -> (sizes, dtype, expected USE_TMA)
    "pointer": (POINTER, torch.float32, False),
    "tma": (TMA, torch.float16, True),
    "split": (SPLIT, torch.float32, False),
    "split-tma": (SPLIT, torch.float16, True),
}
COMPILE_CHECK = Path(__file__).resolve().parent / "triton_sm90_compile.py"


def _kernel_outputs(backend, kernel: str, args: tuple, dy: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The outputs of one kernel's launcher (the backend interface) for the upscaled-linear operands ``args``."""
    x, w, w21, w22, w12, bias, bias_up, route = args
    if kernel == "_forward_kernel":
        return [("y", backend.forward(*args))]
    if kernel == "_backward_input_kernel":
        dx, droute = backend.backward_input(dy, x, w, w21, w22, w12, route, True)
        return [("x", dx), ("route", droute)]
    grads = backend.backward_weight(dy, x, route, w.shape[1], w.shape[0], True, True, True)
    return list(zip(("w21", "w22", "w12"), grads))


def _args(ops, dtype: torch.dtype) -> tuple:
    """Detached 2-D operands in ``dtype``; the route as the op passes it (fp32, fp64 for fp64)."""
    args = [None if t is None else t.detach().to(dtype) for t in ops.args()[:7]]
    route = ops.route.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    return (*args, route)


def assert_kernel_matches_reference(kernel: str, sizes: dict, dtype: torch.dtype) -> None:
    """One kernel's outputs in ``dtype`` vs the torch backend in fp64, within 2x the torch backend's own error
    in ``dtype`` (plus a few ulps): the rule of tests/helpers.py."""
    ops = make_operands(**sizes, route="soft")
    dy = torch.randn(ops.x.shape[0], ops.w.shape[0] + ops.w21.shape[0], dtype=torch.float64)
    torch_backend, triton_backend = backends.get_backend("torch"), backends.get_backend("triton")
    ref = _kernel_outputs(torch_backend, kernel, _args(ops, torch.float64), dy)
    plain = _kernel_outputs(torch_backend, kernel, _args(ops, dtype), dy.to(dtype))
    got = _kernel_outputs(triton_backend, kernel, _args(ops, dtype), dy.to(dtype))
    for (name, r), (_, p), (_, k) in zip(ref, plain, got):
        assert k.dtype == p.dtype and k.shape == r.shape, (name, k.dtype, p.dtype, k.shape, r.shape)
        assert_within_reference_tolerance(name, k, r, p, exact_non_finite_kind=name != "route")


def _with_configs(monkeypatch, name: str, tiles: list, **autotune_kwargs) -> None:
    """Replace kernel ``name`` by an autotuner over ``tiles`` (no pruning) wrapping the same jit function."""
    import triton

    mod = triton_module()
    fn = getattr(mod, name).fn
    configs = [mod._config(t) for t in tiles]
    monkeypatch.setattr(mod, name, triton.autotune(configs=configs, key=["M_BUCKET"], **autotune_kwargs)(fn))


def _cases() -> list:
    mod = triton_module()
    cases = []
    for kernel in TRITON_KERNELS:
        family = mod.WEIGHT_TILES if kernel == "_backward_weight_kernel" else mod.MN_TILES
        layouts = ["pointer", "tma"] + (["split", "split-tma"] if kernel == "_backward_weight_kernel" else [])
        for size_class, tiles in family.items():
            for tile, layout in itertools.product(tiles, layouts):
                if size_class != "fp32" or not layout.endswith("tma"):  # fp32 never takes the TMA path
                    tile_id = "x".join(map(str, tile[:3]))
                    cases.append(pytest.param(kernel, tile, layout, id=f"{kernel.strip('_')}-{tile_id}-{layout}"))
    return cases


@pytest.mark.parametrize("kernel, tile, layout", _cases())
def test_every_config_matches_reference(monkeypatch, kernel, tile, layout):
    sizes, dtype, tma = LAYOUTS[layout]
    _with_configs(monkeypatch, kernel, [tile])
    launches = record_calls(monkeypatch, "_prepare_tma")  # once per kernel launch, with its path
    assert_kernel_matches_reference(kernel, sizes, dtype)
    assert [args[0] for args, _ in launches] == [tma]


@pytest.mark.parametrize(
    "sizes",
    [dict(d_in=48, e_in=24, d_out=40, e_out=0), dict(d_in=48, e_in=24, d_out=0, e_out=16)],
    ids=["lm_head", "d_out0"],
)
def test_tma_path_with_an_empty_block(monkeypatch, sizes):
    """An LM head (no expansion outputs) or an empty original block keeps the TMA path (the empty operands get
    well-formed descriptors that are never read) and matches the reference."""
    launches = record_calls(monkeypatch, "_prepare_tma")
    assert_matches_reference(make_operands(lead=(37,), **sizes, route="soft"), torch.float16, "triton")
    seen = [args[0] for args, _ in launches]
    assert seen and all(seen), seen


def _fixed_order_bench():
    """A ``do_bench`` that runs each candidate once and ranks them in benchmarking order (the first wins), so
    the winner is the first config while later ones leave whatever they wrote in the buffers."""
    counter = itertools.count(1)

    def bench(kernel_call, quantiles=None, **_):
        kernel_call()
        t = float(next(counter))
        return [t] * len(quantiles) if quantiles else t

    return bench


@pytest.mark.parametrize(
    "kernel, layout",
    [(k, "pointer") for k in TRITON_KERNELS]
    + [("_backward_input_kernel", "tma"), ("_backward_weight_kernel", "split")],
)
def test_autotuning_first_call_matches_reference(monkeypatch, kernel, layout):
    """The autotuner benchmarks a narrow-column config after the (winning) widest one on the very first call;
    the winner's result must not contain anything the narrow config left behind (the d(route) partial sums
    were wrong here before: the narrow config filled partial rows that the winner never overwrote)."""
    mod = triton_module()
    sizes, dtype, _ = LAYOUTS[layout]
    family = mod.WEIGHT_TILES if kernel == "_backward_weight_kernel" else mod.MN_TILES
    tiles = family["prefill"] + family["decode"]
    widest = max(tiles, key=lambda t: (t[0] * t[1], t[1]))
    narrowest = min(tiles, key=lambda t: t[1])
    _with_configs(monkeypatch, kernel, [widest, narrowest], do_bench=_fixed_order_bench())
    assert_kernel_matches_reference(kernel, sizes, dtype)
    assert getattr(mod, kernel).best_config.kwargs["BLOCK_N"] == widest[1]


def test_autotune_keys_cover_every_constexpr_variant():
    """Every constexpr that is not a tile parameter compiles another kernel (Preserve / Adapt / Route, d(route),
    TMA, TF32, the SM count): each needs its own tuned config, so each is in the autotuning key."""
    mod = triton_module()
    tile_params = set(mod._config(mod.MN_TILES["prefill"][0]).kwargs)
    for name in TRITON_KERNELS:
        kernel = getattr(mod, name)
        params = inspect.signature(kernel.fn.fn).parameters.values()
        constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
        assert {"HAS_ROUTE", "USE_TMA", "PRECISION", "NUM_SMS"} <= constexprs, name
        missing = constexprs - tile_params - set(kernel.keys)
        assert not missing, (name, missing)
        assert "M_BUCKET" in kernel.keys, name


@pytest.mark.parametrize("family_name", ["MN_TILES", "WEIGHT_TILES"])
def test_pruner_keeps_the_size_class_of_the_call(monkeypatch, family_name):
    mod = triton_module()
    family = getattr(mod, family_name)
    configs = [mod._config(t) for tiles in family.values() for t in tiles]
    prune = mod._pruner(family)

    def tiles_of(chosen):
        return [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in chosen
        ]

    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    monkeypatch.delenv("SCALE_KERNELS_DETERMINISTIC", raising=False)
    assert tiles_of(prune(configs, {"x": half, "M": mod.DECODE_MAX_TOKENS}, USE_TMA=True)) == family["decode"]
    assert tiles_of(prune(configs, {"x": half, "M": mod.DECODE_MAX_TOKENS + 1}, USE_TMA=True)) == family["prefill"]
    assert tiles_of(prune(configs, {"x": single, "M": 1}, USE_TMA=False)) == family["fp32"]
    if family_name == "MN_TILES":  # d(route) skips the 256-wide column tile
        chosen = tiles_of(prune(configs, {"x": half, "M": 4096}, USE_TMA=True, NEED_DROUTE=True))
        assert chosen == [t for t in family["prefill"] if t[1] <= 128] and len(chosen) < len(family["prefill"])
    # configs outside the lists (the interpreter's, or a test's) are kept
    other = [mod._config((32, 32, 32, 1, 1))]
    assert prune(other, {"x": half, "M": 8}, USE_TMA=False) == other
    monkeypatch.setenv("SCALE_KERNELS_DETERMINISTIC", "1")
    assert tiles_of(prune(configs, {"x": half, "M": 4096}, USE_TMA=True)) == family["prefill"][:1]


def test_split_k_is_a_function_of_the_shape():
    """Splits only below two output tiles per SM and above SPLIT_K_TOKENS tokens; each split a multiple of
    SPLIT_K_TOKENS tokens (so no K block straddles two), every token in exactly one split."""
    mod = triton_module()
    assert mod.split_k(4096, 576, 132) == (1, 4096)  # d=4096, e=1024 at 128x128: 576 tiles >= 2 x 132 SMs
    assert mod.split_k(16384, 36, 132) == (8, 2048)  # d=1024, e=256: 36 tiles
    for M, tiles, sms in itertools.product([1, 256, 257, 520, 4096, 100_000], [1, 5, 36, 263, 264], [4, 132]):
        splits, per_split = mod.split_k(M, tiles, sms)
        assert per_split % mod.SPLIT_K_TOKENS == 0 and 1 <= splits <= mod.MAX_SPLIT_K
        assert (splits - 1) * per_split < M <= splits * per_split, (M, tiles, sms)
        assert (splits > 1) == (tiles < 2 * sms and M > mod.SPLIT_K_TOKENS), (M, tiles, sms)


def test_launch_metadata_counts_flops_and_bytes():
    """What a profiler (proton) shows for a launch: the sizes, the FLOPs of the terms computed, the bytes."""
    mod = triton_module()
    x = torch.empty(1, dtype=torch.bfloat16)
    sizes = dict(M=16, D_IN=4, E_IN=2, D_OUT=3, E_OUT=5)
    forward = mod._metadata("upscaled_linear_forward", mod._forward_flops)
    preserve = forward(None, None, {"x_ptr": x, **sizes, "HAS_W12": False})
    adapt = forward(None, None, {"x_ptr": x, **sizes, "HAS_W12": True})
    assert preserve["flops16"] == 2 * 16 * (3 * 4 + 5 * 6) and adapt["flops16"] == preserve["flops16"] + 2 * 16 * 3 * 2
    assert preserve["name"] == "upscaled_linear_forward [M=16, d_in=4, e_in=2, d_out=3, e_out=5]"
    assert preserve["bytes"] == 2 * (16 * (6 + 8) + 6 * 8)
    weight = mod._metadata("w", mod._backward_weight_flops)
    flags = dict(NEED_W21=True, NEED_W22=False, NEED_W12=True)
    assert weight(None, None, {"dy_ptr": x.float(), **sizes, **flags})["flops32"] == 2 * 16 * (5 * 4 + 3 * 2)


def test_sm90_compile_without_spills():
    """Each kernel (Route variant with d(route)) compiled for sm_90 with this triton and its bundled ptxas, on
    the TMA and pointer paths and in all three size classes: no error, no register spill beyond a few values
    (the script's MAX_SPILL_BYTES). Every tile and variant: ``python tests/triton_sm90_compile.py --all``
    (a few minutes, so not part of the suite)."""
    proc = subprocess.run([sys.executable, str(COMPILE_CHECK)], capture_output=True, text=True)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.count("\n") == 9, proc.stdout  # the compiles really ran
