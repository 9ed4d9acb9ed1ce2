"""Compile the Triton kernels for a GPU architecture on a machine without a GPU, and report registers and spills.

``triton.compile`` runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, and the ptxas bundled with triton) for a
target given by hand; ``cuobjdump -res-usage`` (also bundled) reads the registers and the spill stack of the
cubin. This shows compile errors and register spills for sm_90 with the triton installed here; the GPU tests
(tests/test_ops_triton_gpu.py) check the same on a GPU with its own triton.

Usage (from the repository root; the script unsets TRITON_INTERPRET for itself)::

    python tests/triton_sm90_compile.py [--arch 90] [--all]

Without ``--all`` (9 compiles, the CPU test suite's check): each kernel in its most demanding variant (Route
with d(route)), with the first tile of each size class: bf16 prefill on the TMA path, bf16 decode on the
pointer path, fp32. With ``--all`` (127 compiles, a few minutes, run by hand): every tile and every
constexpr variant on both paths.

One JSON line per compile; exit status 0 if everything compiled with at most ``--max-spill-bytes`` of spill
stack (default MAX_SPILL_BYTES), 1 otherwise (the failures repeated on stderr), 77 if triton's ptxas or
cuobjdump is missing (a skip).

MAX_SPILL_BYTES tolerates a few spilled values: ptxas (triton 3.6 and 3.9) spills 8-24 bytes in a few tiles,
sometimes at well under 255 registers, and which tiles moves with unrelated code changes; the spills that
cost speed (two live accumulators at 128x256, the old weight kernel at 128x128) were 400-1800 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: before triton is imported

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scale_kernels.ops import triton_upscaled_linear as tk  # noqa: E402

SKIP_STATUS = 77
MAX_SPILL_BYTES = 32
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FP32_ONLY_POINTERS = ("route_ptr", "droute_part_ptr")
# the variants of each kernel's flags (the Route variant with d(route) first)
VARIANTS = {
    "forward": [
        dict(HAS_W12=True, HAS_ROUTE=True, HAS_BIAS=True, HAS_BIAS_UP=True),
        dict(HAS_W12=True, HAS_ROUTE=False, HAS_BIAS=True, HAS_BIAS_UP=True),
        dict(HAS_W12=False, HAS_ROUTE=False, HAS_BIAS=False, HAS_BIAS_UP=True),
    ],
    "backward_input": [
        dict(HAS_W12=True, HAS_ROUTE=True, NEED_DROUTE=True, DROUTE_COLS=tk.DROUTE_COLS),
        dict(HAS_W12=True, HAS_ROUTE=True, NEED_DROUTE=False, DROUTE_COLS=tk.DROUTE_COLS),
        dict(HAS_W12=False, HAS_ROUTE=False, NEED_DROUTE=False, DROUTE_COLS=tk.DROUTE_COLS),
    ],
    "backward_weight": [
        dict(NEED_W21=True, NEED_W22=True, NEED_W12=True, HAS_ROUTE=True),
        dict(NEED_W21=True, NEED_W22=True, NEED_W12=True, HAS_ROUTE=False),
        dict(NEED_W21=False, NEED_W22=True, NEED_W12=False, HAS_ROUTE=False),
    ],
}
KERNELS = {
    "forward": (tk._forward_kernel, tk.MN_TILES),
    "backward_input": (tk._backward_input_kernel, tk.MN_TILES),
    "backward_weight": (tk._backward_weight_kernel, tk.WEIGHT_TILES),
}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton types of the kernel's arguments: tensors of ``dtype`` (route and partial sums fp32), i32 sizes."""
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = "*fp32" if arg in FP32_ONLY_POINTERS else f"*{dtype}"
        else:
            sig[arg] = "i32"
    return sig


def compile_kernel(kernel_name: str, dtype: str, flags: dict, tile: tuple, arch: int) -> dict:
    """One compile as the launcher would specialise it: unit column strides are the constant 1, and pointers,
    row strides and widths divisible by 16 (an aligned layout)."""
    fn = KERNELS[kernel_name][0].fn
    bm, bn, bk, warps, stages = tile
    constexprs = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_SIZE_M=tk.GROUP_SIZE_M, NUM_SMS=132)
    constexprs.update({a: 1 for a in fn.arg_names if a.startswith("stride") and a.endswith("_col")})
    sig = _signature(fn, dtype, constexprs)
    aligned = [(i,) for i, a in enumerate(fn.arg_names) if sig[a] != "constexpr" and a not in ("M", "M_BUCKET")]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={key: [["tt.divisibility", 16]] for key in aligned},
    )
    start = time.time()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    seconds = time.time() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
    return {
        "kernel": kernel_name,
        "dtype": dtype,
        "tile": list(tile),
        **{k: v for k, v in flags.items() if k != "DROUTE_COLS"},
        "registers": int(fields["REG"]),
        "spill_bytes": int(fields["STACK"]),
        "shared_bytes": compiled.metadata.shared,
        "seconds": round(seconds, 2),
    }


# (dtype, size class, TMA path) compiled by default: both paths and all three classes, one compile each
DEFAULT_CASES = [("bf16", "prefill", True), ("bf16", "decode", False), ("fp32", "fp32", False)]


def plan(everything: bool) -> list[tuple[str, str, dict, tuple]]:
    """(kernel, dtype, flags, tile) to compile; the pruner's rule applies (no 128x256 for d(route))."""
    if everything:
        cases = [("bf16", c, tma) for c in ("prefill", "decode") for tma in (True, False)] + [("fp32", "fp32", False)]
    else:
        cases = DEFAULT_CASES
    jobs = []
    for kernel_name, (_, tiles) in KERNELS.items():
        for variant in VARIANTS[kernel_name] if everything else VARIANTS[kernel_name][:1]:
            for dtype, size_class, use_tma in cases:
                for tile in tiles[size_class] if everything else tiles[size_class][:1]:
                    if not (variant.get("NEED_DROUTE") and tile[1] > 128):
                        jobs.append((kernel_name, dtype, dict(variant, USE_TMA=use_tma, PRECISION="ieee"), tile))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (default 90)")
    parser.add_argument("--all", action="store_true", help="every tile and every variant")
    parser.add_argument("--max-spill-bytes", type=int, default=MAX_SPILL_BYTES, help="spill stack tolerated")
    args = parser.parse_args(argv)
    if not (NVIDIA_BIN / "ptxas").is_file() or not (NVIDIA_BIN / "cuobjdump").is_file():
        print(f"triton's ptxas/cuobjdump not found under {NVIDIA_BIN}", file=sys.stderr)
        return SKIP_STATUS
    failures = []
    for kernel_name, dtype, flags, tile in plan(args.all):
        try:
            report = compile_kernel(kernel_name, dtype, flags, tile, args.arch)
        except Exception as exc:  # a compile error is the finding: report it and go on
            report = {"kernel": kernel_name, "dtype": dtype, "tile": list(tile), **flags, "error": repr(exc)[:2000]}
        line = json.dumps(report)
        print(line, flush=True)
        if "error" in report or report["spill_bytes"] > args.max_spill_bytes:
            failures.append(line)
    if failures:
        print("compile errors or spills:\n" + "\n".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
