"""``triton`` backend: the fused upscaled-linear kernels and their launchers.

Three persistent kernels (grid = number of SMs, each program loops over output tiles in grouped order, as in
Triton's tutorials 09-persistent-matmul and 08-grouped-gemm), each ONE launch, none materialising the block
matrix ``[[W, W12], [W21, W22]]``:

* ``_forward_kernel``: every tile of ``[y ; y_up]``. An original-column tile accumulates ``x1 W12^T``, scales
  the fp32 accumulator by the route (exactly the reference's ``r * (W12 x1)``, NaN/inf included), then adds
  ``x0 W^T`` and the bias; an expansion-column tile accumulates ``x1 W22^T`` then ``x0 W21^T``, then ``b_up``.
* ``_backward_input_kernel``: every tile of ``dx = [dx0 ; dx1]``. ``dx1`` accumulates ``g = dy0 W12`` first,
  takes the d(route) partial sums ``<x1, g>`` from the accumulator, scales it by the route and adds ``dy1 W22``.
* ``_backward_weight_kernel``: one grouped launch over the tiles of ``dW21 = dy1^T x0``, ``dW22 = dy1^T x1``
  and ``dW12 = (r * dy0)^T x1`` (only the needed ones; ``dW`` is never computed), split over the token
  dimension when there are fewer than two tiles per SM. Split partials go to a fp32 buffer that is summed in a
  fixed order afterwards: deterministic, no atomics; the split count depends on the shape only.

Every output tile has ONE fp32 accumulator, and every kernel ONE K loop (``_accumulate_k_range``), which a
tile runs over its two K ranges (``e_in`` then ``d_in`` columns, or ``d_out`` and ``e_out``) with operands
picked at run time before the loop (``_pick``). One loop body means one set of pipeline buffers in shared
memory and one pipelined loop to compile; scaling the accumulator by the route between the two ranges is
exact and leaves the operand blocks where TMA put them (scaling x1's rows before the dot would pass them
through registers and round ``r * x1``).

Operands are read (and outputs written) through TMA tensor descriptors created on the device
(``tl.make_tensor_descriptor``) on Hopper when the layout allows it (16-bit elements, unit column stride,
16-byte aligned base and row stride: :func:`_tma_eligible`), else through masked pointer loads and stores
with arbitrary strides; only ``_operand``, ``_load_block`` and ``_store_block`` differ between the two. Under
the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) the descriptors are emulated and taken for
aligned 16-bit layouts too, one small tile config is used, and dot operands are upcast to fp32 (the
interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import backends
from .triton_rounding import INTERPRET

name = "triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# read by every dot: the interpreter's bf16/fp16 tl.dot is wrong, so it gets fp32 operands
_UPCAST_DOT = tl.constexpr(INTERPRET)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cpu" and not INTERPRET:
        return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device.type not in ("cpu", "cuda"):
        return f"the triton backend needs CUDA tensors, got device {device}"
    if dtype not in _DTYPES:
        return f"the triton backend supports float32/float16/bfloat16, got {dtype}"
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 tensor-core kernels need a GPU of compute capability >= 8.0 (Ampere or newer)"
    return None


# ----------------------------------------------------------------------------------------------------------
# tile configs and autotuning

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel family and size class: 16-bit operands with
# at most DECODE_MAX_TOKENS tokens ("decode") or more ("prefill"), and fp32 operands (any size; fp32 dots
# without TF32 run on CUDA cores, and larger tiles spill there). The first tile of each class is the pinned
# config of the deterministic mode. Register use from ptxas for sm_90 (tests/triton_sm90_compile.py --all:
# every tile and variant, triton 3.6 and 3.9): on the TMA path no spill (128x256 holds its one fp32
# accumulator in at most 166 registers per thread; the old two-accumulator kernels spilled 424+ bytes there);
# on the pointer path at most 24 bytes in a few tiles, and 344 bytes at 128x256 with d(route), which the
# pruner therefore skips.
DECODE_MAX_TOKENS = 64
MN_TILES = {  # forward and dx: output (tokens x features), K = features
    "prefill": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)],
    # few tokens: narrow column tiles keep every SM streaming its own weight columns
    "decode": [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (32, 128, 64, 8, 4)],
    "fp32": [(64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (32, 32, 32, 4, 2)],
}
WEIGHT_TILES = {  # weight gradients: output (weight rows x weight columns), K = tokens
    "prefill": [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4)],
    "decode": [(64, 64, 32, 4, 2), (128, 128, 32, 8, 2)],
    "fp32": [(64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (32, 32, 32, 4, 2)],
}
GROUP_SIZE_M = 8
_INTERPRETER_TILE = (32, 32, 32, 1, 1)
_ALL_TILES = [t for tiles in (*MN_TILES.values(), *WEIGHT_TILES.values(), [_INTERPRETER_TILE]) for t in tiles]
# d(route) partial sums are kept per block of DROUTE_COLS expansion columns, the smallest BLOCK_N of any
# config: every config writes every row of the partial buffer, so no result depends on which configs the
# autotuner tried
DROUTE_COLS = min(t[1] for t in _ALL_TILES)
# split-K over tokens: each split covers a multiple of SPLIT_K_TOKENS tokens, a multiple of every BLOCK_K, so
# no K block straddles two splits (TMA loads cannot be masked at a split boundary)
SPLIT_K_TOKENS = 256
MAX_SPLIT_K = 16
assert all(SPLIT_K_TOKENS % t[2] == 0 and t[1] % DROUTE_COLS == 0 for t in _ALL_TILES)
# persistent programs per launch under the interpreter: fewer than the tiles of the test shapes, so the tile
# loop runs several tiles per program
INTERPRETER_NUM_SMS = 4


def _config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    bm, bn, bk, nw, ns = tile
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_SIZE_M": GROUP_SIZE_M}
    return triton.Config(kwargs, num_warps=nw, num_stages=ns)


def deterministic() -> bool:
    """Whether to skip autotuning and always use each kernel's first config for the call's size class.

    The kernels are bitwise deterministic for a fixed config (no atomics; split-K partials are summed in a
    fixed order and the split count depends on the shape only), but the autotuner may pick a different tile
    shape (so a different summation order) in another process. Set ``SCALE_KERNELS_DETERMINISTIC=1`` or
    ``torch.use_deterministic_algorithms(True)`` before the first call for results that are bitwise identical
    across processes on the same GPU.
    """
    return os.environ.get("SCALE_KERNELS_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _first_config_if_deterministic(configs: list) -> list:
    return configs[:1] if deterministic() else configs


def _shared_memory_bytes(config: triton.Config, element_size: int, use_tma: bool) -> int:
    """Lower bound of a config's shared memory: the pipeline buffers of A and B blocks, and with TMA the
    staging block of the output store (which the d(route) x_up block reuses)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (config.num_stages * (bm + bn) * bk + (bm * bn if use_tma else 0)) * element_size


def _fitting_shared_memory(configs: list, operand: torch.Tensor, use_tma: bool) -> list:
    """Drop configs that exceed the device's shared memory (they would fail to compile; dropping them saves
    the compile). Keeps the smallest if none fits."""
    if INTERPRET:
        return configs
    limit = device_facts(operand.device.index).max_shared_memory
    size = operand.element_size()
    fitting = [c for c in configs if _shared_memory_bytes(c, size, use_tma) <= limit]
    return fitting or [min(configs, key=lambda c: _shared_memory_bytes(c, size, use_tma))]


def _pruner(tiles: dict[str, list]):
    """``early_config_prune`` for one kernel family: the configs of the call's size class (by operand dtype
    and token count M: the only place M's size matters, see M_BUCKET), without 256-wide column tiles when
    d(route) is computed, that fit shared memory; the first one only in the deterministic mode. Configs
    outside the family's lists (the interpreter's, or those a test wraps the kernel in) are all kept."""
    classes = {size_class: [_config(t).all_kwargs() for t in class_tiles] for size_class, class_tiles in tiles.items()}

    def prune(configs, named_args, **kwargs):
        operand = next(iter(named_args.values()))  # x or dy
        if operand.element_size() == 4:
            size_class = "fp32"
        else:
            size_class = "decode" if named_args["M"] <= DECODE_MAX_TOKENS else "prefill"
        chosen = [c for c in configs if c.all_kwargs() in classes[size_class]] or configs
        if kwargs.get("NEED_DROUTE"):
            chosen = [c for c in chosen if c.kwargs["BLOCK_N"] <= 128] or chosen
        chosen = _fitting_shared_memory(chosen, operand, kwargs["USE_TMA"])
        return _first_config_if_deterministic(chosen)

    return prune


def _quick_bench(kernel_call, quantiles=None):
    """The autotuner's timer, shortened (5 ms warm-up, 25 ms of runs per config): a new shape then costs about
    0.3 s of benchmarking for the three kernels once compiled."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_AUTOTUNE_PARAMETERS = inspect.signature(triton.autotune).parameters
# tuned configs cached on disk (triton's cache dir) where this triton supports it, so a new process does not
# benchmark again; the cache is keyed by the tuning key, the config list and the kernel source
_AUTOTUNE_OPTIONS = {
    option: value
    for option, value in (("cache_results", True), ("do_bench", _quick_bench))
    if option in _AUTOTUNE_PARAMETERS
}


def _autotune(tiles: dict[str, list], key: list[str]):
    """``triton.autotune`` over every tile of ``tiles`` (one small config under the interpreter), pruned per
    call by :func:`_pruner`; ``key`` must name every constexpr that is not a tile parameter."""
    configs = [_config(t) for t in ([_INTERPRETER_TILE] if INTERPRET else sum(tiles.values(), []))]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _pruner(tiles)}, **_AUTOTUNE_OPTIONS
    )


def _metadata(kernel_name: str, flops):
    """``launch_metadata`` for profilers (proton): the call's sizes, FLOP count and compulsory bytes."""

    def metadata(grid, kernel, args):
        m, d_in, e_in, d_out, e_out = (args[k] for k in ("M", "D_IN", "E_IN", "D_OUT", "E_OUT"))
        size = next(iter(args.values())).element_size()
        # read x or dy and the weights once, write the output once (a lower bound)
        elements = m * (d_in + e_in + d_out + e_out) + (d_in + e_in) * (d_out + e_out)
        return {
            "name": f"{kernel_name} [M={m}, d_in={d_in}, e_in={e_in}, d_out={d_out}, e_out={e_out}]",
            f"flops{8 * size}": flops(args, m, d_in, e_in, d_out, e_out),
            "bytes": size * elements,
        }

    return metadata


def _forward_flops(args, m, d_in, e_in, d_out, e_out) -> int:
    return 2 * m * (d_out * (d_in + e_in * bool(args["HAS_W12"])) + e_out * (d_in + e_in))


def _backward_input_flops(args, m, d_in, e_in, d_out, e_out) -> int:
    return 2 * m * (d_in * (d_out + e_out) + e_in * (d_out * bool(args["HAS_W12"]) + e_out))


def _backward_weight_flops(args, m, d_in, e_in, d_out, e_out) -> int:
    need = [bool(args[k]) for k in ("NEED_W21", "NEED_W22", "NEED_W12")]
    return 2 * m * (e_out * (d_in * need[0] + e_in * need[1]) + d_out * e_in * need[2])


# ----------------------------------------------------------------------------------------------------------
# device helpers shared by the kernels


@triton.jit
def _operand(matrix, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """A 2-D ``matrix = (ptr, n_rows, n_cols, stride_row, stride_col)`` in its storage orientation as an operand
    read or written in ``BLOCK_ROWS x BLOCK_COLS`` blocks: a TMA descriptor (USE_TMA: the launcher checked a
    unit column stride and a 16-byte aligned base and row stride), else the tuple itself (pointer access).
    An empty matrix (an LM head's expansion outputs, a layer whose input is not widened) is never accessed:
    its descriptor gets a nominal extent of 1 to stay well-formed."""
    if USE_TMA:
        ptr, n_rows, n_cols, stride_row, stride_col = matrix
        shape = [tl.maximum(n_rows, 1), tl.maximum(n_cols, 1)]
        return tl.make_tensor_descriptor(
            ptr, shape=shape, strides=[stride_row, 1], block_shape=[BLOCK_ROWS, BLOCK_COLS]
        )
    else:
        return matrix


@triton.jit
def _weight_operands(w, w12, w21, w22, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, HAS_W12: tl.constexpr,
                     USE_TMA: tl.constexpr):  # fmt: skip
    """The four weight matrices as operands (see ``_operand``). Without W12, W22 stands in for it: the W12
    term's K range is then empty, so it is never read."""
    w22_operand = _operand(w22, BLOCK_ROWS, BLOCK_COLS, USE_TMA)
    if HAS_W12:
        w12_operand = _operand(w12, BLOCK_ROWS, BLOCK_COLS, USE_TMA)
    else:
        w12_operand = w22_operand
    w_operand = _operand(w, BLOCK_ROWS, BLOCK_COLS, USE_TMA)
    return w_operand, w12_operand, _operand(w21, BLOCK_ROWS, BLOCK_COLS, USE_TMA), w22_operand


@triton.jit
def _pick(condition, if_true, if_false):
    """``if_true`` or ``if_false`` (operands, pointers or sizes) by a run-time condition. Selecting the operand
    before a K loop, instead of branching around loops, keeps one pipelined K loop per kernel."""
    if condition:
        chosen = if_true
    else:
        chosen = if_false
    return chosen


@triton.jit
def _load_block(operand, row0, col0, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """The block of ``operand`` at ``(row0, col0)``; entries outside the matrix read as zero."""
    if USE_TMA:
        return operand.load([row0, col0])
    else:
        ptr, n_rows, n_cols, stride_row, stride_col = operand
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        cols = col0 + tl.arange(0, BLOCK_COLS)
        ptrs = ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_block(operand, row0, col0, block, USE_TMA: tl.constexpr):
    """Store ``block`` (already in the matrix's dtype) at ``(row0, col0)``; entries outside the matrix are
    dropped."""
    if USE_TMA:
        operand.store([row0, col0], block)
    else:
        ptr, n_rows, n_cols, stride_row, stride_col = operand
        rows = row0 + tl.arange(0, block.shape[0])
        cols = col0 + tl.arange(0, block.shape[1])
        ptrs = ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
        tl.store(ptrs, block, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _load_vector(ptr, start, n, BLOCK: tl.constexpr, other: tl.constexpr = 0.0):
    """``v[start : start + BLOCK]`` of a contiguous vector of length ``n`` as fp32, ``other`` past its end."""
    offs = start + tl.arange(0, BLOCK)
    return tl.load(ptr + offs, mask=offs < n, other=other).to(tl.float32)


@triton.jit
def _accumulate_k_range(acc, a, b, off_m, off_n, k_lo, k_hi, k_scale_ptr, k_scale_end, A_IS_KM: tl.constexpr,
                        B_IS_NK: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
                        PRECISION: tl.constexpr):  # fmt: skip
    """``acc[i, j] += sum_{k_lo <= k < k_hi} A[off_m + i, k] * s[k] * B[k, off_n + j]`` for the
    ``(BLOCK_M, BLOCK_N)`` fp32 accumulator ``acc``: the K loop of every kernel.

    ``a`` holds A as stored: ``(M, K)``, or ``(K, M)`` if A_IS_KM (an activation read transposed); ``b`` holds
    B: ``(K, N)``, or ``(N, K)`` if B_IS_NK (a weight in ``nn.Linear`` layout). ``s[k]`` is the vector at
    ``k_scale_ptr`` for ``k < k_scale_end`` and 1 past it, or 1 if ``k_scale_ptr`` is None; it pre-scales A's
    columns, rounded to A's dtype like PyTorch's ``r * dy``. ``k_lo`` is a multiple of BLOCK_K; entries past
    the matrices read as zero.
    """
    BLOCK_M: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    for k in range(k_lo, k_hi, BLOCK_K):
        k0 = tl.multiple_of(k, BLOCK_K)
        if A_IS_KM:
            a_block = _load_block(a, k0, off_m, BLOCK_K, BLOCK_M, USE_TMA).T
        else:
            a_block = _load_block(a, off_m, k0, BLOCK_M, BLOCK_K, USE_TMA)
        if B_IS_NK:
            b_block = _load_block(b, off_n, k0, BLOCK_N, BLOCK_K, USE_TMA).T
        else:
            b_block = _load_block(b, k0, off_n, BLOCK_K, BLOCK_N, USE_TMA)
        if k_scale_ptr is not None:
            scale = _load_vector(k_scale_ptr, k0, k_scale_end, BLOCK_K, other=1.0)
            a_block = (a_block.to(tl.float32) * scale[None, :]).to(b_block.dtype)
        if _UPCAST_DOT:
            a_block = a_block.to(tl.float32)
            b_block = b_block.to(tl.float32)
        acc = tl.dot(a_block, b_block, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_tile(tile, tiles_m, tiles_n, GROUP_SIZE_M: tl.constexpr):
    """``(pid_m, pid_n)`` of tile number ``tile`` of a ``tiles_m x tiles_n`` grid in grouped order (tutorials
    03 and 09): GROUP_SIZE_M row tiles share a column before the next column, so the tiles running at the same
    time reuse their operand blocks from L2."""
    tiles_per_group = GROUP_SIZE_M * tiles_n
    first_m = (tile // tiles_per_group) * GROUP_SIZE_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _two_block_tile_count(M, N_LEFT, N_RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles of an ``M x (N_LEFT | N_RIGHT)`` output whose two column blocks (original features, expansion)
    are tiled separately."""
    return tl.cdiv(M, BLOCK_M) * (tl.cdiv(N_LEFT, BLOCK_N) + tl.cdiv(N_RIGHT, BLOCK_N))


@triton.jit
def _two_block_tile(tile, M, N_LEFT, N_RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_SIZE_M: tl.constexpr):  # fmt: skip
    """Tile ``tile`` of such an output in grouped order: its row offset, its column offset within its block,
    and whether it is in the left block."""
    tiles_left = tl.cdiv(N_LEFT, BLOCK_N)
    tiles_n = tiles_left + tl.cdiv(N_RIGHT, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tiles_n, GROUP_SIZE_M)
    left = pid_n < tiles_left
    return pid_m * BLOCK_M, tl.where(left, pid_n, pid_n - tiles_left) * BLOCK_N, left


@triton.jit
def _route_scaled(acc, route_ptr, off_m, M, apply, HAS_ROUTE: tl.constexpr):
    """``acc`` with row m scaled by the route ``r[off_m + m]`` if ``apply`` (a run-time flag), exactly (fp32,
    NaN and inf propagate like the reference's ``r * term``); ``acc`` itself otherwise or without a route."""
    if HAS_ROUTE:
        if apply:
            acc = acc * _load_vector(route_ptr, off_m, M, acc.shape[0])[:, None]
    return acc


# fmt: off
# ----------------------------------------------------------------------------------------------------------
# forward


@_autotune(MN_TILES, key=[
    "M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT",
    "HAS_W12", "HAS_ROUTE", "HAS_BIAS", "HAS_BIAS_UP", "USE_TMA", "PRECISION", "NUM_SMS",
])
@triton.jit(launch_metadata=_metadata("upscaled_linear_forward", _forward_flops), do_not_specialize=["M_BUCKET"])
def _forward_kernel(
    x_ptr, w_ptr, w12_ptr, w21_ptr, w22_ptr, bias_ptr, bias_up_ptr, route_ptr, y_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT,
    M_BUCKET,  # power-of-two bucket of M: only part of the autotuning key, never read by the kernel
    stride_x_row, stride_x_col, stride_y_row, stride_y_col,
    stride_w_row, stride_w_col, stride_w12_row, stride_w12_col,
    stride_w21_row, stride_w21_col, stride_w22_row, stride_w22_col,
    HAS_W12: tl.constexpr, HAS_ROUTE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_UP: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    """y (M, D_OUT + E_OUT) = [r * (x1 W12^T) + x0 W^T + b ; x1 W22^T + x0 W21^T + b_up], x = [x0 | x1].

    Every tile runs two K ranges into one accumulator: x1 against W12 (original columns; then the accumulator
    is scaled by the route) or W22, then x0 against W or W21."""
    x0 = _operand((x_ptr, M, D_IN, stride_x_row, stride_x_col), BLOCK_M, BLOCK_K, USE_TMA)
    x1 = _operand((x_ptr + D_IN * stride_x_col, M, E_IN, stride_x_row, stride_x_col), BLOCK_M, BLOCK_K, USE_TMA)
    w, w12, w21, w22 = _weight_operands(
        (w_ptr, D_OUT, D_IN, stride_w_row, stride_w_col), (w12_ptr, D_OUT, E_IN, stride_w12_row, stride_w12_col),
        (w21_ptr, E_OUT, D_IN, stride_w21_row, stride_w21_col), (w22_ptr, E_OUT, E_IN, stride_w22_row, stride_w22_col),
        BLOCK_N, BLOCK_K, HAS_W12, USE_TMA)
    y0 = _operand((y_ptr, M, D_OUT, stride_y_row, stride_y_col), BLOCK_M, BLOCK_N, USE_TMA)
    y1 = _operand((y_ptr + D_OUT * stride_y_col, M, E_OUT, stride_y_row, stride_y_col), BLOCK_M, BLOCK_N, USE_TMA)
    for tile in range(tl.program_id(0), _two_block_tile_count(M, D_OUT, E_OUT, BLOCK_M, BLOCK_N), NUM_SMS):
        # orig: a tile of y0, else of y1
        off_m, off_n, orig = _two_block_tile(tile, M, D_OUT, E_OUT, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for phase in range(2):
            first = phase == 0
            a = _pick(first, x1, x0)
            b = _pick(orig, _pick(first, w12, w), _pick(first, w22, w21))
            k_end = tl.where(first, tl.where(orig, E_IN if HAS_W12 else 0, E_IN), D_IN)
            acc = _accumulate_k_range(acc, a, b, off_m, off_n, 0, k_end, None, 0, A_IS_KM=False, B_IS_NK=True,
                                      BLOCK_K=BLOCK_K, USE_TMA=USE_TMA, PRECISION=PRECISION)
            acc = _route_scaled(acc, route_ptr, off_m, M, first & orig, HAS_ROUTE)  # r * (x1 W12^T), then x0 W^T
        if HAS_BIAS or HAS_BIAS_UP:
            n_bias = tl.where(orig, D_OUT if HAS_BIAS else 0, E_OUT if HAS_BIAS_UP else 0)
            acc = acc + _load_vector(_pick(orig, bias_ptr, bias_up_ptr), off_n, n_bias, BLOCK_N)[None, :]
        _store_block(_pick(orig, y0, y1), off_m, off_n, acc.to(y_ptr.dtype.element_ty), USE_TMA)


# ----------------------------------------------------------------------------------------------------------
# backward: dx (and droute)


@_autotune(MN_TILES, key=[
    "M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT",
    "HAS_W12", "HAS_ROUTE", "NEED_DROUTE", "DROUTE_COLS", "USE_TMA", "PRECISION", "NUM_SMS",
])
@triton.jit(launch_metadata=_metadata("upscaled_linear_backward_input", _backward_input_flops),
            do_not_specialize=["M_BUCKET"])
def _backward_input_kernel(
    dy_ptr, x_ptr, w_ptr, w12_ptr, w21_ptr, w22_ptr, route_ptr, dx_ptr, droute_part_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT,
    M_BUCKET,  # power-of-two bucket of M: only part of the autotuning key, never read by the kernel
    stride_dy_row, stride_dy_col, stride_x_row, stride_x_col, stride_dx_row, stride_dx_col,
    stride_w_row, stride_w_col, stride_w12_row, stride_w12_col,
    stride_w21_row, stride_w21_col, stride_w22_row, stride_w22_col,
    HAS_W12: tl.constexpr, HAS_ROUTE: tl.constexpr, NEED_DROUTE: tl.constexpr, DROUTE_COLS: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    """dx (M, D_IN + E_IN) = [dy1 W21 + dy0 W ; r * (dy0 W12) + dy1 W22]; droute partials (cdiv(E_IN, DROUTE_COLS), M).

    Every tile runs two K ranges into one accumulator: dy1 W21 then dy0 W (original columns), or g = dy0 W12,
    then the d(route) partial sums of <x1, g> and the route scaling, then dy1 W22 (expansion columns).
    Partial row p holds ``sum_{c in block p} x1[m, c] * g[m, c]`` over the p-th block of DROUTE_COLS expansion
    columns. A tile of BLOCK_N columns writes its BLOCK_N // DROUTE_COLS rows, so every config writes every row
    and the buffer never holds a stale value from another config."""
    dy0 = _operand((dy_ptr, M, D_OUT, stride_dy_row, stride_dy_col), BLOCK_M, BLOCK_K, USE_TMA)
    dy1 = _operand((dy_ptr + D_OUT * stride_dy_col, M, E_OUT, stride_dy_row, stride_dy_col), BLOCK_M, BLOCK_K,
                   USE_TMA)
    w, w12, w21, w22 = _weight_operands(
        (w_ptr, D_OUT, D_IN, stride_w_row, stride_w_col), (w12_ptr, D_OUT, E_IN, stride_w12_row, stride_w12_col),
        (w21_ptr, E_OUT, D_IN, stride_w21_row, stride_w21_col), (w22_ptr, E_OUT, E_IN, stride_w22_row, stride_w22_col),
        BLOCK_K, BLOCK_N, HAS_W12, USE_TMA)
    dx0 = _operand((dx_ptr, M, D_IN, stride_dx_row, stride_dx_col), BLOCK_M, BLOCK_N, USE_TMA)
    dx1 = _operand((dx_ptr + D_IN * stride_dx_col, M, E_IN, stride_dx_row, stride_dx_col), BLOCK_M, BLOCK_N,
                   USE_TMA)
    if NEED_DROUTE:
        x1 = _operand((x_ptr + D_IN * stride_x_col, M, E_IN, stride_x_row, stride_x_col), BLOCK_M, BLOCK_N,
                      USE_TMA)
    for tile in range(tl.program_id(0), _two_block_tile_count(M, D_IN, E_IN, BLOCK_M, BLOCK_N), NUM_SMS):
        # orig: a tile of dx0, else of dx1
        off_m, off_n, orig = _two_block_tile(tile, M, D_IN, E_IN, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for phase in range(2):
            first = phase == 0
            a = _pick(first == orig, dy1, dy0)
            b = _pick(orig, _pick(first, w21, w), _pick(first, w12, w22))
            k_end = tl.where(first == orig, E_OUT, tl.where(orig, D_OUT, D_OUT if HAS_W12 else 0))
            acc = _accumulate_k_range(acc, a, b, off_m, off_n, 0, k_end, None, 0, A_IS_KM=False, B_IS_NK=False,
                                      BLOCK_K=BLOCK_K, USE_TMA=USE_TMA, PRECISION=PRECISION)
            if NEED_DROUTE:
                if first & ~orig:  # acc = g = dy0 W12
                    x1_block = _load_block(x1, off_m, off_n, BLOCK_M, BLOCK_N, USE_TMA).to(tl.float32)
                    SUB: tl.constexpr = BLOCK_N // DROUTE_COLS
                    part = tl.sum(tl.reshape(x1_block * acc, (BLOCK_M, SUB, DROUTE_COLS)), axis=2)
                    parts = (droute_part_ptr, M, tl.cdiv(E_IN, DROUTE_COLS), 1, M)  # partial p of token m at p * M + m
                    _store_block(parts, off_m, off_n // DROUTE_COLS, part, False)
            acc = _route_scaled(acc, route_ptr, off_m, M, first & ~orig, HAS_ROUTE)  # r * (dy0 W12), then dy1 W22
        _store_block(_pick(orig, dx0, dx1), off_m, off_n, acc.to(dx_ptr.dtype.element_ty), USE_TMA)


# ----------------------------------------------------------------------------------------------------------
# backward: trainable weight gradients (grouped, split over tokens)


@_autotune(WEIGHT_TILES, key=[
    "M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT", "SPLIT_K",
    "NEED_W21", "NEED_W22", "NEED_W12", "HAS_ROUTE", "USE_TMA", "PRECISION", "NUM_SMS",
])
@triton.jit(launch_metadata=_metadata("upscaled_linear_backward_weight", _backward_weight_flops),
            do_not_specialize=["M_BUCKET"])
def _backward_weight_kernel(
    dy_ptr, x_ptr, route_ptr, dw21_ptr, dw22_ptr, dw12_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT,
    M_BUCKET,  # power-of-two bucket of M: only part of the autotuning key, never read by the kernel
    SPLIT_K, K_PER_SPLIT,
    stride_dy_row, stride_dy_col, stride_x_row, stride_x_col,
    stride_dw21_split, stride_dw21_row, stride_dw22_split, stride_dw22_row, stride_dw12_split, stride_dw12_row,
    NEED_W21: tl.constexpr, NEED_W22: tl.constexpr, NEED_W12: tl.constexpr, HAS_ROUTE: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    """dW21 = dy1^T x0, dW22 = dy1^T x1, dW12 = (r * dy0)^T x1 (the NEED_* ones), K = tokens.

    The tiles of the three gradients form one list per split; split s covers tokens
    [s * K_PER_SPLIT, min((s + 1) * K_PER_SPLIT, M)) and writes slice s of its gradient (``out + s *
    stride_split``: fp32 partials summed by the launcher when SPLIT_K > 1, else the gradient itself). A tile's
    weight rows are columns of dy (from D_OUT for dy1) and its weight columns columns of x (from D_IN for x1),
    read through one operand each; rows/columns past a gradient's edge are computed from the neighbouring block
    and dropped at the store."""
    dy = _operand((dy_ptr, M, D_OUT + E_OUT, stride_dy_row, stride_dy_col), BLOCK_K, BLOCK_M, USE_TMA)
    x = _operand((x_ptr, M, D_IN + E_IN, stride_x_row, stride_x_col), BLOCK_K, BLOCK_N, USE_TMA)
    tiles_up_rows = tl.cdiv(E_OUT, BLOCK_M)
    tiles_21 = tiles_up_rows * tl.cdiv(D_IN, BLOCK_N) if NEED_W21 else 0
    tiles_22 = tiles_up_rows * tl.cdiv(E_IN, BLOCK_N) if NEED_W22 else 0
    tiles_12 = tl.cdiv(D_OUT, BLOCK_M) * tl.cdiv(E_IN, BLOCK_N) if NEED_W12 else 0
    tiles_per_split = tiles_21 + tiles_22 + tiles_12
    for tile in range(tl.program_id(0), SPLIT_K * tiles_per_split, NUM_SMS):
        split = tile // tiles_per_split
        t = tile % tiles_per_split
        is_21 = t < tiles_21
        is_up = t < tiles_21 + tiles_22  # dW21 or dW22: rows from dy1, no route
        n_rows = tl.where(is_up, E_OUT, D_OUT)
        n_cols = tl.where(is_21, D_IN, E_IN)
        first_tile = tl.where(is_21, 0, tl.where(is_up, tiles_21, tiles_21 + tiles_22))
        pid_m, pid_n = _grouped_tile(t - first_tile, tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_N),
                                     GROUP_SIZE_M)
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate_k_range(
            acc, dy, x, tl.where(is_up, D_OUT, 0) + pid_m * BLOCK_M, tl.where(is_21, 0, D_IN) + pid_n * BLOCK_N,
            k_lo, k_hi, route_ptr if HAS_ROUTE else None, tl.where(is_up, 0, k_hi),  # the route scales dW12's dy0
            A_IS_KM=True, B_IS_NK=False, BLOCK_K=BLOCK_K, USE_TMA=USE_TMA, PRECISION=PRECISION)
        dw21 = (dw21_ptr + split * stride_dw21_split, E_OUT, D_IN, stride_dw21_row, 1)
        dw22 = (dw22_ptr + split * stride_dw22_split, E_OUT, E_IN, stride_dw22_row, 1)
        dw12 = (dw12_ptr + split * stride_dw12_split, D_OUT, E_IN, stride_dw12_row, 1)
        out = _pick(is_21, dw21, _pick(is_up, dw22, dw12))
        _store_block(out, pid_m * BLOCK_M, pid_n * BLOCK_N, acc.to(dw21_ptr.dtype.element_ty), False)


# fmt: on
# ----------------------------------------------------------------------------------------------------------
# launchers (host work per call: plain int arithmetic, cached device facts)


class DeviceFacts(NamedTuple):
    num_sms: int
    has_tma: bool  # Hopper (compute capability 9.x)
    max_shared_memory: int  # bytes per block (the opt-in maximum)


@functools.cache
def device_facts(index: int) -> DeviceFacts:
    """What the launchers (and the config pruner) need of CUDA device ``index`` (a tensor's ``device.index``),
    queried once per device."""
    props = torch.cuda.get_device_properties(index)
    max_shared_memory = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceFacts(props.multi_processor_count, props.major == 9, max_shared_memory)


def _num_sms(device: torch.device) -> int:
    """Persistent programs per launch: the device's SM count."""
    return device_facts(device.index).num_sms if device.type == "cuda" else INTERPRETER_NUM_SMS


def _device_has_tma(device: torch.device) -> bool:
    """Hopper on a GPU; the interpreter emulates descriptors on the CPU."""
    return device_facts(device.index).has_tma if device.type == "cuda" else INTERPRET


# SCALE_KERNELS_TRITON_TMA=0 forces the pointer path (a debugging switch; read once at import)
TMA_ENABLED = os.environ.get("SCALE_KERNELS_TRITON_TMA", "1") != "0"


def _tma_eligible(device: torch.device, *matrices: tuple[torch.Tensor, int]) -> bool:
    """Whether every ``(tensor, first_col)`` (its columns from ``first_col`` on, possibly none) can be a TMA
    descriptor: 16-bit elements (fp32 runs on the pointer path: its dots read registers, and TMA tiles of
    4-byte elements outgrow shared memory), unit column stride, 16-byte aligned start and row stride."""
    if not (TMA_ENABLED and _device_has_tma(device)) or matrices[0][0].element_size() != 2:
        return False
    for t, first_col in matrices:
        size = t.element_size()
        stride_row, stride_col = t.stride()
        if stride_col != 1 or stride_row < t.shape[1] or (stride_row * size) % 16:
            return False
        if (t.data_ptr() + first_col * size) % 16:
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors the kernels create on the device (128 bytes each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _prepare_tma(use_tma: bool) -> None:
    # triton's allocator is a context variable: set it for the thread that launches (autograd runs backward
    # in its own threads), replacing a user's allocator there by this equivalent one
    if use_tma and not INTERPRET:
        triton.set_allocator(_tma_scratch)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting (TF32 only if the user allowed it); halves use tensor cores."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Kernels need a pointer even for absent operands (never dereferenced: a constexpr flag is off)."""
    return fallback if t is None else t


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _persistent_grid(num_sms: int, M: int, n_left: int, n_right: int):
    """min(SMs, tiles) programs over M-tiles x (tiles of the left column block + tiles of the right one)."""

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (min(num_sms, _cdiv(M, meta["BLOCK_M"]) * (_cdiv(n_left, bn) + _cdiv(n_right, bn))),)

    return grid


def forward(x, w, w21, w22, w12, bias, bias_up, route) -> torch.Tensor:
    """``(M, d_in + e_in) -> (M, d_out + e_out)`` in one launch."""
    M = x.shape[0]
    d_out, d_in = w.shape
    e_out, e_in = w22.shape
    y = torch.empty(M, d_out + e_out, dtype=x.dtype, device=x.device)
    if M == 0 or d_out + e_out == 0:
        return y
    has_w12 = w12 is not None and e_in > 0
    weights = [(w, 0), (w21, 0), (w22, 0)] + ([(w12, 0)] if has_w12 else [])
    use_tma = _tma_eligible(x.device, (x, 0), (x, d_in), (y, 0), (y, d_out), *weights)
    _prepare_tma(use_tma)
    num_sms = _num_sms(x.device)
    _forward_kernel[_persistent_grid(num_sms, M, d_out, e_out)](
        x, w, _or(w12, w), w21, w22, _or(bias, w), _or(bias_up, w), _or(route, w), y,
        M, d_in, e_in, d_out, e_out, backends.token_bucket(M),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        *_strides(w), *_strides(w12), *_strides(w21), *_strides(w22),
        HAS_W12=has_w12, HAS_ROUTE=route is not None,
        HAS_BIAS=bias is not None, HAS_BIAS_UP=bias_up is not None,
        USE_TMA=use_tma, PRECISION=_precision(x.dtype), NUM_SMS=num_sms,
    )  # fmt: skip
    return y


def backward_input(dy, x, w, w21, w22, w12, route, need_droute: bool):
    """``dx (M, d_in + e_in)`` in one launch, and ``droute (M,)`` (fp32) from its per-tile partial sums."""
    M = dy.shape[0]
    d_out, d_in = w.shape
    e_out, e_in = w22.shape
    dx = torch.empty(M, d_in + e_in, dtype=dy.dtype, device=dy.device)
    has_w12 = w12 is not None and e_in > 0
    # partial droute sums, one row per block of DROUTE_COLS expansion columns, each written by the kernel (see
    # there). An empty W12 term (e_in == 0 or d_out == 0) has droute exactly 0, whatever x holds (x_up may be
    # NaN: the reference never multiplies it).
    n_parts = _cdiv(e_in, DROUTE_COLS) if need_droute and has_w12 and d_out > 0 else 0
    parts = torch.empty(n_parts, M, dtype=torch.float32, device=dy.device)
    if M > 0 and d_in + e_in > 0:
        weights = [(w, 0), (w21, 0), (w22, 0)] + ([(w12, 0)] if has_w12 else [])
        activations = [(dy, 0), (dy, d_out), (dx, 0), (dx, d_in)] + ([(x, d_in)] if n_parts else [])
        use_tma = _tma_eligible(dy.device, *activations, *weights)
        _prepare_tma(use_tma)
        num_sms = _num_sms(dy.device)
        _backward_input_kernel[_persistent_grid(num_sms, M, d_in, e_in)](
            dy, _or(x, dy), w, _or(w12, w), w21, w22, _or(route, w), dx, parts,
            M, d_in, e_in, d_out, e_out, backends.token_bucket(M),
            dy.stride(0), dy.stride(1), *_strides(x), dx.stride(0), dx.stride(1),
            *_strides(w), *_strides(w12), *_strides(w21), *_strides(w22),
            HAS_W12=has_w12, HAS_ROUTE=route is not None, NEED_DROUTE=n_parts > 0, DROUTE_COLS=DROUTE_COLS,
            USE_TMA=use_tma, PRECISION=_precision(dy.dtype), NUM_SMS=num_sms,
        )  # fmt: skip
    return dx, (parts.sum(dim=0) if need_droute else None)  # no rows (empty W12 term): exactly 0


def split_k(M: int, weight_tiles: int, num_sms: int) -> tuple[int, int]:
    """``(splits, tokens per split)`` of the weight-gradient launch, from the shape alone (never from timing).

    ``weight_tiles`` counts the output tiles at 128 x 128. Below two tiles per SM the M tokens are cut into up
    to MAX_SPLIT_K ranges of a multiple of SPLIT_K_TOKENS tokens (so no K block straddles two), enough for
    about two tiles per SM."""
    splits = min(_cdiv(2 * num_sms, max(weight_tiles, 1)), _cdiv(M, SPLIT_K_TOKENS), MAX_SPLIT_K)
    per_split = _cdiv(_cdiv(M, max(splits, 1)), SPLIT_K_TOKENS) * SPLIT_K_TOKENS
    return max(_cdiv(M, per_split), 1), per_split


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    """``(dW21, dW22, dW12)`` (None where not needed) in one grouped launch. Never computes dW."""
    M = dy.shape[0]
    e_out = dy.shape[1] - d_out
    e_in = x.shape[1] - d_in
    shapes = {"w21": (e_out, d_in), "w22": (e_out, e_in), "w12": (d_out, e_in)}
    wanted = {"w21": need_w21, "w22": need_w22, "w12": need_w12}
    grads = {k: torch.empty(shapes[k], dtype=dy.dtype, device=dy.device) if wanted[k] else None for k in shapes}
    if M == 0:  # no tokens: the gradients are exactly zero
        return tuple(None if g is None else g.zero_() for g in grads.values())
    # a gradient without elements needs no tiles
    launch = {k: wanted[k] and shapes[k][0] * shapes[k][1] > 0 for k in shapes}
    if not any(launch.values()):
        return tuple(grads.values())
    num_sms = _num_sms(dy.device)
    tiles_128 = sum(_cdiv(r, 128) * _cdiv(c, 128) for k, (r, c) in shapes.items() if launch[k])
    splits, per_split = split_k(M, tiles_128, num_sms)
    # outputs: the gradients, or (splits, rows, cols) fp32 partial sums reduced below
    outs = {k: torch.empty(splits, *shapes[k], dtype=torch.float32, device=dy.device) if splits > 1 else g
            for k, g in grads.items() if launch[k]}  # fmt: skip
    placeholder = next(iter(outs.values()))
    out = {k: outs.get(k, placeholder) for k in shapes}
    split_stride = {k: t.stride(0) if splits > 1 else 0 for k, t in out.items()}
    # one descriptor each over dy and x, read at column offsets d_out and d_in (which must be 16-byte aligned)
    use_tma = _tma_eligible(dy.device, (dy, 0), (dy, d_out), (x, 0), (x, d_in))
    _prepare_tma(use_tma)

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        tiles = sum(_cdiv(r, bm) * _cdiv(c, bn) for k, (r, c) in shapes.items() if launch[k])
        return (min(num_sms, splits * tiles),)

    _backward_weight_kernel[grid](
        dy, x, _or(route, dy), out["w21"], out["w22"], out["w12"],
        M, d_in, e_in, d_out, e_out, backends.token_bucket(M), splits, per_split,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        split_stride["w21"], out["w21"].stride(-2), split_stride["w22"], out["w22"].stride(-2),
        split_stride["w12"], out["w12"].stride(-2),
        NEED_W21=launch["w21"], NEED_W22=launch["w22"], NEED_W12=launch["w12"],
        HAS_ROUTE=route is not None and launch["w12"],  # the route scales dW12's dy0 only
        USE_TMA=use_tma, PRECISION=_precision(dy.dtype), NUM_SMS=num_sms,
    )  # fmt: skip
    if splits > 1:  # fixed-order reduction of the split partials: deterministic
        for k, partial in outs.items():
            grads[k].copy_(partial.sum(dim=0))
    return tuple(grads.values())
