"""Model-level benchmark: tokens/s and peak memory of a continual-pre-training step.

    python -m benchmarks.bench_model                # Llama-shaped ~1B (random weights) +25% width, CUDA, bf16
    python -m benchmarks.bench_model --smoke        # tiny Llama config on CPU, each step once

Variants, all in the same dtype with AdamW over their trainable parameters: ``full_ft`` (base model, every
weight trains), ``lora`` (peft, r=16), ``handwritten_upscaled`` (the upscaled model with hand-written
linears, see ``benchmarks/model_variants.py``) and ``scale_kernels[<backend>]`` (this package's upscaled
model). One step = forward with the LM loss, backward, optimizer step, ``zero_grad(set_to_none=True)``;
each with gradient checkpointing off and on.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import torch
from torch import nn

import scale_kernels
from scale_kernels.backends import record_backend

from . import cli
from . import model_variants as mv
from .impls import usable_backends
from .results import (
    failure_status,
    finalize,
    new_results,
    package_impl,
    timing_fields,
)
from .timing import TimerConfig, free_memory, measure, peak_memory_mb, synchronize

VARIANTS = (mv.FULL_FT, mv.LORA_NAME, "upscaled")
LOSS_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> dict:
    """Random token ids (``(batch, seq)``) used as inputs and labels."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _backend_ctx(backend: str | None) -> contextlib.AbstractContextManager:
    return scale_kernels.use_backend(backend) if backend else contextlib.nullcontext()


def train_step_fn(model: nn.Module, batch: dict, backend: str | None) -> Callable[[], None]:
    """One AdamW step of ``model`` on ``batch`` (LM loss), under ``use_backend(backend)`` when given."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        with _backend_ctx(backend):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _loss(model: nn.Module, batch: dict, backend: str | None = None) -> float:
    with torch.no_grad(), _backend_ctx(backend):
        return float(model(**batch).loss)


def bench_step(
    impl: str,
    model: nn.Module,
    batch: dict,
    backend: str | None,
    case: dict,
    device: torch.device,
    timer: TimerConfig,
) -> dict:
    """One record: step timings, tokens/s and peak memory (after warm-up, optimizer state included).

    For a package backend the record is an error unless that backend really ran (``last_backend``).
    """
    rec = {"case": case, "pass": "train_step", "impl": impl, **mv.parameter_counts(model)}
    free_memory(device)  # the previous step closure (optimizer state, grads) is gone: start clean
    try:
        mv.set_gradient_checkpointing(model, case["gradient_checkpointing"])
        step = train_step_fn(model, batch, backend)
        record_backend(None)  # so that the check below sees this run's backend, not an earlier one
        timing = measure(step, device, timer)
        peak = peak_memory_mb(step, device)
        synchronize(device)
        if backend is not None and scale_kernels.last_backend() != backend:
            raise RuntimeError(f"asked for backend {backend!r} but {scale_kernels.last_backend()!r} ran")
        tokens = batch["input_ids"].numel()
        rec.update(timing_fields(timing, peak), tokens_per_s=tokens / (timing.median_ms * 1e-3))
    except Exception as exc:  # recorded, never turned into a number
        rec["status"] = failure_status(exc)
    return rec


def bench_variant(
    impl: str,
    build: Callable[[], nn.Module],
    batch: dict,
    cases: list[dict],
    device: torch.device,
    timer: TimerConfig,
) -> list[dict]:
    """Build one baseline model and measure it in every case (the model is freed when this returns)."""
    model = build()
    return [bench_step(impl, model, batch, None, case, device, timer) for case in cases]


def _unmeasured(impl: str, case: dict, status: str) -> dict:
    return {"case": case, "pass": "train_step", "impl": impl, "status": status}


def bench_upscaled(
    spec: mv.ModelSpec,
    backends: list[str],
    batch: dict,
    cases: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    timer: TimerConfig,
) -> list[dict]:
    """The hand-written upscaled model, then the same model on each package backend (swap undone).

    The swap is checked first: before any training step, the hand-written model must give the package
    model's loss (within ``LOSS_RTOL``), else its records are errors.
    """
    impls = [package_impl(b) for b in backends] + [mv.HANDWRITTEN_UPSCALED]
    reason = mv.upscale_unavailable_reason()
    if reason is not None:
        return [_unmeasured(impl, case, f"skipped: {reason}") for case in cases for impl in impls]
    if spec.mode == "route":
        ids = batch["input_ids"]
        batch = {**batch, "scale_route": mv.route_mask(ids.shape[0], ids.shape[1], device)}
    model = mv.build_upscaled(spec, device, dtype)
    model.eval()
    mv.set_backend(model, None)  # the backend comes from use_backend(...) in each step
    loss_pkg = _loss(model, batch, backends[0] if backends else None)
    mv.swap_to_handwritten(model)
    loss_hw = _loss(model, batch)
    if abs(loss_hw - loss_pkg) <= LOSS_RTOL[dtype] * abs(loss_pkg):
        records = [bench_step(mv.HANDWRITTEN_UPSCALED, model, batch, None, case, device, timer) for case in cases]
    else:
        status = f"error: hand-written model loss {loss_hw} != package model loss {loss_pkg} (swap is wrong)"
        records = [_unmeasured(mv.HANDWRITTEN_UPSCALED, case, status) for case in cases]
    mv.restore_forward(model)
    for backend in backends:
        records += [bench_step(package_impl(backend), model, batch, backend, case, device, timer) for case in cases]
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("python -m benchmarks.bench_model", __doc__)
    cli.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (smoke: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (smoke: 16)")
    parser.add_argument(
        "--mode",
        choices=("preserve", "adapt", "route"),
        default="preserve",
        help="SCALE mode of the upscaled models (route: random 50%% per-token mask)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help="which models to run (upscaled = this package on each backend + the hand-written model)",
    )
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the model benchmark described by parsed ``args``; returns the finalized results (not written)."""
    device, dtype = cli.resolve_device(args), cli.resolve_dtype(args)
    args.no_do_bench = True  # a step is long and stateful: CUDA events with a fixed count of steps
    timer = cli.resolve_timer(args, warmup=3, iters=10)
    spec = mv.ModelSpec(
        mv.SMOKE_LLAMA if args.smoke else mv.LLAMA_1B,
        mv.SMOKE_UPSCALE if args.smoke else mv.UPSCALE_1B,
        args.mode,
    )
    batch_size = args.batch_size or (2 if args.smoke else 4)
    seq_len = args.seq_len or (16 if args.smoke else 2048)
    variants = args.variants or list(VARIANTS)
    backends = usable_backends(device, dtype, args.backends)
    usable = [b for b, reason in backends.items() if reason is None]
    settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "base_config": spec.base,
        "upscale": spec.upscale,
        "mode": spec.mode,
        "lora": mv.LORA,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "optimizer": "AdamW(lr=1e-5)",
        "skipped_backends": {b: r for b, r in backends.items() if r},
        **cli.timer_settings(timer, device),
    }
    payload = new_results("model", args.smoke, device, settings)
    batch = make_batch(spec.base["vocab_size"], batch_size, seq_len, device)
    cases = [
        {
            "gradient_checkpointing": ckpt == "on",
            "batch_size": batch_size,
            "seq_len": seq_len,
            "mode": spec.mode,
        }
        for ckpt in args.checkpointing
    ]
    builders = {
        mv.FULL_FT: lambda: mv.build_base(spec, device, dtype),
        mv.LORA_NAME: lambda: mv.build_lora(spec, device, dtype),
    }
    for variant in variants:
        print(f"[bench_model] {variant}", file=sys.stderr, flush=True)
        if variant == "upscaled":
            payload["records"] += bench_upscaled(spec, usable, batch, cases, device, dtype, timer)
        else:
            payload["records"] += bench_variant(variant, builders[variant], batch, cases, device, timer)
        free_memory(device)
    return finalize(payload)


def main(argv: list[str] | None = None) -> int:
    return cli.main_for("model", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
