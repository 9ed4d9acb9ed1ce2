"""The plain-PyTorch semantics of the upscaled linear, the spec every backend is tested against.

``[y ; y_up] = [[W, r * W12], [W21, W22]] @ [x ; x_up] + [b ; b_up]`` per token, written with ordinary
differentiable ops so that autograd (in any dtype, fp64 included) gives the reference gradients.

It is also the benchmarks' hand-written baseline (``benchmarks.layers.HandWrittenUpscaledLinear``): the layer as a
user writes it without this package. Keep it plain PyTorch ops: no validation, no dispatch, no fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upscaled_linear_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    w21: torch.Tensor,
    w22: torch.Tensor,
    w12: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``upscaled_linear`` (no validation, no fusion).

    Shapes: x ``(..., d_in + e_in)``, w ``(d_out, d_in)``, w21 ``(e_out, d_in)``, w22 ``(e_out, e_in)``,
    w12 ``(d_out, e_in)``, route ``x.shape[:-1]``; returns ``(..., d_out + e_out)``.
    """
    d_in = w.shape[1]
    x0, x1 = x[..., :d_in], x[..., d_in:]
    y0 = F.linear(x0, w, bias)
    if w12 is not None:
        z = F.linear(x1, w12)
        if route is not None:
            z = z * route.to(z.dtype).unsqueeze(-1)
        y0 = y0 + z
    y1 = F.linear(x0, w21, bias_up) + F.linear(x1, w22)
    return torch.cat([y0, y1], dim=-1)


def error_limit(ref: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> float:
    """The accuracy rule every backend is held to: a result in ``dtype`` may differ from the fp64 reference
    ``ref`` by at most twice plain PyTorch's error in the same dtype (``plain``: the reference computed in
    ``dtype``; flash-attention's idiom), plus a floor of 8 ulps of the output's scale (plain PyTorch can be exact,
    e.g. a bias gradient summing few terms). Both tensors hold finite values of the same shape."""
    r = ref.double()
    base = (plain.double() - r).abs().max().item() if r.numel() else 0.0
    scale = r.abs().max().item() if r.numel() else 0.0
    return 2 * base + 8 * torch.finfo(dtype).eps * (scale + 1.0)
