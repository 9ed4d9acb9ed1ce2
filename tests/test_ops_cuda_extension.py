"""The ``cuda`` backend (compiled extension ``scale_kernels._C``) on a GPU, against the fp64 reference.

GPU tests are marked ``gpu`` and skip with the reason without a CUDA device or without the built extension
(build: docs/cuda.md; on a GPU machine run scripts/gpu_check_cuda.sh). The same ops run on CPU in CI through
the CPU test library (tests/test_csrc_compile.py); here the real binding, nvcc's code and the tensor cores are
checked. Tolerances: the shared rule of ``helpers.assert_matches_reference`` (kernel error <= 2 x plain-PyTorch
error in the same dtype + a few ulps). The whole file takes well under a minute on an H100.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, make_operands, run

import scale_kernels as sk
from scale_kernels.backends import unavailable_reason

HAS_CUDA = torch.cuda.is_available()
_REASON = unavailable_reason("cuda", torch.device("cuda"), torch.float32) if HAS_CUDA else "no CUDA device"
_skip_without_ext = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")


def needs_cuda_ext(fn):
    """GPU test of the built extension: marked ``gpu``, skipped with the reason when it cannot run."""
    return pytest.mark.gpu(_skip_without_ext(fn))


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
SIZES = {  # lead, d_in, e_in, d_out, e_out; <= 64 tokens: the decode kernel, more: ATen GEMMs
    "decode_1": ((1,), 70, 33, 65, 17),  # one token, partial 32-column chunks and 16-row blocks everywhere
    "decode_odd_3d": ((3, 7), 70, 33, 65, 17),  # 21 tokens: 4 groups of 8, the last partial
    "decode_64_aligned": ((64,), 64, 64, 128, 64),  # 8 token groups, 128-bit loads throughout
    "decode_tiny": ((2, 1), 8, 3, 5, 2),  # odd row stride: scalar loads only
    "decode_e_in0": ((5,), 40, 0, 24, 8),  # input not widened
    "decode_e_out0": ((9,), 24, 16, 48, 0),  # LM head: logits only
    "prefill_odd_3d": ((3, 37), 70, 33, 65, 17),  # 111 tokens
    "prefill_aligned": ((130,), 64, 64, 128, 64),
    "empty": ((0,), 16, 8, 16, 8),  # M = 0: weight gradients are zeros
}


def _ops(size: str, **kw):
    lead, d_in, e_in, d_out, e_out = SIZES[size]
    return make_operands(lead, d_in, e_in, d_out, e_out, device="cuda", **kw)


def _cuda(*args):
    return sk.upscaled_linear(*args, backend="cuda")


# ------------------------------------------------------------------------------------------------
# dispatcher (runs everywhere)


def test_unbuilt_extension_says_how_to_build_it():
    try:
        import scale_kernels._C  # noqa: F401
    except ImportError:
        assert "SCALE_KERNELS_BUILD_CUDA=1" in sk.available_backends("cpu")["cuda"]
    else:
        assert "needs CUDA tensors" in sk.available_backends("cpu")["cuda"]


# ------------------------------------------------------------------------------------------------
# reference tests (GPU + extension)


@needs_cuda_ext
@DTYPES
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("route", ["none", "zeros", "random", "soft"])
@pytest.mark.parametrize("w12", ["none", "frozen", "trainable"])
def test_matches_reference(dtype, size, route, w12):
    if w12 == "none" and route != "none":
        pytest.skip("without W12 the route has nothing to gate (covered by route='none')")
    assert_matches_reference(_ops(size, w12=w12, route=route, bias=route != "zeros"), dtype, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("tokens", [1, 2, 8, 9, 16, 17, 32, 33, 63, 64, 65])
def test_every_token_count_of_the_decode_kernel(tokens):
    """1, 2, 4 and 8 groups of 8 tokens per CTA (partial and full), and the switch to ATen at 65."""
    ops = make_operands((tokens,), 96, 40, 72, 24, route="soft", device="cuda", seed=tokens)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            assert_matches_reference(ops, dtype, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("size", ["decode_odd_3d", "prefill_odd_3d"])
@pytest.mark.parametrize("layout", ["sliced", "transposed", "weights_t"])
def test_non_contiguous_operands_match_reference(size, layout):
    """x as a column slice (read in place), x with transposed leading dims, transposed weights (copied for the
    decode kernel; ATen reads them as they are)."""
    assert_matches_reference(_ops(size, route="soft"), torch.bfloat16, "cuda", layout=layout)


@needs_cuda_ext
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "misaligned", "transposed_w21"])
def test_decode_strided_operands_are_bitwise_the_contiguous_result(layout):
    """x as a column slice (its row stride used as is), transposed (copied), or one element off 16-byte
    alignment (scalar loads instead of 128-bit ones); a transposed weight (copied). Only how values are
    loaded changes, never the summation order, so the forward is bitwise the contiguous one."""
    ops = _ops("decode_64_aligned", route="soft").to(torch.float16)
    with torch.no_grad():
        expected = _cuda(*ops.args())
        x = ops.x
        if layout == "column_slice":
            ops.x = torch.cat([x, torch.randn_like(x[:, :5])], dim=1)[:, : x.shape[1]]
        elif layout == "transposed":
            ops.x = x.t().contiguous().t()
        elif layout == "misaligned":
            ops.x = torch.cat([torch.randn_like(x[:, :1]), x], dim=1)[:, 1:]
        else:
            ops.w21 = ops.w21.t().contiguous().t()
        assert not (ops.x.is_contiguous() and ops.w21.is_contiguous())
        assert torch.equal(_cuda(*ops.args()), expected)


@needs_cuda_ext
@pytest.mark.parametrize("frozen", [("x",), ("w21",), ("w22",), ("w21", "w22"), ("x", "w21", "w22"), ("route",)])
def test_partial_gradients(frozen):
    """Only some operands require grad: the ops compute just those and still match."""
    ops = _ops("decode_odd_3d", route="soft")
    for name in frozen:
        getattr(ops, name).requires_grad_(False)
    assert_matches_reference(ops, torch.bfloat16, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("tokens", [5, 70], ids=["decode", "aten"])
def test_non_finite_inputs_propagate_like_pytorch(tokens):
    """A route-0 token whose x_up is NaN gets a NaN original output, as (x_up W12^T) * 0 does in PyTorch; an
    inf weight reaches exactly the outputs that read it. In fp32 also the finite values and every gradient
    against the fp64 reference."""
    ops = make_operands((tokens,), 20, 12, 37, 9, route="zeros", device="cuda")
    with torch.no_grad():
        ops.x[2, 25] = float("nan")
        ops.w21[3, 4] = float("inf")
        bf16 = ops.to(torch.bfloat16)
        got, ref = _cuda(*bf16.args()), sk.upscaled_linear_reference(*bf16.args())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    assert_matches_reference(ops, torch.float32, "cuda")


@needs_cuda_ext
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_decode_forward_is_one_kernel_launch(tokens):
    """<= 64 tokens: the op launches exactly one CUDA kernel (the decode kernel): all four blocks, the route
    and both biases in one launch; nothing else (no cat, no extra GEMM)."""
    ops = make_operands((tokens,), 256, 64, 256, 64, route="soft", device="cuda").to(torch.bfloat16)
    args = [t.detach() if t is not None else None for t in ops.args()]
    args[7] = args[7].float()
    torch.ops.scale_kernels_cuda.forward(*args)  # warm-up (lazy module loading)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.scale_kernels_cuda.forward(*args)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "decode_kernel" in kernels[0], kernels


@needs_cuda_ext
def test_runs_on_the_current_stream():
    ops = _ops("decode_odd_3d", route="soft").to(torch.bfloat16)
    dy = torch.randn(*ops.x.shape[:-1], 65 + 17, device="cuda")
    expected = run(ops, _cuda, dy)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # a busy stream: a launch on the wrong stream would race with it
        got = run(ops, _cuda, dy)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got[0], expected[0])  # the decode kernel: bitwise
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e)  # cuBLAS may pick another algorithm on another stream


@needs_cuda_ext
@pytest.mark.parametrize("tokens", [7, 300])
def test_deterministic(tokens):
    """Fixed-order reductions in the decode kernel, deterministic cuBLAS GEMMs: two runs are bitwise equal."""
    ops = make_operands((tokens,), 130, 200, 70, 90, route="soft", device="cuda").to(torch.float16)
    dy = torch.randn(tokens, 160, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(run(ops, _cuda, dy), run(ops, _cuda, dy)))


@needs_cuda_ext
def test_binding_rejects_bad_arguments():
    """The op itself (not only the Python layer) raises a TypeError / ValueError naming the argument."""
    ops = torch.ops.scale_kernels_cuda
    x = torch.randn(4, 6, device="cuda")
    w, w21, w22, w12 = (torch.randn(s, device="cuda") for s in [(3, 4), (2, 4), (2, 2), (3, 2)])
    with pytest.raises(TypeError, match="route must have dtype Float"):
        ops.forward(x, w, w21, w22, w12, None, None, torch.ones(4, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match=r"w22 must have shape \(2, 2\)"):
        ops.forward(x, w, w21, torch.randn(2, 3, device="cuda"), None, None, None, None)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.forward(x, w.half(), w21, w22, None, None, None, None)
    with pytest.raises(ValueError, match="x must be a cuda tensor, got device cpu"):
        ops.forward(x.cpu(), w, w21, w22, None, None, None, None)
    with pytest.raises(ValueError, match="w21 must be a cuda tensor, got device cpu"):
        ops.forward(x, w, w21.cpu(), w22, None, None, None, None)
    with pytest.raises(ValueError, match="need_droute=True requires x"):
        ops.backward_input(torch.randn(4, 5, device="cuda"), None, w, w21, w22, w12, None, True)
    with pytest.raises(ValueError, match=r"d_in must be in \[0, 6\]"):
        ops.backward_weight(torch.randn(4, 5, device="cuda"), x, None, 9, 3, True, True, True)
    assert ops.forward(x, w, w21, w22, w12, None, None, None).shape == (4, 5)  # and the process is still fine


SANITIZER_CASES = [  # tokens, d_in, e_in, d_out, e_out, misaligned x
    (1, 40, 24, 72, 24, False),
    (13, 37, 66, 65, 5, True),
    (33, 64, 64, 48, 16, False),
    (64, 24, 0, 17, 9, True),
    (70, 37, 66, 65, 5, False),
]


@needs_cuda_ext
@pytest.mark.parametrize("scope", ["decode_forward", "everything"])
def test_sanitizer_cases(scope):
    """Small cases covering every decode kernel instantiation and load path (and, for scope "everything", the
    ATen forward and both backward ops), checked against plain PyTorch computed on the CPU, so the GPU runs
    nothing but the extension's own work. scripts/gpu_check_cuda.sh runs this under compute-sanitizer:
    memcheck with both scopes (caching allocator off: every tensor is its own allocation), racecheck with
    "decode_forward" (the only kernel with shared memory of ours)."""
    backward = scope == "everything"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens, d_in, e_in, d_out, e_out, misaligned in SANITIZER_CASES:
            if tokens > 64 and not backward:
                continue
            cpu = make_operands((tokens,), d_in, e_in, d_out, e_out, route="soft").to(dtype)
            dy = torch.randn(tokens, d_out + e_out, dtype=dtype)
            expected = run(cpu, sk.upscaled_linear_reference, dy)
            gpu = cpu.to(dtype)
            for name, t in cpu.differentiable() + [("w", cpu.w), ("bias", cpu.bias)]:
                setattr(gpu, name, t.detach().cuda().requires_grad_(t.requires_grad and backward))
            if misaligned:
                x = gpu.x.detach()
                gpu.x = torch.cat([x[:, :1], x], dim=1)[:, 1:].requires_grad_(backward)
            got = run(gpu, _cuda, dy.cuda()) if backward else [_cuda(*gpu.args())]
            for g, e in zip(got, expected):
                g, e = g.double().cpu(), e.double()
                assert not e.numel() or (g - e).abs().max() <= 0.05 * (e.abs().max() + 1), (dtype, tokens)  # gross


# ------------------------------------------------------------------------------------------------
# every backend agrees on a realistic shape


@needs_cuda_ext
@pytest.mark.slow
@DTYPES
@pytest.mark.parametrize("lead", [(4096,), (7,)], ids=["prefill", "decode"])
def test_all_backends_agree_realistic(dtype, lead):
    """M = 4096 (and 7) tokens, d = 2048, e = 512, trainable W12 with a soft route: each backend vs fp64."""
    ops = make_operands(lead, 2048, 512, 2048, 512, route="soft", device="cuda", seed=3)
    report = sk.available_backends("cuda", dtype)
    usable = [name for name, reason in report.items() if reason is None]
    assert {"cuda", "torch"} <= set(usable), report
    for name in usable:
        assert_matches_reference(ops, dtype, name)
    if "triton" not in usable:
        pytest.skip(f"cuda and torch agree; triton unavailable: {report['triton']}")
