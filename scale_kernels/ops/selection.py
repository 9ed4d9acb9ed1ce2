"""Backend choice of the model-level ops (fused LM head + cross-entropy, split RMSNorm): Triton or PyTorch."""

from __future__ import annotations

import torch

from .. import backends


@torch.compiler.assume_constant_result
def triton_or_torch(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for a model-level op.

    ``backend`` (else ``use_backend`` / ``SCALE_KERNELS_BACKEND``) is requested exactly as for ``upscaled_linear``.
    ``auto`` takes ``triton`` for CUDA tensors (these ops are memory-bound element-wise / row-wise work, where one
    fused pass beats PyTorch's several kernels; the dispatch tables of ``upscaled_linear`` are about GEMMs and do
    not apply) and ``torch`` elsewhere. A forced ``cuda`` maps to ``triton`` (these ops have no CUDA-C kernel) or,
    where triton cannot run, to ``torch``. fp64 runs on ``torch``. A forced backend that cannot run raises.
    Under ``torch.compile`` it is evaluated once at trace time (a constant of the graph).
    """
    requested, _ = backends.requested_backend(backend)
    backends.check_backend_name(requested)
    if dtype == torch.float64:
        return "torch"
    triton_ok = backends.unavailable_reason("triton", device, dtype) is None
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_ok else "torch"
    if requested == "cuda":
        return "triton" if triton_ok else "torch"
    reason = backends.unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise ValueError(f"backend {requested!r} cannot run this call: {reason}")
    return requested
