"""pytest-benchmark microbenchmarks: this package's op vs the hand-written PyTorch layer on small shapes.

    pytest benchmarks/test_microbench.py                        # timed (pytest-benchmark statistics)
    pytest benchmarks/test_microbench.py --benchmark-disable    # CI smoke: every case runs once

Runs on CPU (torch backend, float32; the Triton interpreter is never timed) and, where CUDA is present, on
the GPU in bfloat16 with every usable backend (triton / cuda too). Cases are grouped so each group compares
implementations side by side.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_layer import pass_fn
from benchmarks.cases import MODES, PASSES, LayerCase
from benchmarks.impls import HANDWRITTEN, build_workload, usable_backends
from benchmarks.schema import package_impl
from benchmarks.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = (8, 512)  # decode-sized and prefill-sized (small enough for CPU)
HIDDEN = 256
# on CPU only the torch backend: under TRITON_INTERPRET=1 the interpreter would be timed, not a kernel
BACKENDS = [
    b for b, why in usable_backends(DEVICE, DTYPE).items() if why is None and (DEVICE.type == "cuda" or b == "torch")
]
IMPLS = [package_impl(b) for b in BACKENDS] + [HANDWRITTEN]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_upscaled_linear(benchmark, impl: str, pass_name: str, mode: str, tokens: int) -> None:
    case = LayerCase(tokens, HIDDEN, HIDDEN // 4, mode)
    workload = build_workload(impl, case, DEVICE, DTYPE)
    run = pass_fn(workload, pass_name)
    grads = workload.trainable()

    def step() -> None:
        for t in grads:
            t.grad = None
        run()
        synchronize(DEVICE)

    benchmark.group = f"{pass_name} {case.label}"
    benchmark.extra_info.update(case.as_dict(), flops=case.flops(pass_name), device=str(DEVICE))
    benchmark(step)
    if pass_name != "forward":  # the pass really ran a backward: every trainable weight got a gradient
        assert all(p.grad is not None for p in workload.module.parameters() if p.requires_grad)
