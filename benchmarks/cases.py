"""The layer cases every benchmark shares: shapes, modes, passes, FLOP counts and input tensors.

A case is one square upscaled linear: ``d_in = d_out = d`` and ``e_in = e_out = e``, applied to ``T`` tokens
(``x`` of shape ``(T, d + e)``). Modes follow SCALE: ``preserve`` (no W12), ``adapt`` (trainable W12) and
``route`` (trainable W12 gated by a random 50% per-token mask).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MODES = ("preserve", "adapt", "route")
PASSES = ("forward", "backward", "train_step")
DECODE_MAX_TOKENS = 16

# the full (GPU) grid, on which the layer targets are stated, and the tiny CPU smoke grid
PREFILL_TOKENS = (16384, 4096)
DECODE_TOKENS = (16, 1)
HIDDEN_SIZES = (4096,)
SMOKE_PREFILL_TOKENS = (32,)
SMOKE_DECODE_TOKENS = (2,)
SMOKE_HIDDEN_SIZES = (32,)


@dataclass(frozen=True)
class LayerCase:
    """One upscaled linear of width ``d -> d`` widened by ``e`` on both sides, run on ``tokens`` tokens."""

    tokens: int
    d: int
    e: int
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if min(self.tokens, self.d) < 1 or self.e < 0:
            raise ValueError(f"tokens and d must be >= 1 and e >= 0, got {self}")

    @property
    def phase(self) -> str:
        """``"decode"`` for ``tokens <= 16`` (the decode sizes), else ``"prefill"``."""
        return "decode" if self.tokens <= DECODE_MAX_TOKENS else "prefill"

    @property
    def has_w12(self) -> bool:
        return self.mode != "preserve"

    @property
    def label(self) -> str:
        return f"{self.mode} T={self.tokens} d={self.d} e={self.e}"

    def as_dict(self) -> dict:
        return {**asdict(self), "phase": self.phase}

    def forward_flops(self) -> int:
        """``2 T`` times the block-matrix entries that are multiplied (W12 counted only when present)."""
        d, e = self.d, self.e
        return 2 * self.tokens * (d * d + e * (d + e) + (d * e if self.has_w12 else 0))

    def backward_flops(self) -> int:
        """dx (as many FLOPs as the forward) plus dW21, dW22 and (Adapt/Route) dW12; dW is never computed."""
        d, e = self.d, self.e
        weight_grads = 2 * self.tokens * (e * (d + e) + (d * e if self.has_w12 else 0))
        return self.forward_flops() + weight_grads

    def flops(self, pass_name: str) -> int:
        """FLOPs of one ``forward`` / ``backward`` / ``train_step`` (forward + backward) of the layer."""
        return _pass_flops(pass_name, self.forward_flops(), self.backward_flops())


def _pass_flops(pass_name: str, forward: int, backward: int) -> int:
    table = {"forward": forward, "backward": backward, "train_step": forward + backward}
    if pass_name not in table:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
    return table[pass_name]


def dense_flops(case: LayerCase, pass_name: str) -> int:
    """FLOPs of a fully trainable ``nn.Linear(d + e, d + e)``: the backward computes dx and dW."""
    width = case.d + case.e
    forward = 2 * case.tokens * width * width
    return _pass_flops(pass_name, forward, 2 * forward)


def equal_flop_gemm_shape(case: LayerCase) -> tuple[int, int, int]:
    """``(M, N, K)`` of a plain GEMM with (about) the forward FLOPs of ``case``: ``M = T``, ``N = d + e``.

    ``K`` is rounded to a multiple of 8 (aligned, as a real layer width would be); the comparison uses
    TFLOP/s, so the rounding does not bias it.
    """
    n = case.d + case.e
    k = max(8, round(case.forward_flops() / (2 * case.tokens * n) / 8) * 8)
    return case.tokens, n, k


def layer_cases(
    smoke: bool,
    tokens: tuple[int, ...] | None = None,
    hidden_sizes: tuple[int, ...] | None = None,
    modes: tuple[str, ...] | None = None,
) -> list[LayerCase]:
    """The case grid (full on GPU, tiny on CPU smoke); ``e = d / 4``; the filters narrow it. Cases come in
    the order given (largest token counts first by default: the targets' shapes before the rest)."""
    if tokens is None:
        tokens = (SMOKE_PREFILL_TOKENS + SMOKE_DECODE_TOKENS) if smoke else (PREFILL_TOKENS + DECODE_TOKENS)
    if hidden_sizes is None:
        hidden_sizes = SMOKE_HIDDEN_SIZES if smoke else HIDDEN_SIZES
    modes = MODES if modes is None else modes
    return [LayerCase(t, d, d // 4, m) for d in hidden_sizes for t in tokens for m in modes]


@dataclass
class LayerInputs:
    """A case's tensors: ``x (T, d + e)`` (requires grad), upstream grad ``dy (T, d + e)``, route ``(T,)``."""

    x: torch.Tensor
    dy: torch.Tensor
    route: torch.Tensor | None


def make_inputs(case: LayerCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LayerInputs:
    """Random inputs for ``case``; Route mode gets a bool mask, each token on the W12 path with p = 0.5."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = case.d + case.e
    x = torch.randn(case.tokens, width, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(case.tokens, width, generator=gen).to(device=device, dtype=dtype)
    route = None
    if case.mode == "route":
        route = (torch.rand(case.tokens, generator=gen) < 0.5).to(device)
    return LayerInputs(x, dy, route)
