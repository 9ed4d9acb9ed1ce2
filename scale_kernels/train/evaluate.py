"""Evaluation of a causal LM on packed sequences: perplexity (old domain = forgetting, new domain =
adaptation) and closeness to the base model.

Per domain and per *prediction* (the method's own, plus optional extra views of the same model, e.g.
SCALE-Route's adaptation path alone) :func:`evaluate` reports:

* ``ppl`` / ``nll`` / ``tokens``: over the *content* targets, i.e. every target except the packing
  boundaries (a separator token and the first token after it; see :class:`~.data.PackedText`). This is the
  number every comparison uses.
* ``ppl_all`` / ``nll_all`` / ``tokens_all``: over every target (what a plain packed-perplexity reports).
* ``kl_base``: mean over content targets of ``KL(base || model)`` (nats) between the base model's and the
  prediction's next-token distributions, and ``top1_base``: the share of content targets where both
  predict the same top-1 token (only when base logits are given; 0 and 1 for the base model itself).
* ``route_adapt_fraction``: for routed predictions, the share of content targets predicted by the
  adaptation path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .data import PackedText

Tensor = torch.Tensor


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32. ValueError when ``device`` cannot run
    ``precision``: fp16 needs CUDA, bf16 on CUDA a GPU that supports it. (The SCALE op is autocast-aware:
    every method runs under both.)"""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use bf16 or fp32 on CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"precision='bf16': {name} does not support bf16; use fp16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def causal_lm_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``(b, t, vocab)`` logits for ``(b, t)`` ids (as HF's ``labels=ids``)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


@dataclass
class Prediction:
    """One way of predicting a batch: ``logits (b, t, vocab)``; or, for a prediction that picks per token one
    of two paths, ``paths = (preserve, adapt)`` logits and ``route (b, t)`` bool (True = adaptation path).
    ``route`` with ``logits``: the share of targets to report as routed to adaptation."""

    logits: Tensor | None = None
    route: Tensor | None = None
    paths: tuple[Tensor, Tensor] | None = None


class _BatchStats:
    """Per-target ``(b, t-1)`` values of the predictions of one batch: ``nll``, and with a base model ``kl``
    (KL(base || prediction)) and ``top1`` (same top-1 token as the base model), ``routed`` for routed ones.

    Each distinct logits tensor is normalised once (a routed prediction and the views of the same two paths
    share them); ``KL = sum p_base log p_base - sum p_base log p`` with the first term computed once.
    """

    def __init__(self, ids: Tensor, base_logits: Tensor | None):
        self.targets = ids[:, 1:, None]
        self.cache: dict[int, dict[str, Tensor]] = {}
        self.base = None
        if base_logits is not None:
            base_logp = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
            base_p = base_logp.exp()
            self.base = (base_p, (base_p * base_logp).sum(-1), base_logp.argmax(-1))

    def _of_logits(self, logits: Tensor) -> dict[str, Tensor]:
        key = id(logits)
        if key not in self.cache:
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            stats = {"nll": -logp.gather(-1, self.targets)[..., 0]}
            if self.base is not None:
                base_p, base_neg_entropy, base_top1 = self.base
                stats["kl"] = base_neg_entropy - (base_p * logp).sum(-1)
                stats["top1"] = (logp.argmax(-1) == base_top1).float()
            self.cache[key] = stats
        return self.cache[key]

    def of(self, pred: Prediction) -> dict[str, Tensor]:
        if pred.paths is None:
            stats = dict(self._of_logits(pred.logits))
        else:
            if pred.route is None:
                raise ValueError("a prediction with two paths needs its route")
            preserve, adapt = (self._of_logits(x) for x in pred.paths)
            stats = {k: torch.where(pred.route[:, :-1], adapt[k], preserve[k]) for k in preserve}
        if pred.route is not None:
            stats["routed"] = pred.route[:, :-1].float()
        return stats


@dataclass
class _Totals:
    """Sums of the per-target values over the counted targets (``content``) and over all targets."""

    sums: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    nll_all: float = 0.0
    tokens_all: int = 0

    def add(self, stats: dict[str, Tensor], content: Tensor, rows: Tensor) -> None:
        """Accumulate the targets of ``rows`` (``(b, t-1)`` bool); ``content`` marks those that count."""
        counted = content & rows
        for key, values in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(values[counted].sum())
        self.tokens += int(counted.sum())
        self.nll_all += float(stats["nll"][rows].sum())
        self.tokens_all += int(rows.sum())

    def metrics(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("the eval data has no target outside the packing boundaries: use longer sequences")
        nll = self.sums["nll"] / self.tokens
        out = {
            "ppl": math.exp(nll),
            "nll": nll,
            "tokens": self.tokens,
            "ppl_all": math.exp(self.nll_all / self.tokens_all),
            "nll_all": self.nll_all / self.tokens_all,
            "tokens_all": self.tokens_all,
        }
        if "kl" in self.sums:
            out.update(kl_base=self.sums["kl"] / self.tokens, top1_base=self.sums["top1"] / self.tokens)
        if "routed" in self.sums:
            out["route_adapt_fraction"] = self.sums["routed"] / self.tokens
        return out


# predict(ids, base_logits or None) -> {name: Prediction}; the name "model" is the method's own prediction
Predictor = Callable[[Tensor, Tensor | None], dict[str, Prediction]]
# base(rows) -> the base model's logits for those rows of the eval data
BaseLogits = Callable[[slice], Tensor]


@torch.no_grad()
def evaluate(
    predict: Predictor,
    data: PackedText,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    base: BaseLogits | None = None,
    sources: dict[str, slice] | None = None,
    progress: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics (see the module docstring) of every prediction ``predict`` returns, over all of ``data``;
    with ``sources`` (name -> its rows of ``data``) also per source, under ``"by_source"``. ``progress``: the
    label of a progress bar over the batches (None: no bar)."""
    from tqdm.auto import tqdm

    totals: dict[str, _Totals] = {}
    by_source: dict[tuple[str, str], _Totals] = {}
    row_index = torch.arange(len(data))
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False, dynamic_ncols=True):
        rows = slice(start, start + batch_size)
        ids = data.ids[rows].to(device)
        content = ~data.boundary[rows, 1:].to(device)
        everything = torch.ones_like(content)
        index = row_index[rows]
        source_masks = {}  # this batch's targets of each source that has rows in it
        for source, span in (sources or {}).items():
            in_span = (index >= span.start) & (index < span.stop)
            if in_span.any():
                source_masks[source] = in_span.to(device)[:, None].expand_as(content)
        base_logits = base(rows) if base is not None else None
        with autocast_context(device, precision):
            predictions = predict(ids, base_logits)
        batch = _BatchStats(ids, base_logits)
        for name, pred in predictions.items():
            stats = batch.of(pred)
            totals.setdefault(name, _Totals()).add(stats, content, everything)
            for source, mine in source_masks.items():
                by_source.setdefault((name, source), _Totals()).add(stats, content, mine)
    out: dict[str, dict[str, Any]] = {name: t.metrics() for name, t in totals.items()}
    for (name, source), t in by_source.items():
        out[name].setdefault("by_source", {})[source] = t.metrics()
    return out
