"""Perplexity of a causal LM on packed sequences (old domain = forgetting, new domain = adaptation)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16 (fp16 only on CUDA), a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def sequence_nll(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, int]:
    """Summed next-token NLL (fp32) of ``(b, t, vocab)`` logits for ``(b, t)`` ids, and the token count."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, targets, reduction="sum"), targets.numel()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    forward_kwargs: Callable[[Tensor], dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Perplexity over every sequence of ``data`` ``(n, seq_len)``.

    Returns ``{"ppl", "nll", "tokens"}`` plus ``"route_adapt_fraction"`` when ``forward_kwargs`` supplies
    a ``scale_route`` mask (the share of tokens that took the adaptation path).
    """
    was_training = model.training
    model.eval()
    total, count, routed, route_tokens = 0.0, 0, 0.0, 0
    try:
        for start in range(0, data.shape[0], batch_size):
            ids = data[start : start + batch_size].to(device)
            extra = forward_kwargs(ids) if forward_kwargs is not None else {}
            with autocast_context(device, precision):
                logits = model(input_ids=ids, use_cache=False, **extra).logits
            nll, n = sequence_nll(logits, ids)
            total, count = total + float(nll), count + n
            if "scale_route" in extra:
                routed += float(extra["scale_route"].float().sum())
                route_tokens += extra["scale_route"].numel()
    finally:
        model.train(was_training)
    result = {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}
    if route_tokens:
        result["route_adapt_fraction"] = routed / route_tokens
    return result
