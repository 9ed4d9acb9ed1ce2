"""``cuda`` backend: the compiled extension built from ``csrc/`` (optional).

Forward of up to 64 tokens is one launch of a hand-written decode kernel (all four weight blocks, route and
biases fused); larger forwards and both backward ops run ATen GEMMs (cuBLAS) into output slices, launched from
C++ (docs/cuda.md). The extension is built only on request (``SCALE_KERNELS_BUILD_CUDA=1``); without it, or on
a GPU older than sm_80, this backend reports why it is unavailable and the dispatcher skips it. Each function
is one op call on the 2-D token-major tensors of :class:`scale_kernels.backends.KernelBackend`; the ops check
every argument again in C++ (csrc/arg_check.cpp) and raise TypeError / ValueError naming it.
"""

from __future__ import annotations

import torch

from .. import backends

name = "cuda"
MIN_CAPABILITY = (8, 0)  # bf16 mma.sync tensor cores; the binding checks it too

_OPS = torch.ops.scale_kernels_cuda  # resolved at call time: the ops exist once the extension is imported

try:
    from .. import _C  # noqa: F401  (compiled extension, registers torch.ops.scale_kernels_cuda)

    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    _IMPORT_ERROR = (
        "the CUDA extension scale_kernels._C is not built (on a machine with nvcc and a CUDA build of torch: "
        f"SCALE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation . ; see docs/cuda.md): {exc}"
    )


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got device {device}"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the cuda backend supports float32/float16/bfloat16, got {dtype}"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        return f"the cuda backend needs compute capability >= 8.0 (sm_80+), {device} is {major}.{minor}"
    return None


def forward(x, w, w21, w22, w12, bias, bias_up, route):
    return _OPS.forward(x, w, w21, w22, w12, bias, bias_up, route)


def backward_input(dy, x, w, w21, w22, w12, route, need_droute: bool):
    dx, droute = _OPS.backward_input(dy, x, w, w21, w22, w12, route, need_droute)
    return dx, (droute if need_droute else None)


def backward_weight(dy, x, route, d_in: int, d_out: int, need_w21: bool, need_w22: bool, need_w12: bool):
    grads = _OPS.backward_weight(dy, x, route, d_in, d_out, need_w21, need_w22, need_w12)
    return backends.place_gradients(grads, (need_w21, need_w22, need_w12))
