"""Benchmark of the ``cuda`` backend: decode latency against the alternatives, large-T forward against a GEMM.

Decode (default T = 1, 4, 16, 64 tokens, d = 4096, e = 1024, every mode, inference forward): ``cuda`` (the
one-launch decode kernel), ``cuda_op`` (the same op called directly, without the Python dispatch layers),
``triton``, ``torch`` (the composed backend) and ``handwritten`` (plain PyTorch as a user writes it), all in
the same run. Each is timed twice with benchmarks.timing: one call (GPU time, L2 flushed between runs) and
per call in a loop of 20 back-to-back calls (host overhead included where it dominates, as in a decode loop).
Achieved HBM bandwidth = the bytes a call must move (every weight element once, x, y) / time, also as a
fraction of 3 TB/s. Ratios: other / cuda (> 1: cuda is faster); targets: >= 3x handwritten and >= 1.5x triton
at T <= 16.

Large T (default 4096 and 16384): ``cuda`` forward (ATen GEMMs into output slices) against one frozen GEMM of
the same FLOPs (benchmarks.cases.equal_flop_gemm_shape); target >= 0.9x.

Writes ``--out`` (JSON, rewritten after every case so a cut-short run keeps what it measured) and a Markdown
summary next to it (same name, ``.md``). Needs a CUDA device and the built extension (docs/cuda.md). Run from
the repository root as ``python -m scripts.bench_cuda --out FILE``, by scripts/gpu_check_cuda.sh.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.cases import MODES, LayerCase, equal_flop_gemm_shape
from benchmarks.impls import usable_backends
from benchmarks.layers import EqualFlopGemm, FusedUpscaledLinear, HandWrittenUpscaledLinear
from benchmarks.results import environment
from benchmarks.schema import write_json
from benchmarks.timing import TimerConfig, Timing, measure
from scale_kernels.ops import cuda_upscaled_linear

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DECODE_IMPLS = ("cuda", "cuda_op", "triton", "torch", "handwritten")
REFERENCE_HBM_BYTES_PER_S = 3.0e12
LOOP_CALLS = 20
TARGETS = {"handwritten": 3.0, "triton": 1.5}  # decode forward speed-up of cuda at T <= 16
TARGET_DECODE_TOKENS = 16
TARGET_GEMM_RATIO = 0.9  # large-T forward: cuda at >= 0.9x the equal-FLOP GEMM's speed


def _inputs(case: LayerCase, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (T, d + e) and, in Route mode, a bool mask with each token on the W12 path with p = 0.5."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.tokens, case.d + case.e, device=device, dtype=dtype, generator=gen)
    route = None
    if case.mode == "route":
        route = torch.rand(case.tokens, device=device, generator=gen) < 0.5
    return x, route


def decode_forward(impl: str, case: LayerCase, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """An inference forward of ``impl`` on ``case`` (parameters seeded identically for every implementation)."""
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    if impl == "handwritten":
        module = HandWrittenUpscaledLinear(case.d, case.e, case.has_w12, **factory)
    else:
        module = FusedUpscaledLinear(case.d, case.e, case.has_w12, "cuda" if impl == "cuda_op" else impl, **factory)
    x, route = _inputs(case, device, dtype)
    if impl == "cuda_op":  # the op the backend calls, on the tensors it receives (float32 route)
        w, w21, w22, w12 = (t.detach() if t is not None else None for t in module.blocks())
        r = route.float() if route is not None else None
        return lambda: cuda_upscaled_linear.forward(x, w, w21, w22, w12, None, None, r)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(x, route)

    return forward


def bytes_moved(case: LayerCase, dtype: torch.dtype) -> int:
    """What one forward must move at least: every weight element once, x in, y out."""
    d, e = case.d, case.e
    weights = d * d + e * d + e * e + (d * e if case.has_w12 else 0)
    activations = 2 * case.tokens * (d + e)
    return (weights + activations) * torch.finfo(dtype).bits // 8


def _ms(t: Timing) -> list[float]:
    return [t.median_ms, t.p20_ms, t.p80_ms]


def time_decode(impl: str, case: LayerCase, device: torch.device, dtype: torch.dtype, cfg: TimerConfig) -> dict:
    fn = decode_forward(impl, case, device, dtype)
    output = fn()
    single = measure(fn, device, cfg)
    loop = measure(lambda: [fn() for _ in range(LOOP_CALLS)], device, cfg)
    per_call = loop.median_ms / LOOP_CALLS
    moved = bytes_moved(case, dtype)
    return {
        "output": output,
        "row": {
            "impl": impl,
            "fwd_ms": _ms(single),
            "fwd_loop_ms_per_call": per_call,
            "bytes": moved,
            "hbm_TBps": moved / (single.median_ms * 1e-3) / 1e12,
            "hbm_fraction_of_3TBps": moved / (single.median_ms * 1e-3) / REFERENCE_HBM_BYTES_PER_S,
        },
    }


def time_large(case: LayerCase, device: torch.device, dtype: torch.dtype, cfg: TimerConfig) -> dict:
    """cuda forward vs the equal-FLOP GEMM at large T."""
    cuda = decode_forward("cuda", case, device, dtype)
    m, n, k = equal_flop_gemm_shape(case)
    gemm = EqualFlopGemm(n, k, device=device, dtype=dtype)
    a = torch.randn(m, k, device=device, dtype=dtype)

    def gemm_forward() -> torch.Tensor:
        with torch.no_grad():
            return gemm(a)

    t_cuda, t_gemm = measure(cuda, device, cfg), measure(gemm_forward, device, cfg)
    flops = case.forward_flops()
    return {
        "tokens": case.tokens,
        "d": case.d,
        "e": case.e,
        "mode": case.mode,
        "cuda_fwd_ms": _ms(t_cuda),
        "gemm_fwd_ms": _ms(t_gemm),
        "gemm_shape_mnk": [m, n, k],
        "cuda_tflops": flops / (t_cuda.median_ms * 1e-3) / 1e12,
        "gemm_tflops": 2 * m * n * k / (t_gemm.median_ms * 1e-3) / 1e12,
        "cuda_speed_vs_gemm": (flops / t_cuda.median_ms) / (2 * m * n * k / t_gemm.median_ms),
        "target": TARGET_GEMM_RATIO,
    }


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a sanity check that every implementation computed the same layer."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / (b.abs().max().item() + 1e-6)


def decode_ratios(rows: list[dict]) -> dict:
    """other / cuda for the single-call and the loop timings (> 1: cuda is faster)."""
    by_impl = {r["impl"]: r for r in rows}
    cuda = by_impl.get("cuda")
    if cuda is None:
        return {}
    out = {}
    for name, r in by_impl.items():
        if name != "cuda":
            out[name] = {
                "single": r["fwd_ms"][0] / cuda["fwd_ms"][0],
                "loop": r["fwd_loop_ms_per_call"] / cuda["fwd_loop_ms_per_call"],
            }
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# cuda backend benchmark: {report['gpu']} ({report['dtype']}, timer {report['timer']})",
        "",
        "Decode forward, d = {d}, e = {e}: cuda time, achieved HBM bandwidth, and other / cuda ratios "
        "(single call; loop of 20 in brackets).".format(**report["decode_shape"]),
        "",
        "| T | mode | cuda us | TB/s (of 3) | vs handwritten | vs triton | vs torch | vs cuda_op |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["decode"]:
        cuda = next((r for r in c["rows"] if r["impl"] == "cuda"), None)
        if cuda is None:
            continue
        cells = []
        for name in ("handwritten", "triton", "torch", "cuda_op"):
            ratio = c["ratios"].get(name)
            cells.append(f"{ratio['single']:.2f} ({ratio['loop']:.2f})" if ratio else "n/a")
        bw = f"{cuda['hbm_TBps']:.2f} ({cuda['hbm_fraction_of_3TBps']:.0%})"
        lines.append(
            f"| {c['tokens']} | {c['mode']} | {cuda['fwd_ms'][0] * 1e3:.1f} | {bw} | " + " | ".join(cells) + " |"
        )
    if report["large_t"]:
        lines += ["", "Large T forward: cuda vs the equal-FLOP GEMM (target >= 0.9).", ""]
        lines += [
            "| T | mode | cuda ms | GEMM ms | cuda TFLOP/s | speed vs GEMM |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["large_t"]:
            lines.append(
                f"| {r['tokens']} | {r['mode']} | {r['cuda_fwd_ms'][0]:.3f} | {r['gemm_fwd_ms'][0]:.3f} | "
                f"{r['cuda_tflops']:.0f} | {r['cuda_speed_vs_gemm']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _save(report: dict, out: Path) -> None:
    write_json(report, out)  # atomic: a run killed mid-write leaves the previous case's file
    out.with_suffix(".md").write_text(markdown(report))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (plus a .md summary)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--e", type=int, default=1024)
    parser.add_argument("--tokens", type=_ints, default=(1, 4, 16, 64), help="decode token counts, e.g. 1,4,16,64")
    parser.add_argument("--large-tokens", type=_ints, default=(4096, 16384), help="large-T token counts")
    parser.add_argument("--modes", type=lambda s: tuple(s.split(",")), default=MODES)
    parser.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scripts.bench_cuda needs a CUDA device")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    available = usable_backends(device, dtype)
    if available.get("cuda") is not None:
        raise SystemExit(f"the cuda backend is unavailable: {available['cuda']}")
    impls = [i for i in DECODE_IMPLS if available.get(i) is None]  # cuda_op / handwritten are always usable
    cfg = TimerConfig(do_bench_warmup_ms=10, do_bench_rep_ms=args.rep_ms)
    env = environment(device)  # device name, torch / cuda / triton / python versions, commit, time
    report = {
        **env,
        "gpu": env["device_name"],
        "capability": list(torch.cuda.get_device_capability(device)),
        "dtype": args.dtype,
        "timer": cfg.method(device),
        "reference_hbm_bytes_per_s": REFERENCE_HBM_BYTES_PER_S,
        "loop_calls": LOOP_CALLS,
        "targets": {"decode_speedup_at_T_le_16": TARGETS, "large_t_speed_vs_gemm": TARGET_GEMM_RATIO},
        "unavailable": {n: r for n, r in available.items() if r is not None},
        "decode_shape": {"d": args.d, "e": args.e},
        "decode": [],
        "large_t": [],
    }
    for tokens in args.tokens:
        for mode in args.modes:
            case = LayerCase(tokens, args.d, args.e, mode)
            timed = {impl: time_decode(impl, case, device, dtype, cfg) for impl in impls}
            reference = timed["torch"]["output"]
            rows = [
                {**t["row"], "max_rel_diff_vs_torch": relative_diff(t["output"], reference)} for t in timed.values()
            ]
            entry = {"tokens": tokens, "mode": mode, "rows": rows, "ratios": decode_ratios(rows)}
            if tokens <= TARGET_DECODE_TOKENS:
                entry["targets_met"] = {
                    name: entry["ratios"][name]["single"] >= goal
                    for name, goal in TARGETS.items()
                    if name in entry["ratios"]
                }
            report["decode"].append(entry)
            print(f"T={tokens} {mode}: " + ", ".join(f"{r['impl']} {r['fwd_ms'][0] * 1e3:.1f} us" for r in rows))
            _save(report, args.out)
    for tokens in args.large_tokens:
        for mode in args.modes:
            row = time_large(LayerCase(tokens, args.d, args.e, mode), device, dtype, cfg)
            report["large_t"].append(row)
            print(
                f"T={tokens} {mode}: cuda {row['cuda_fwd_ms'][0]:.3f} ms, speed vs GEMM {row['cuda_speed_vs_gemm']:.2f}"
            )
            _save(report, args.out)
            torch.cuda.empty_cache()
    _save(report, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
