"""``triton`` backend: the fused upscaled-linear kernels and their launchers.

Three kernels, each ONE launch, none of which materialises the block matrix ``[[W, W12], [W21, W22]]``:

* ``_forward_kernel``: every output tile of ``[y ; y_up]``. Tiles of the original columns loop K over ``W``
  then (if present) ``W12`` into a second fp32 accumulator scaled per row by the route; tiles of the expansion
  columns loop over ``W21`` then ``W22``.
* ``_backward_input_kernel``: every tile of ``dx = [dx0 ; dx1]`` (``dx0 = dy0 W + dy1 W21``,
  ``dx1 = r * (dy0 W12) + dy1 W22``), plus per-tile partial sums of ``droute = <x1, dy0 W12>``.
* ``_backward_weight_kernel``: a grouped launch over the tiles of ``[dW21 | dW22] = dy1^T x`` (only the
  column range whose weights need a gradient) and ``dW12 = (r * dy0)^T x1``. ``dW`` is never computed.

All three share one K-loop helper, ``_accumulate_tile``. Accumulation is fp32. Under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) a single small config is used and dot operands are
upcast to fp32 (the interpreter's bf16 ``tl.dot`` is wrong). The kernels are deterministic: no atomics,
no split-K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

name = "triton"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _configs(gpu: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples -> configs; one small config when interpreting."""
    if INTERPRET:
        gpu = [(32, 32, 32, 1, 1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in gpu
    ]


# Token-major GEMMs (forward, dx): large M, modest N. Small-M configs serve decode-sized inputs.
MN_TILES = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (16, 32, 128, 4, 4),  # decode: more, narrower column tiles keep every SM streaming weights
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
]
# Weight-gradient GEMMs: output is a weight block, K is the token dimension.
WEIGHT_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 2),
]
_MN_CONFIGS = _configs(MN_TILES)
_WEIGHT_CONFIGS = _configs(WEIGHT_TILES)
# droute partial sums are kept per block of DROUTE_COLS expansion columns, the smallest BLOCK_N of any config:
# every config writes every row of the partial buffer, so no result depends on which configs the autotuner tried
DROUTE_COLS = min(bn for _, bn, _, _, _ in MN_TILES)


def deterministic() -> bool:
    """Whether to skip autotuning and always use each kernel's first config.

    The kernels are bitwise deterministic for a fixed config (no atomics, no split-K), but the autotuner may
    pick a different tile shape (so a different summation order) in another process. Set
    ``SCALE_KERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)`` before the first call
    for results that are bitwise identical across processes.
    """
    return os.environ.get("SCALE_KERNELS_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _first_config_if_deterministic(configs, named_args, **kwargs):
    return configs[:1] if deterministic() else configs


_PRUNE = {"early_config_prune": _first_config_if_deterministic}


def _bucket(n: int) -> int:
    """Autotune key for a size that varies between calls (tokens): its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _accumulate_tile(
    acc,
    a_ptr,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    offs_m,
    offs_n,
    M,
    N,
    K,
    k_scale_ptr,
    K_SCALED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc += A[offs_m, :K] @ B[:K, offs_n]`` (A's k-th column scaled by ``k_scale[k]`` if K_SCALED).

    A and B are addressed through arbitrary strides, so transposes and column slices cost nothing.
    Out-of-range rows/columns/K read as zero and do not contribute.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        if K_SCALED:
            s = tl.load(k_scale_ptr + k0 + offs_k, mask=k_ok, other=0.0)
            a = (a.to(tl.float32) * s[None, :]).to(b.dtype)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of a ``num_pid_m x num_pid_n`` tile grid."""
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows
    pid_n = (pid % group_size) // rows
    return pid_m, pid_n


@triton.jit
def _two_block_tile(pid, M, N_LEFT, N_RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``pid`` of an ``M x (N_LEFT | N_RIGHT)`` output whose two column blocks are tiled separately.

    Returns the tile's row offsets, its column-tile index and the number of column tiles of the left block
    (``pid_n < tiles_left``: a left-block tile, else tile ``pid_n - tiles_left`` of the right block).
    """
    tiles_left = tl.cdiv(N_LEFT, BLOCK_N)
    num_pid_n = tiles_left + tl.cdiv(N_RIGHT, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), num_pid_n, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n, tiles_left


@triton.jit
def _store_tile(ptr, stride_m, stride_n, acc, offs_m, offs_n, M, N):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :] * stride_n
    tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_row_vector(acc, ptr, offs_n, N):
    """``acc[:, n] += v[n]`` (a bias)."""
    v = tl.load(ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc + v.to(tl.float32)[None, :]


@triton.jit
def _scale_rows(acc, route_ptr, offs_m, M):
    """``acc[m, :] *= r[m]`` (the route gate)."""
    r = tl.load(route_ptr + offs_m, mask=offs_m < M, other=0.0)
    return acc * r[:, None]


# fmt: off
# ----------------------------------------------------------------------------------------------------------
# forward


@triton.autotune(
    configs=_MN_CONFIGS,
    key=["M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT", "HAS_W12", "HAS_ROUTE", "HAS_BIAS", "HAS_BIAS_UP"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, w12_ptr, w21_ptr, w22_ptr, bias_ptr, bias_up_ptr, route_ptr, y_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT, M_BUCKET,
    stride_xm, stride_xk,
    stride_w_n, stride_w_k, stride_w12_n, stride_w12_k,
    stride_w21_n, stride_w21_k, stride_w22_n, stride_w22_k,
    stride_ym, stride_yn,
    HAS_W12: tl.constexpr, HAS_ROUTE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_UP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """y (M, D_OUT + E_OUT) = [x0 W^T + r*(x1 W12^T) + b ; x0 W21^T + x1 W22^T + b_up]."""
    offs_m, pid_n, tiles_orig = _two_block_tile(tl.program_id(0), M, D_OUT, E_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    x1_ptr = x_ptr + D_IN * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid_n < tiles_orig:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_w_k, stride_w_n,
                               offs_m, offs_n, M, D_OUT, D_IN, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        if HAS_W12:
            acc12 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc12 = _accumulate_tile(acc12, x1_ptr, stride_xm, stride_xk, w12_ptr, stride_w12_k, stride_w12_n,
                                     offs_m, offs_n, M, D_OUT, E_IN, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
            if HAS_ROUTE:
                acc12 = _scale_rows(acc12, route_ptr, offs_m, M)
            acc += acc12
        if HAS_BIAS:
            acc = _add_row_vector(acc, bias_ptr, offs_n, D_OUT)
        _store_tile(y_ptr, stride_ym, stride_yn, acc, offs_m, offs_n, M, D_OUT)
    else:
        offs_n = (pid_n - tiles_orig) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, x_ptr, stride_xm, stride_xk, w21_ptr, stride_w21_k, stride_w21_n,
                               offs_m, offs_n, M, E_OUT, D_IN, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        acc = _accumulate_tile(acc, x1_ptr, stride_xm, stride_xk, w22_ptr, stride_w22_k, stride_w22_n,
                               offs_m, offs_n, M, E_OUT, E_IN, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        if HAS_BIAS_UP:
            acc = _add_row_vector(acc, bias_up_ptr, offs_n, E_OUT)
        _store_tile(y_ptr + D_OUT * stride_yn, stride_ym, stride_yn, acc, offs_m, offs_n, M, E_OUT)


# ----------------------------------------------------------------------------------------------------------
# backward: dx (and droute)


@triton.autotune(
    configs=_MN_CONFIGS,
    key=["M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT", "HAS_W12", "HAS_ROUTE", "NEED_DROUTE"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _backward_input_kernel(
    dy_ptr, x_ptr, w_ptr, w12_ptr, w21_ptr, w22_ptr, route_ptr, dx_ptr, droute_part_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT, M_BUCKET,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    stride_w_n, stride_w_k, stride_w12_n, stride_w12_k,
    stride_w21_n, stride_w21_k, stride_w22_n, stride_w22_k,
    stride_dxm, stride_dxk,
    HAS_W12: tl.constexpr, HAS_ROUTE: tl.constexpr, NEED_DROUTE: tl.constexpr, DROUTE_COLS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """dx (M, D_IN + E_IN) = [dy0 W + dy1 W21 ; r*(dy0 W12) + dy1 W22]; droute partials (cdiv(E_IN, DROUTE_COLS), M).

    Partial row p holds ``sum_{c in block p} x1[m, c] * (dy0 W12)[m, c]`` over the p-th block of DROUTE_COLS
    expansion columns. A tile of BLOCK_N columns writes its BLOCK_N // DROUTE_COLS rows, so every config writes
    every row and the buffer never holds a stale value from another config."""
    offs_m, pid_n, tiles_orig = _two_block_tile(tl.program_id(0), M, D_IN, E_IN, BLOCK_M, BLOCK_N, GROUP_M)
    dy1_ptr = dy_ptr + D_OUT * stride_dyn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid_n < tiles_orig:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, dy_ptr, stride_dym, stride_dyn, w_ptr, stride_w_n, stride_w_k,
                               offs_m, offs_n, M, D_IN, D_OUT, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        acc = _accumulate_tile(acc, dy1_ptr, stride_dym, stride_dyn, w21_ptr, stride_w21_n, stride_w21_k,
                               offs_m, offs_n, M, D_IN, E_OUT, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        _store_tile(dx_ptr, stride_dxm, stride_dxk, acc, offs_m, offs_n, M, D_IN)
    else:
        tile_up = pid_n - tiles_orig
        offs_n = tile_up * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, dy1_ptr, stride_dym, stride_dyn, w22_ptr, stride_w22_n, stride_w22_k,
                               offs_m, offs_n, M, E_IN, E_OUT, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        if HAS_W12:
            g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g = _accumulate_tile(g, dy_ptr, stride_dym, stride_dyn, w12_ptr, stride_w12_n, stride_w12_k,
                                 offs_m, offs_n, M, E_IN, D_OUT, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
            if NEED_DROUTE:
                x1_mask = (offs_m[:, None] < M) & (offs_n[None, :] < E_IN)
                x1_ptrs = (x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
                           + (D_IN + offs_n[None, :]) * stride_xk)  # fmt: skip
                x1 = tl.load(x1_ptrs, mask=x1_mask, other=0.0).to(tl.float32)
                SUB: tl.constexpr = BLOCK_N // DROUTE_COLS
                part = tl.sum(tl.reshape(x1 * g, (BLOCK_M, SUB, DROUTE_COLS)), axis=2)
                rows = tile_up * SUB + tl.arange(0, SUB)
                part_ptrs = droute_part_ptr + rows[None, :].to(tl.int64) * M + offs_m[:, None]
                n_parts = tl.cdiv(E_IN, DROUTE_COLS)
                tl.store(part_ptrs, part, mask=(offs_m[:, None] < M) & (rows[None, :] < n_parts))
            if HAS_ROUTE:
                g = _scale_rows(g, route_ptr, offs_m, M)
            acc += g
        _store_tile(dx_ptr + D_IN * stride_dxk, stride_dxm, stride_dxk, acc, offs_m, offs_n, M, E_IN)


# ----------------------------------------------------------------------------------------------------------
# backward: trainable weight gradients (grouped)


@triton.autotune(
    configs=_WEIGHT_CONFIGS,
    key=["M_BUCKET", "D_IN", "E_IN", "D_OUT", "E_OUT", "COL_LO", "COL_HI", "NEED_W12", "HAS_ROUTE"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _backward_weight_kernel(
    dy_ptr, x_ptr, route_ptr, dw21_ptr, dw22_ptr, dw12_ptr,
    M, D_IN, E_IN, D_OUT, E_OUT, M_BUCKET, COL_LO, COL_HI,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    stride_dw21_n, stride_dw22_n, stride_dw12_n,
    NEED_W12: tl.constexpr, HAS_ROUTE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Problem A (empty when COL_HI == COL_LO): C = dy1^T x[:, COL_LO:COL_HI]; columns < D_IN go to dW21,
    the rest to dW22.
    Problem B (if NEED_W12): dW12 = (r * dy0)^T x1. Tiles are BLOCK_M (weight rows) x BLOCK_N (weight cols);
    the K loop runs over the M tokens."""
    pid = tl.program_id(0)
    n_cols = COL_HI - COL_LO
    tiles_a = tl.cdiv(E_OUT, BLOCK_M) * tl.cdiv(n_cols, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid < tiles_a:
        tiles_cols = tl.cdiv(n_cols, BLOCK_N)
        offs_i = (pid // tiles_cols) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = (pid % tiles_cols) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, dy_ptr + D_OUT * stride_dyn, stride_dyn, stride_dym,
                               x_ptr + COL_LO * stride_xk, stride_xm, stride_xk,
                               offs_i, offs_j, E_OUT, n_cols, M, route_ptr, False, BLOCK_K, UPCAST, PRECISION)
        col = COL_LO + offs_j  # column of x == column of [W21 | W22]
        row_ok = offs_i[:, None] < E_OUT
        in_range = offs_j[None, :] < n_cols
        out = acc.to(dw21_ptr.dtype.element_ty)
        ptr21 = dw21_ptr + offs_i[:, None].to(tl.int64) * stride_dw21_n + col[None, :]
        tl.store(ptr21, out, mask=row_ok & in_range & (col[None, :] < D_IN))
        col22 = tl.maximum(col - D_IN, 0)
        ptr22 = dw22_ptr + offs_i[:, None].to(tl.int64) * stride_dw22_n + col22[None, :]
        tl.store(ptr22, out, mask=row_ok & in_range & (col[None, :] >= D_IN))
    elif NEED_W12:
        pid_b = pid - tiles_a
        tiles_cols = tl.cdiv(E_IN, BLOCK_N)
        offs_i = (pid_b // tiles_cols) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = (pid_b % tiles_cols) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _accumulate_tile(acc, dy_ptr, stride_dyn, stride_dym,
                               x_ptr + D_IN * stride_xk, stride_xm, stride_xk,
                               offs_i, offs_j, D_OUT, E_IN, M, route_ptr, HAS_ROUTE, BLOCK_K, UPCAST, PRECISION)
        _store_tile(dw12_ptr, stride_dw12_n, 1, acc, offs_i, offs_j, D_OUT, E_IN)


# fmt: on
# ----------------------------------------------------------------------------------------------------------
# launchers


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting (TF32 only if the user allowed it); halves use tensor cores."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _common(dtype: torch.dtype) -> dict:
    return {"UPCAST": INTERPRET and dtype != torch.float32, "PRECISION": _precision(dtype)}


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Kernels need a pointer even for absent operands (never dereferenced: a constexpr flag is off)."""
    return fallback if t is None else t


def _stride(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _mn_grid(M: int, n_left: int, n_right: int):
    """Grid over M-tiles x (tiles of the left column block + tiles of the right column block)."""

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(n_left, bn) + triton.cdiv(n_right, bn)),)

    return grid


def forward(x, w, w21, w22, w12, bias, bias_up, route) -> torch.Tensor:
    """``(M, d_in + e_in) -> (M, d_out + e_out)`` in one launch."""
    M = x.shape[0]
    d_out, d_in = w.shape
    e_out, e_in = w22.shape
    y = torch.empty(M, d_out + e_out, dtype=x.dtype, device=x.device)
    if M == 0 or d_out + e_out == 0:
        return y
    _forward_kernel[_mn_grid(M, d_out, e_out)](
        x, w, _or(w12, w), w21, w22, _or(bias, w), _or(bias_up, w), _or(route, w), y,
        M, d_in, e_in, d_out, e_out, _bucket(M),
        x.stride(0), x.stride(1),
        *_stride(w), *_stride(w12), *_stride(w21), *_stride(w22),
        y.stride(0), y.stride(1),
        HAS_W12=w12 is not None and e_in > 0, HAS_ROUTE=route is not None,
        HAS_BIAS=bias is not None, HAS_BIAS_UP=bias_up is not None,
        **_common(x.dtype),
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
    n_parts = triton.cdiv(e_in, DROUTE_COLS) if need_droute and has_w12 and d_out > 0 else 0
    parts = torch.empty(n_parts, M, dtype=torch.float32, device=dy.device)
    if M > 0 and d_in + e_in > 0:
        _backward_input_kernel[_mn_grid(M, d_in, e_in)](
            dy, _or(x, dy), w, _or(w12, w), w21, w22, _or(route, w), dx, parts,
            M, d_in, e_in, d_out, e_out, _bucket(M),
            dy.stride(0), dy.stride(1), *_stride(x),
            *_stride(w), *_stride(w12), *_stride(w21), *_stride(w22),
            dx.stride(0), dx.stride(1),
            HAS_W12=has_w12, HAS_ROUTE=route is not None, NEED_DROUTE=n_parts > 0, DROUTE_COLS=DROUTE_COLS,
            **_common(dy.dtype),
        )  # fmt: skip
    return dx, (parts.sum(dim=0) if need_droute else None)  # no rows (empty W12 term): exactly 0


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    """``(dW21, dW22, dW12)`` (None where not needed) in one grouped launch. Never computes dW."""
    M = dy.shape[0]
    e_out = dy.shape[1] - d_out
    e_in = x.shape[1] - d_in
    dw21 = torch.empty(e_out, d_in, dtype=dy.dtype, device=dy.device) if need_w21 else None
    dw22 = torch.empty(e_out, e_in, dtype=dy.dtype, device=dy.device) if need_w22 else None
    dw12 = torch.empty(d_out, e_in, dtype=dy.dtype, device=dy.device) if need_w12 else None
    col_lo = 0 if need_w21 else d_in
    col_hi = d_in + e_in if need_w22 else d_in
    need_w2x = e_out > 0 and col_hi > col_lo
    if not need_w2x:
        col_lo = col_hi = 0
    need_w12 = need_w12 and d_out > 0 and e_in > 0
    if M == 0:  # no tokens: the gradients are exactly zero
        return tuple(None if g is None else g.zero_() for g in (dw21, dw22, dw12))

    def grid(meta):
        tiles = 0
        if need_w2x:
            tiles += triton.cdiv(e_out, meta["BLOCK_M"]) * triton.cdiv(col_hi - col_lo, meta["BLOCK_N"])
        if need_w12:
            tiles += triton.cdiv(d_out, meta["BLOCK_M"]) * triton.cdiv(e_in, meta["BLOCK_N"])
        return (tiles,)

    if need_w2x or need_w12:
        placeholder = dy.new_empty(1)
        _backward_weight_kernel[grid](
            dy, x, _or(route, placeholder), _or(dw21, placeholder), _or(dw22, placeholder),
            _or(dw12, placeholder),
            M, d_in, e_in, d_out, e_out, _bucket(M), col_lo, col_hi,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            d_in, e_in, e_in,
            NEED_W12=need_w12, HAS_ROUTE=route is not None,
            **_common(dy.dtype),
        )  # fmt: skip
    return dw21, dw22, dw12
