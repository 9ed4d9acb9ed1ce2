"""The one-launch split RMSNorm (Triton, interpreter on CPU) against the fp64 PyTorch reference.

Forward and both gradients that exist (dx, dweight_up; the frozen weight never gets one) on odd widths, an empty
expansion, mixed weight dtypes (frozen bf16 + fp32 master weight_up, the precision policy), non-contiguous
inputs; tolerance: tests/helpers.py's rule against the PyTorch path in the same dtypes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_reference_tolerance, triton_usable
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import scale_kernels as sk
from scale_kernels.ops import split_rms_norm as srn

pytestmark = pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")


def operands(lead=(3, 7), d=45, e=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, d + e, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w_up = torch.randn(e, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(*lead, d + e, generator=g, dtype=torch.float64)
    return x, w, w_up, dy


def run(fn, x, w, w_up, dy):
    y = fn(x, w, w_up, 1e-5)
    diff = [t for t in (x, w_up) if t.requires_grad]
    grads = torch.autograd.grad(y, diff, dy.to(y.dtype), allow_unused=True)
    return [y.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, diff)]


def convert(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, w_up_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.float32),  # precision policy: fp32 master weight_up
    ],
)
@pytest.mark.parametrize("shape", [dict(d=45, e=19), dict(d=64, e=1), dict(d=7, e=130), dict(d=33, e=0)])
def test_matches_fp64_reference(x_dtype, w_dtype, w_up_dtype, shape):
    x, w, w_up, dy = operands(**shape)
    ref = run(srn.split_rms_norm_torch, x, w, w_up, dy)
    args = (convert(x, x_dtype), convert(w, w_dtype), convert(w_up, w_up_dtype), dy)
    plain = run(srn.split_rms_norm_torch, *args)
    got = run(srn.split_rms_norm, *args)
    for name, r, p, k in zip(("y", "dx", "dweight_up"), ref, plain, got):
        assert k.dtype == p.dtype, (name, k.dtype, p.dtype)
        assert_within_reference_tolerance(name, k, r, p)
    assert got[0].dtype == x_dtype and got[2].dtype == w_up_dtype


def test_original_slice_is_bitwise_the_hf_rmsnorm_in_bf16():
    """Same rounding steps as HF's RMSNorm (normalise in fp32, round to bf16, times the weight): on this data the
    1-ulp fp32 differences of rstd never reach a bf16 rounding boundary, so the original stream is bit-exact."""
    x, w, w_up, _ = operands()
    xd, wd = x.detach().bfloat16(), w.bfloat16()
    got = srn.split_rms_norm(xd, wd, w_up.detach().float(), 1e-5)
    assert torch.equal(got[..., :45], srn.rms_normalize(xd[..., :45], wd, 1e-5))
    hf = LlamaRMSNorm(45, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(wd)
        assert torch.equal(got[..., :45], hf(xd[..., :45]))


def test_non_contiguous_input_and_many_rows_per_program():
    x, w, w_up, dy = operands(lead=(11,))
    xs = torch.cat([torch.full((11, 3), float("nan")), x.detach().float()], dim=1)[:, 3:].requires_grad_()
    assert not xs.is_contiguous()  # a read outside the slice would show up as NaN
    got = run(srn.split_rms_norm, xs, w.float(), convert(w_up, torch.float32), dy)
    want = run(srn.split_rms_norm_torch, x, w, w_up, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert srn.backward_programs(11, torch.device("cpu")) < 11  # programs loop over several rows


def test_frozen_weight_never_gets_a_gradient_and_a_trainable_one_is_refused():
    x, w, w_up, dy = operands()
    x32, w32, wu32 = convert(x, torch.float32), w.float(), convert(w_up, torch.float32)
    srn.split_rms_norm(x32, w32, wu32, 1e-5).backward(dy.float())
    assert w32.grad is None
    with pytest.raises(ValueError, match="weight must be frozen"):
        srn.split_rms_norm(x32, w32.requires_grad_(), wu32, 1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 10), torch.zeros(6), torch.zeros(3)), "x must have shape"),
        ((torch.zeros(2, 9), torch.zeros(6, 1), torch.zeros(3)), "weight must be a 1-D"),
        ((torch.zeros(2, 9), torch.zeros(6), torch.zeros(3)), None),
    ],
)
def test_bad_input_raises_a_clear_error(args, match):
    if match is None:
        with pytest.raises(ValueError, match="eps must be"):
            srn.split_rms_norm(*args, float("nan"))
        return
    with pytest.raises(ValueError, match=match):
        srn.split_rms_norm(*args, 1e-6)


def test_module_runs_the_kernel_only_where_the_dispatcher_picks_triton():
    norm = sk.ScaleRMSNorm(16, 8)
    x = torch.randn(2, 3, 24)
    assert not norm.uses_kernel(x)  # auto on CPU: torch
    norm.backend = "triton"
    assert norm.uses_kernel(x)
    torch.testing.assert_close(norm(x), srn.split_rms_norm_torch(x, norm.weight, norm.weight_up, 1e-6))
    with sk.use_backend("torch"):
        norm.backend = None
        assert not norm.uses_kernel(x)
    norm.backend = "triton"
    norm.weight.requires_grad_(True)  # a trainable weight: the PyTorch path, which gives it a gradient
    assert not norm.uses_kernel(x)
    norm(x).sum().backward()
    assert norm.weight.grad is not None
