"""GPU checks of the fused kernels (bf16/fp16/fp32, realistic shapes). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_operands

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)


@GPU_DTYPES
@pytest.mark.parametrize("route", ["none", "random", "soft"])
@pytest.mark.parametrize("w12", ["none", "frozen", "trainable"])
def test_triton_odd_shapes_gpu(dtype, route, w12):
    ops = make_operands(lead=(3, 37), w12=w12, route=route, device="cuda")
    assert_matches_reference(ops, dtype, "triton")


@GPU_DTYPES
@pytest.mark.parametrize("lead", [(4096,), (7,)], ids=["prefill", "decode"])
def test_triton_realistic_shapes_gpu(dtype, lead):
    ops = make_operands(lead=lead, d_in=2048, e_in=512, d_out=2048, e_out=512, route="soft", device="cuda")
    assert_matches_reference(ops, dtype, "triton")
