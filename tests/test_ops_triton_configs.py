"""Every Triton kernel with every tile config of its GPU list, against the fp64 reference.

The Triton interpreter (CPU) runs a single small config, so code that differs between configs (partial-sum
buffers, tile counts, masks at the last column tile) would go untested. Here each kernel is re-wrapped in a
one-config autotuner per entry of its GPU list, and the whole op runs through its real launchers on a
multi-tile shape whose widths are not multiples of the largest BLOCK_N. A second test runs the real autotuner
over several configs, first call included: no output may depend on which configs the autotuner tried.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_matches_reference, make_operands, triton_usable

pytestmark = pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")

# several column tiles for every BLOCK_N (16..256), no width a multiple of the largest BLOCK_N, several M tiles
SHAPE = dict(lead=(37,), d_in=70, e_in=300, d_out=45, e_out=261)


def _mod():
    from scale_kernels.ops import triton_upscaled_linear as mod

    return mod


def _config(tile) -> object:
    import triton

    bm, bn, bk, nw, ns = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)


def _kernel_tiles() -> list[tuple[str, tuple]]:
    mod = _mod()
    out = []
    for name in ("_forward_kernel", "_backward_input_kernel"):
        out += [(name, tile) for tile in mod.MN_TILES]
    out += [("_backward_weight_kernel", tile) for tile in mod.WEIGHT_TILES]
    return out


def _tile_id(param) -> str:
    name, (bm, bn, bk, _, _) = param
    return f"{name.strip('_').removesuffix('_kernel')}-{bm}x{bn}x{bk}"


def _with_configs(monkeypatch, name: str, configs: list, **autotune_kwargs) -> None:
    """Replace kernel ``name`` by an autotuner over ``configs`` wrapping the same jit function."""
    import triton

    mod = _mod()
    fn = getattr(mod, name).fn
    monkeypatch.setattr(mod, name, triton.autotune(configs=configs, key=["M_BUCKET"], **autotune_kwargs)(fn))


@pytest.mark.parametrize("kernel_tile", _kernel_tiles(), ids=_tile_id)
@pytest.mark.parametrize("route", ["soft", "random"])
def test_every_config_matches_reference(monkeypatch, kernel_tile, route):
    name, tile = kernel_tile
    _with_configs(monkeypatch, name, [_config(tile)])
    ops = make_operands(**SHAPE, route=route, bias=route == "soft")
    assert_matches_reference(ops, torch.float32, "triton")


def _fixed_order_bench():
    """A ``do_bench`` that runs each candidate once and ranks them in benchmarking order (the first wins), so
    the winner is the first config while later ones leave whatever they wrote in the buffers."""
    counter = itertools.count(1)

    def bench(kernel_call, quantiles=None, **_):
        kernel_call()
        t = float(next(counter))
        return [t] * len(quantiles) if quantiles else t

    return bench


@pytest.mark.parametrize("name", ["_forward_kernel", "_backward_input_kernel", "_backward_weight_kernel"])
def test_autotuning_first_call_matches_reference(monkeypatch, name):
    """The autotuner benchmarks a narrow-column config after the (winning) widest one on the very first call;
    the winner's result must not contain anything the narrow config left behind (the d(route) partial sums
    were wrong here before: the narrow config filled partial rows that the winner never overwrote)."""
    mod = _mod()
    tiles = mod.WEIGHT_TILES if name == "_backward_weight_kernel" else mod.MN_TILES
    widest = max(tiles, key=lambda t: t[1])
    narrowest = min(tiles, key=lambda t: t[1])
    _with_configs(monkeypatch, name, [_config(widest), _config(narrowest)], do_bench=_fixed_order_bench())
    ops = make_operands(**SHAPE, route="soft")
    assert_matches_reference(ops, torch.float32, "triton")
    assert getattr(mod, name).best_config.kwargs["BLOCK_N"] == widest[1]


def test_autotune_keys_cover_every_constexpr_variant():
    """Preserve / Adapt / Route and d(route) on/off compile different kernels: each needs its own tuned config."""
    mod = _mod()
    expected = {
        "_forward_kernel": {"HAS_W12", "HAS_ROUTE", "HAS_BIAS", "HAS_BIAS_UP"},
        "_backward_input_kernel": {"HAS_W12", "HAS_ROUTE", "NEED_DROUTE"},
        "_backward_weight_kernel": {"NEED_W12", "HAS_ROUTE"},
    }
    for name, flags in expected.items():
        keys = set(getattr(mod, name).keys)
        assert flags <= keys, (name, flags - keys)
