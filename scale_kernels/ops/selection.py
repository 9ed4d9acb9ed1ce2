"""Backend choice of the model-level ops (fused LM head + cross-entropy, split RMSNorm): Triton or PyTorch."""

from __future__ import annotations

import torch

from .. import backends

FUSED_OP_BACKENDS = ("torch", "triton")


def triton_or_torch(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for a model-level op.

    ``backend`` (else ``use_backend`` / ``SCALE_KERNELS_BACKEND``) is resolved by the package dispatcher exactly
    as for ``upscaled_linear`` (auto: ``triton`` on CUDA, ``torch`` on CPU); its ``cuda`` choice maps to
    ``triton`` (these ops have no CUDA-C kernel), or to ``torch`` where triton cannot run. fp64 runs on ``torch``.
    """
    if backend is not None and backend not in (*backends.BACKEND_NAMES, "auto"):
        raise ValueError(f"backend must be one of {backends.BACKEND_NAMES} or 'auto', got {backend!r}")
    if dtype == torch.float64:
        return "torch"
    name = backends.resolve_backend(backend, device, dtype)
    if name == "cuda":
        name = "triton" if backends.unavailable_reason("triton", device, dtype) is None else "torch"
    return name
