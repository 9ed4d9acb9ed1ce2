"""Round-to-nearest-even stores that behave the same on the GPU and in the Triton interpreter.

On the GPU ``x.to(tl.bfloat16)`` rounds fp32 to nearest even; the interpreter (TRITON_INTERPRET=1) truncates
(triton 3.9 ``interpreter.py`` ``cast_impl`` passes no rounding mode for fp32 -> bf16). Kernels that must match
PyTorch's rounding call :func:`round_to` with ``FIX_BF16`` set under the interpreter: the fp32 bits get the
round-to-nearest-even bias added before the (then exact) truncation. NaN/inf are left alone.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# TRITON_INTERPRET=1 (set before triton is imported): triton runs the kernels in its interpreter. The one copy
# of this flag: every kernel module imports it from here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FIX_BF16 = tl.constexpr(INTERPRET)  # pass as round_to's FIX_BF16


@triton.jit
def round_to(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """``x`` (fp32) converted to ``dtype`` with round-to-nearest-even."""
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        finite = (bits & 0x7F800000) != 0x7F800000
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        x = tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)
    return x.to(dtype)
