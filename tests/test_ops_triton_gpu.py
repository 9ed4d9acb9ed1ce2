"""The Triton backend on a GPU (``pytest -m gpu``): every constexpr variant on the TMA and pointer paths, the
large shape of the benchmarks with real autotuning (first call included), decode and split-K shapes, against
the fp64 reference under the shared tolerance rule (tests/helpers.py), and no register spills in any kernel
compiled on the way. Skipped without CUDA.

Compilation dominates the time on a fresh GPU: every test but the autotuning one pins the first config of
each size class (the deterministic mode), so each kernel variant compiles once. Run with ``-rP`` to see the
autotuner's choices and the registers of the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON_KERNELS, assert_matches_reference, make_operands, record_calls, triton_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = {  # name -> (w12, route): Preserve, Adapt with W12 frozen, Route with a hard mask / a soft gate
    "preserve": ("none", "none"),
    "adapt-frozen": ("frozen", "none"),
    "route-hard": ("trainable", "random"),
    "route-soft": ("trainable", "soft"),
}
ODD = dict(lead=(3, 37), d_in=45, e_in=19, d_out=53, e_out=11)  # widths not 16-byte aligned: pointer path
ALIGNED = dict(lead=(300,), d_in=264, e_in=136, d_out=200, e_out=72)  # multiples of 8: TMA path on Hopper
LARGE = dict(lead=(4096,), d_in=4096, e_in=1024, d_out=4096, e_out=1024)  # the benchmarks' layer shape
DECODE = dict(LARGE, lead=(16,))
SPLIT = dict(lead=(4096,), d_in=256, e_in=64, d_out=256, e_out=64)  # 5 weight tiles: token dimension split


@pytest.fixture(autouse=True)
def pinned_configs(monkeypatch):
    """The first config of each size class only (the autotuning test lifts this)."""
    monkeypatch.setenv("SCALE_KERNELS_DETERMINISTIC", "1")


def _tma_expected(dtype: torch.dtype) -> bool:
    return torch.cuda.get_device_capability()[0] == 9 and dtype != torch.float32


def _check(monkeypatch, sizes: dict, mode: str, dtype: torch.dtype, expect_tma: bool) -> None:
    w12, route = MODES[mode]
    launches = record_calls(monkeypatch, "_prepare_tma")  # once per kernel launch, with its path
    ops = make_operands(**sizes, w12=w12, route=route, device="cuda")
    assert_matches_reference(ops, dtype, "triton")
    paths = [args[0] for args, _ in launches]
    assert paths and set(paths) == {expect_tma}, paths


def _tile(config) -> str:
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _compiled_kernels() -> list[tuple[str, object]]:
    """Every kernel binary the three jit functions compiled in this process (both triton 3.6 and 3.9 keep
    them in ``device_caches[device][0]``)."""
    mod = triton_module()
    found = []
    for name in TRITON_KERNELS:
        for caches in getattr(mod, name).fn.device_caches.values():
            found += [(name, compiled) for compiled in caches[0].values()]
    return found


def _assert_no_spills() -> None:
    """No compiled kernel spills more than a few values (the limit of tests/triton_sm90_compile.py)."""
    from triton_sm90_compile import MAX_SPILL_BYTES  # imported here: it turns the interpreter off

    rows, spilled = [], []
    for name, compiled in _compiled_kernels():
        compiled.run  # loads the binary: n_regs and n_spills are known from then on  # noqa: B018
        meta = compiled.metadata
        spill_bytes = 4 * compiled.n_spills  # triton reports the local memory size in 4-byte words
        row = f"{name}: {compiled.n_regs} registers, {spill_bytes} B spilled, {meta.shared} B shared, "
        row += f"{meta.num_warps} warps, {meta.num_stages} stages"
        rows.append(row)
        if spill_bytes > MAX_SPILL_BYTES:
            spilled.append(row)
    print("\n".join(rows))
    assert rows and not spilled, "\n".join(spilled)


@pytest.mark.parametrize("mode", MODES)
def test_pointer_path_every_variant(monkeypatch, mode):
    _check(monkeypatch, ODD, mode, torch.bfloat16, expect_tma=False)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_pointer_path_other_dtypes(monkeypatch, dtype):
    _check(monkeypatch, ODD, "route-soft", DTYPES[dtype], expect_tma=False)


@pytest.mark.parametrize("mode", MODES)
def test_tma_path_every_variant(monkeypatch, mode):
    _check(monkeypatch, ALIGNED, mode, torch.bfloat16, expect_tma=_tma_expected(torch.bfloat16))


def test_tma_path_fp16(monkeypatch):
    _check(monkeypatch, ALIGNED, "route-soft", torch.float16, expect_tma=_tma_expected(torch.float16))


def test_decode_shape(monkeypatch):
    _check(monkeypatch, DECODE, "route-soft", torch.bfloat16, expect_tma=_tma_expected(torch.bfloat16))


def test_split_k_weight_gradients(monkeypatch):
    calls = record_calls(monkeypatch, "split_k")
    _check(monkeypatch, SPLIT, "route-soft", torch.bfloat16, expect_tma=_tma_expected(torch.bfloat16))
    assert [splits for _, (splits, _) in calls] == [16], calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shape_autotuned_first_call(monkeypatch, dtype):
    """T=4096, d=4096, e=1024, Route with a soft gate that requires grad (every gradient, d(route) included):
    the autotuner benchmarks every config of the size class on this very call (in-memory and disk caches
    bypassed), and the result must match the reference (d(route) was 1.4 off here when the autotuner left
    stale partial sums). Then no compiled kernel may spill registers."""
    mod = triton_module()
    monkeypatch.delenv("SCALE_KERNELS_DETERMINISTIC")
    for name in TRITON_KERNELS:
        kernel = getattr(mod, name)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "cache_results", False)
        monkeypatch.setattr(kernel, "configs_timings", None, raising=False)
    _check(monkeypatch, LARGE, "route-soft", DTYPES[dtype], expect_tma=_tma_expected(DTYPES[dtype]))
    for name in TRITON_KERNELS:
        kernel = getattr(mod, name)
        timings = kernel.configs_timings
        assert timings and len(timings) >= 2, (name, timings)  # really autotuned, on this first call
        ms = {_tile(c): round(t[0], 4) for c, t in timings.items()}
        print(f"{name} {dtype}: chose {_tile(kernel.best_config)} of (ms)", ms)
    _assert_no_spills()
