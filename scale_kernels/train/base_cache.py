"""The base model's predictions on the eval sets, computed once and cached.

Forgetting metrics (``KL(base || model)``, top-1 agreement) and SCALE-Route's preservation path need the
base model's logits on every eval token. Storing full logits costs ``vocab`` floats per token (SmolLM2:
~200 KB, ~0.8 GB per 4k tokens), so the cache holds the base model's *final hidden states* (after the final
norm, ``hidden`` floats per token: ~10 MB per 4k tokens) and the logits are ``W_head h (+ b)`` with a copy
of the base head taken before training: the same ``F.linear`` the base model's head runs, checked against
a full base forward when the cache is built. The decoder stack, ~80% of a forward, never runs again.

The cache file is named by a digest of the model spec and the exact eval token ids, so runs that share the
eval data (every run of a sweep) share one file, and a change of data or model never reads a stale one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import PackedText

Tensor = torch.Tensor
# max |logits from the cache - logits of a base forward| accepted when building (fp32; the two computations
# run the same kernels and normally agree bit for bit)
CHECK_ATOL = 1e-4


def _digest(model_spec: str, data: dict[str, PackedText]) -> str:
    h = hashlib.sha256(model_spec.encode())
    for name in sorted(data):
        h.update(name.encode())
        h.update(data[name].ids.numpy().tobytes())
    return h.hexdigest()[:20]


class BaseReference:
    """Base-model logits for the rows of named eval sets: ``logits(name, rows) -> (rows, seq_len, vocab)``."""

    def __init__(self, head: nn.Linear, hidden: dict[str, Tensor], device: torch.device, origin: str = ""):
        self.weight = head.weight.detach().clone().to(device)
        self.bias = head.bias.detach().clone().to(device) if head.bias is not None else None
        self.hidden = {name: h.to(device) for name, h in hidden.items()}
        self.origin = origin  # where the hidden states came from (for the run's log)

    def logits(self, name: str, rows: slice) -> Tensor:
        return F.linear(self.hidden[name][rows], self.weight, self.bias)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        model_spec: str,
        data: dict[str, PackedText],
        cache_dir: str | Path,
        *,
        batch_size: int,
        device: torch.device,
        progress: bool = False,
    ) -> BaseReference:
        """Load the cache for ``data`` from ``cache_dir``, or run the base ``model`` (not yet modified by any
        method) on it (with a progress bar if ``progress``) and write the cache."""
        from tqdm.auto import tqdm

        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the base model's output head must be an nn.Linear, got {type(head).__name__}")
        path = Path(cache_dir) / f"base-hidden-{_digest(model_spec, data)}.pt"
        if path.is_file():
            hidden = torch.load(path, map_location="cpu", weights_only=True)
            return cls(head, hidden, device, f"read from {path}")
        model.to(device).eval()
        decoder = model.get_decoder()
        hidden = {}
        for name, packed in data.items():
            starts = range(0, len(packed), batch_size)
            parts = [
                decoder(input_ids=packed.ids[i : i + batch_size].to(device), use_cache=False)
                .last_hidden_state.float()
                .cpu()
                for i in tqdm(starts, desc=f"base model on {name}", disable=not progress, leave=False)
            ]
            hidden[name] = torch.cat(parts)
        ref = cls(head, hidden, device, f"computed, cached in {path}")
        first = next(iter(data))
        rows = slice(0, min(batch_size, len(data[first])))
        full = model(input_ids=data[first].ids[rows].to(device), use_cache=False).logits.float()
        error = float((ref.logits(first, rows) - full).abs().max())
        if error > CHECK_ATOL:
            raise RuntimeError(
                f"cached base logits differ from a base forward by {error:.3g} (> {CHECK_ATOL}); "
                f"this model's head is not a plain linear map of the decoder's last hidden state"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(hidden, tmp)
        os.replace(tmp, path)
        return ref
