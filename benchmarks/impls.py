"""Which implementations a layer benchmark runs, and how each is built for a case.

Names: ``scale_kernels[<backend>]`` for this package (one per usable backend) and the baselines
``handwritten``, ``handwritten_compiled``, ``dense_linear`` and ``equal_flop_gemm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import scale_kernels

from . import layers
from .cases import PASSES, LayerCase, dense_flops, equal_flop_gemm_shape, make_inputs
from .schema import impl_backend, package_impl

HANDWRITTEN = "handwritten"
HANDWRITTEN_COMPILED = "handwritten_compiled"
DENSE = "dense_linear"
GEMM = "equal_flop_gemm"
BASELINES = (HANDWRITTEN, HANDWRITTEN_COMPILED, DENSE, GEMM)
AUTO = "auto"  # the dispatcher's choice: always usable


def usable_backends(
    device: torch.device, dtype: torch.dtype, requested: Sequence[str] | None = None
) -> dict[str, str | None]:
    """Each requested backend (default: all named backends) mapped to None if usable here, else the reason it is
    skipped; ``auto`` is always usable."""
    available = scale_kernels.available_backends(device, dtype)
    names = list(available) if requested is None else list(requested)
    reasons = {name: None if name == AUTO else available.get(name, f"unknown backend {name!r}") for name in names}
    root = str(Path(scale_kernels.__file__).resolve().parents[1])  # keep local paths out of result files
    return {name: None if r is None else r.replace(root, "<repo>") for name, r in reasons.items()}


@dataclass
class Workload:
    """A built implementation with its inputs: ``module(x, route)``; ``dy`` is the upstream gradient."""

    module: nn.Module
    x: torch.Tensor
    dy: torch.Tensor | None
    route: torch.Tensor | None
    flops: Callable[[str], int]
    passes: tuple[str, ...]

    def trainable(self) -> list[torch.Tensor]:
        """Tensors whose ``.grad`` a pass fills (reset to None between timed runs)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        return params + ([self.x] if self.x.requires_grad else [])


def build_workload(
    impl: str, case: LayerCase, device: torch.device, dtype: torch.dtype, compile_backend: str = "inductor"
) -> Workload:
    """Build ``impl`` for ``case`` on ``device``/``dtype`` (fresh parameters and inputs, seeded)."""
    torch.manual_seed(0)
    inputs = make_inputs(case, device, dtype)
    factory = dict(device=device, dtype=dtype)
    if impl == GEMM:
        m, n, k = equal_flop_gemm_shape(case)
        x = torch.randn(m, k, **factory)
        return Workload(layers.EqualFlopGemm(n, k, **factory), x, None, None, lambda _pass: 2 * m * n * k, ("forward",))
    if impl == DENSE:
        module: nn.Module = layers.DenseLinear(case.d + case.e, **factory)
        flops = lambda pass_name: dense_flops(case, pass_name)
    elif impl in (HANDWRITTEN, HANDWRITTEN_COMPILED):
        module = layers.HandWrittenUpscaledLinear(case.d, case.e, case.has_w12, **factory)
        if impl == HANDWRITTEN_COMPILED:
            module = layers.compiled(module, compile_backend)
        flops = case.flops
    elif impl_backend(impl) is not None:
        module = layers.FusedUpscaledLinear(case.d, case.e, case.has_w12, impl_backend(impl), **factory)
        flops = case.flops
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected {BASELINES} or {package_impl('<backend>')}")
    return Workload(module, inputs.x, inputs.dy, inputs.route, flops, PASSES)
