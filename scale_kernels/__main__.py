"""``python -m scale_kernels``: check every usable backend against the fp64 reference and end with a verdict.

Each backend runs the op (forward and every gradient) on odd shapes: with W12, both biases and a bool route;
without W12 or bias (Preserve); with a float route gate that gets a gradient. A result passes when its max
error against the fp64 reference is at most twice plain PyTorch's error in the same dtype plus a few ulps
(the test suite's rule). The last line is the verdict; the exit status is 1 when a backend fails.

``--interpret`` re-runs the check with ``TRITON_INTERPRET=1`` set before triton is imported: the Triton
kernels then run in Triton's interpreter on the CPU. That checks the kernels' logic on a machine without a
GPU; it says nothing about the GPU's code generation or speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import torch

from . import __version__, available_backends, last_backend, upscaled_linear, upscaled_linear_reference
from .dispatch_table import DTYPES
from .reference import error_limit

Tensor = torch.Tensor
INTERPRET_ENV = "TRITON_INTERPRET"
# name -> (W12 present, biases present, route: None / "bool" / "float" (a gate that gets a gradient))
CASES: dict[str, tuple[bool, bool, str | None]] = {
    "W12, biases, bool route": (True, True, "bool"),
    "no W12, no bias (Preserve)": (False, False, None),
    "float route gate": (True, False, "float"),
}
SHAPE = {"lead": (3, 7), "d_in": 45, "e_in": 19, "d_out": 53, "e_out": 11}  # odd sizes, two leading dims
GRADIENTS = ("x", "w21", "w22", "w12", "bias_up", "route")


def _operands(case: tuple[bool, bool, str | None], seed: int) -> dict[str, Tensor | None]:
    """fp64 operands of the op (``w`` and ``bias`` frozen, every other floating tensor trainable)."""
    has_w12, has_bias, route_kind = case
    lead, d_in, e_in, d_out, e_out = (SHAPE[k] for k in ("lead", "d_in", "e_in", "d_out", "e_out"))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    route = None
    if route_kind == "bool":
        route = torch.rand(lead, generator=g) < 0.5
    elif route_kind == "float":
        route = torch.rand(lead, generator=g, dtype=torch.float64)
    return {
        "x": rnd(*lead, d_in + e_in),
        "w": rnd(d_out, d_in, scale=d_in**-0.5),
        "w21": rnd(e_out, d_in, scale=d_in**-0.5),
        "w22": rnd(e_out, e_in, scale=e_in**-0.5),
        "w12": rnd(d_out, e_in, scale=e_in**-0.5) if has_w12 else None,
        "bias": rnd(d_out) if has_bias else None,
        "bias_up": rnd(e_out) if has_bias else None,
        "route": route,
    }


def _run(op: Callable[..., Tensor], ops: dict[str, Tensor | None], dtype: torch.dtype, device: str) -> dict:
    """``{"y": output, name: gradient}`` of ``op`` on ``ops`` cast to ``dtype`` (fixed output gradient)."""
    leaves = {}
    for name, t in ops.items():
        if t is not None and t.is_floating_point():
            t = t.to(device, dtype, copy=True).requires_grad_(name in GRADIENTS)
        elif t is not None:
            t = t.to(device)
        leaves[name] = t
    y = op(*(leaves[k] for k in ("x", "w", "w21", "w22", "w12", "bias", "bias_up", "route")))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, y.dtype)
    y.backward(dy)
    out = {"y": y.detach()}
    out.update({f"d{n}": leaves[n].grad for n in GRADIENTS if leaves[n] is not None and leaves[n].requires_grad})
    return out


def check_backend(name: str, device: str, dtype: torch.dtype) -> tuple[list[str], float]:
    """``(failures, worst error / limit)`` of backend ``name`` over :data:`CASES` (forward and gradients)."""
    failures, worst = [], 0.0
    for case_name, case in CASES.items():
        ops = _operands(case, seed=len(case_name))
        ref = _run(upscaled_linear_reference, ops, torch.float64, "cpu")
        plain = _run(upscaled_linear_reference, ops, dtype, device)
        try:
            got = _run(lambda *a: upscaled_linear(*a, backend=name), ops, dtype, device)
        except Exception as e:  # report, never crash: the verdict names the backend
            failures.append(f"{case_name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            continue
        if last_backend() != name:
            failures.append(f"{case_name}: ran on backend {last_backend()!r}, not {name!r}")
        for key, r in ref.items():
            err = (got[key].cpu().double() - r).abs().max().item()
            limit = error_limit(r, plain[key].cpu(), dtype)
            worst = max(worst, err / limit)
            if not err <= limit:  # also catches NaN
                failures.append(f"{case_name}: {key} error {err:.2e} > limit {limit:.2e}")
    return failures, worst


def main(argv: list[str] | None = None) -> int:
    """Run the self-check; returns the exit status (0: every usable backend passes, 1: one fails)."""
    parser = argparse.ArgumentParser(prog="python -m scale_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interpret",
        action="store_true",
        help=f"check the Triton kernels on this CPU in Triton's interpreter ({INTERPRET_ENV}=1; not a GPU check)",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help=f"comma-separated, from {', '.join(DTYPES)} (default: float32,bfloat16, and float16 on a GPU)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    unknown = [d for d in (args.dtypes or "").split(",") if d and d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    interpreting = os.environ.get(INTERPRET_ENV) == "1"
    if args.interpret and not interpreting:  # triton reads the variable when imported: a fresh process
        env = {**os.environ, INTERPRET_ENV: "1"}
        rest = [a for a in argv if a != "--interpret"]  # the child knows from the variable (and never re-runs)
        return subprocess.run([sys.executable, "-m", "scale_kernels", *rest], env=env).returncode
    device = "cuda" if torch.cuda.is_available() and not interpreting else "cpu"
    names = args.dtypes.split(",") if args.dtypes else ["float32", "bfloat16"] + ["float16"] * (device == "cuda")
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"scale_kernels {__version__} self-check on {where}, torch {torch.__version__}")
    if interpreting:
        print(
            f"  {INTERPRET_ENV}=1: the Triton kernels run in Triton's interpreter on the CPU (their logic is "
            "checked, not the GPU's code generation or speed)"
        )
    passed, failed, told = [], [], set()
    for dtype_name in dict.fromkeys(names):
        for name, reason in available_backends(device, DTYPES[dtype_name]).items():
            label = f"{name} {dtype_name}"
            if reason is not None:
                if (name, reason) not in told:  # once per backend unless the reason depends on the dtype
                    told.add((name, reason))
                    print(f"  {name:16s} not usable here: {reason}")
                continue
            failures, worst = check_backend(name, device, DTYPES[dtype_name])
            if failures:
                failed.append(label)
                print(f"  {label:16s} FAILED: " + "; ".join(failures))
            else:
                passed.append(label)
                print(f"  {label:16s} ok: forward and gradients, {len(CASES)} cases, worst error {worst:.2f} x limit")
    if failed:
        print(f"verdict: FAILED: {', '.join(failed)} differ from the fp64 reference ({len(passed)} passed)")
        return 1
    if not passed:
        print("verdict: FAILED: no backend is usable here for these dtypes")
        return 1
    hint = "" if interpreting or device == "cuda" else "; `python -m scale_kernels --interpret` checks Triton's kernels"
    print(f"verdict: ok: every usable backend matches the fp64 reference ({', '.join(passed)}){hint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
