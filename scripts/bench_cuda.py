#!/usr/bin/env python3
"""GPU timing of the upscaled linear: the ``cuda`` backend vs ``triton`` vs cuBLAS.

cuBLAS appears twice: the ``torch`` backend (plain matmuls per block, what an unfused implementation
costs) and ``dense`` (one F.linear with the materialised (d_out+e_out) x (d_in+e_in) matrix: the roofline
of a single well-tuned GEMM of the same size; its backward computes dx and the full dW).

Writes one JSON file (``--out``) with the GPU, versions and, per shape / mode / backend, the median and
20/80 % quantiles (ms) of the forward and of forward+backward, and forward TFLOP/s. Run by
scripts/gpu_check_cuda.sh; needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import scale_kernels as sk

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ["4096,2048,512", "8192,4096,1024", "16,2048,512"]  # M, d, e (d_in = d_out = d)
QUANTILES = [0.5, 0.2, 0.8]


def bench(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> list[float]:
    """Median, 20 % and 80 % quantiles in ms (triton.testing.do_bench, else CUDA events)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return list(do_bench(fn, grad_to_none=grad_to_none, quantiles=QUANTILES))
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        for t in grad_to_none or []:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = torch.tensor(times).quantile(torch.tensor(QUANTILES))
    return q.tolist()


def operands(M: int, d: int, e: int, dtype: torch.dtype, mode: str) -> dict:
    """Random operands; mode ``preserve`` (no W12) or ``route`` (trainable W12, soft route with grad)."""
    dev = "cuda"
    p = {
        "x": torch.randn(M, d + e, device=dev, dtype=dtype, requires_grad=True),
        "w": torch.randn(d, d, device=dev, dtype=dtype) * d**-0.5,
        "w21": (torch.randn(e, d, device=dev, dtype=dtype) * d**-0.5).requires_grad_(True),
        "w22": (torch.randn(e, e, device=dev, dtype=dtype) * e**-0.5).requires_grad_(True),
        "w12": None,
        "route": None,
    }
    if mode == "route":
        p["w12"] = (torch.randn(d, e, device=dev, dtype=dtype) * e**-0.5).requires_grad_(True)
        p["route"] = torch.rand(M, device=dev, requires_grad=True)
    return p


def forward_flops(M: int, d: int, e: int, mode: str) -> float:
    """Useful forward FLOPs: 2 M (d d + e d + e e [+ d e with W12])."""
    return 2.0 * M * (d * d + e * d + e * e + (d * e if mode == "route" else 0))


def time_backend(p: dict, backend: str) -> dict:
    args = (p["x"], p["w"], p["w21"], p["w22"], p["w12"], None, None, p["route"])
    leaves = [t for t in args if t is not None and t.requires_grad]

    def fwd():
        with torch.no_grad():
            return sk.upscaled_linear(*args, backend=backend)

    dy = torch.randn_like(sk.upscaled_linear(*args, backend=backend))

    def fwd_bwd():
        sk.upscaled_linear(*args, backend=backend).backward(dy)

    return {"fwd_ms": bench(fwd), "fwd_bwd_ms": bench(fwd_bwd, grad_to_none=leaves)}


def time_dense(p: dict, d: int, e: int) -> dict:
    w_full = torch.randn(d + e, d + e, device="cuda", dtype=p["x"].dtype, requires_grad=True)
    x = p["x"]

    def fwd():
        with torch.no_grad():
            return F.linear(x, w_full)

    dy = torch.randn(x.shape[0], d + e, device="cuda", dtype=x.dtype)

    def fwd_bwd():
        F.linear(x, w_full).backward(dy)

    return {"fwd_ms": bench(fwd), "fwd_bwd_ms": bench(fwd_bwd, grad_to_none=[x, w_full])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--shape", action="append", help="M,d,e (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    dtype = DTYPES[args.dtype]
    report = sk.available_backends("cuda", dtype)
    backends_ = [n for n in ("cuda", "triton", "torch") if report[n] is None]
    results = []
    for shape in args.shape or DEFAULT_SHAPES:
        M, d, e = (int(v) for v in shape.split(","))
        for mode in ("preserve", "route"):
            p = operands(M, d, e, dtype, mode)
            rows = [(n, time_backend(p, n)) for n in backends_] + [("dense", time_dense(p, d, e))]
            for name, t in rows:
                flops = forward_flops(M, d, e, mode) if name != "dense" else 2.0 * M * (d + e) ** 2
                row = {"M": M, "d": d, "e": e, "mode": mode, "backend": name, **t}
                row["fwd_tflops"] = flops / (t["fwd_ms"][0] * 1e-3) / 1e12
                results.append(row)
                print(
                    f"M={M} d={d} e={e} {mode:8s} {name:6s} fwd {t['fwd_ms'][0]:.3f} ms "
                    f"({row['fwd_tflops']:.0f} TFLOP/s)  fwd+bwd {t['fwd_bwd_ms'][0]:.3f} ms"
                )
            del p
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "unavailable": {n: r for n, r in report.items() if r is not None},
        "quantiles": QUANTILES,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
