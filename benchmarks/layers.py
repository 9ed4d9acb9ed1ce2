"""The layers the layer benchmark compares: this package's fused op and the baselines.

- :class:`FusedUpscaledLinear`: ``scale_kernels.upscaled_linear`` with a chosen backend.
- :class:`HandWrittenUpscaledLinear`: what a user writes without this package (4 ``F.linear``, the route
  multiply and a ``cat``; plain autograd, ``W`` with ``requires_grad=False``); :func:`compiled` wraps it in
  ``torch.compile``.
- :class:`DenseLinear`: ``nn.Linear(d + e, d + e)``, fully trainable ("just train a wider model").
- :class:`EqualFlopGemm`: one frozen GEMM with the forward FLOPs of the upscaled layer (the forward ceiling).

Every module is called as ``module(x, route)`` with ``x (T, width)`` and ``route (T,)`` or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scale_kernels import upscaled_linear
from scale_kernels.reference import upscaled_linear_reference

Tensor = torch.Tensor


class UpscaledLayerParams(nn.Module):
    """Parameters of a square upscaled linear: frozen ``weight (d, d)``; trainable ``weight_21 (e, d)``,
    ``weight_22 (e, e)`` and, when ``with_w12``, ``weight_12 (d, e)``. No biases (Llama-style)."""

    def __init__(self, d: int, e: int, with_w12: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(d + e)

        def param(rows: int, cols: int, trainable: bool) -> nn.Parameter:
            data = torch.randn(rows, cols, device=device, dtype=dtype) * std
            return nn.Parameter(data, requires_grad=trainable)

        self.weight = param(d, d, trainable=False)
        self.weight_21 = param(e, d, trainable=True)
        self.weight_22 = param(e, e, trainable=True)
        self.weight_12 = param(d, e, trainable=True) if with_w12 else None

    def blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self.weight, self.weight_21, self.weight_22, self.weight_12


class HandWrittenUpscaledLinear(UpscaledLayerParams):
    """Baseline: the layer as a user writes it in PyTorch, on the module's parameters.

    That is ``scale_kernels.reference.upscaled_linear_reference``: the package's reference semantics are written
    exactly that way (plain ``F.linear``, route multiply, ``cat``; no validation, no dispatch).
    """

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        w, w21, w22, w12 = self.blocks()
        return upscaled_linear_reference(x, w, w21, w22, w12, route=route)


class FusedUpscaledLinear(UpscaledLayerParams):
    """This package: ``scale_kernels.upscaled_linear`` on the module's parameters with a fixed backend."""

    def __init__(self, d: int, e: int, with_w12: bool, backend: str, *, device=None, dtype=None) -> None:
        super().__init__(d, e, with_w12, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        w, w21, w22, w12 = self.blocks()
        return upscaled_linear(x, w, w21, w22, w12, route=route, backend=self.backend)


class DenseLinear(nn.Module):
    """Baseline: a fully trainable ``nn.Linear(width, width)`` without bias; ``route`` is ignored."""

    def __init__(self, width: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        return self.linear(x)


class EqualFlopGemm(nn.Module):
    """Baseline: ``x (M, K) @ W^T`` with a frozen ``W (N, K)`` (one cuBLAS GEMM on GPU); no route."""

    def __init__(self, n: int, k: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        return F.linear(x, self.weight)


def compiled(module: nn.Module, compile_backend: str = "inductor") -> nn.Module:
    """``torch.compile(module)`` with static shapes (every benchmark case has fixed shapes)."""
    return torch.compile(module, backend=compile_backend, dynamic=False)
