"""``cuda`` backend: the compiled extension built from ``csrc/`` (optional).

The extension is built only on request (see the README); without it this backend reports why it is
unavailable and the dispatcher never selects it automatically.
"""

from __future__ import annotations

import torch

name = "cuda"

try:
    from .. import _C  # noqa: F401  (compiled extension, registers torch.ops.scale_kernels_cuda)

    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    _IMPORT_ERROR = (
        "the CUDA extension scale_kernels._C is not built (reinstall with SCALE_KERNELS_BUILD_CUDA=1 "
        f"on a machine with nvcc and a CUDA build of torch): {exc}"
    )


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got device {device}"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the cuda backend supports float32/float16/bfloat16, got {dtype}"
    return None


def forward(x, w, w21, w22, w12, bias, bias_up, route):
    return torch.ops.scale_kernels_cuda.forward(x, w, w21, w22, w12, bias, bias_up, route)


def backward_input(dy, x, w, w21, w22, w12, route, need_droute: bool):
    dx, droute = torch.ops.scale_kernels_cuda.backward_input(dy, x, w, w21, w22, w12, route, need_droute)
    return dx, (droute if need_droute else None)


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    grads = iter(torch.ops.scale_kernels_cuda.backward_weight(dy, x, route, d_in, d_out, need_w21, need_w22, need_w12))
    return tuple(next(grads) if need else None for need in (need_w21, need_w22, need_w12))
