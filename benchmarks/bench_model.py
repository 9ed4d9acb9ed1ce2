"""Model-level benchmark: tokens/s and peak memory of a continual-pre-training step.

    python -m benchmarks.bench_model                # Llama-1B and Llama-8B shapes (random weights), CUDA, bf16
    python -m benchmarks.bench_model --smoke        # tiny Llama config on CPU, each step once

Shapes: ``1b`` (Llama-3.2-1B, +25% width, batch 4 x 2048, every variant, checkpointing off and on) and ``8b``
(Llama-3.1-8B, +25% width, batch 1 x 4096, checkpointing on, full fine-tuning and this package only: full
fine-tuning with AdamW needs more than 80 GB and is recorded as ``oom``). Variants, all under the same precision
recipe (frozen weights in ``--dtype``, trainable weights as fp32 masters with fp32 AdamW state, autocast compute)
with fused AdamW over their trainable parameters: ``full_ft`` (every weight trains), ``lora`` (peft, r=16),
``handwritten_upscaled`` (the upscaled model in plain PyTorch, see ``benchmarks/model_variants.py``) and
``scale_kernels[<backend>]`` (this package's upscaled model; ``auto`` = the dispatcher's choice). One step =
forward with the LM loss, backward, optimizer step, ``zero_grad(set_to_none=True)``. Each record also carries
the memory estimator's prediction (``predicted_peak_mb``, see ``scale_kernels.memory``).
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
from scale_kernels.models.liger import LIGER_OPS, apply_liger_kernels
from scale_kernels.precision import PrecisionPolicy

from . import cli
from . import model_variants as mv
from .impls import AUTO, usable_backends
from .results import failure_status, finalize, new_results, timing_fields
from .schema import package_impl
from .timing import TimerConfig, free_memory, measure, peak_memory_mb, synchronize

VARIANTS = (mv.FULL_FT, mv.LORA_NAME, "upscaled")
SHAPES = {  # name: (base config, upscale sizes, batch, seq, checkpointing settings, variants)
    "1b": (mv.LLAMA_1B, mv.UPSCALE_1B, 4, 2048, None, None),
    "8b": (mv.LLAMA_8B, mv.UPSCALE_8B, 1, 4096, ["on"], ["upscaled", mv.FULL_FT]),
}
LOSS_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> dict:
    """Random token ids (``(batch, seq)``) used as inputs and labels."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _backend_ctx(backend: str | None) -> contextlib.AbstractContextManager:
    return scale_kernels.use_backend(backend) if backend else contextlib.nullcontext()


def train_step_fn(model: nn.Module, batch: dict, backend: str | None, policy: PrecisionPolicy) -> Callable[[], None]:
    """One AdamW step of ``model`` on ``batch`` (LM loss) under ``policy``'s autocast, under
    ``use_backend(backend)`` when given. AdamW is the fused implementation on CUDA (no parameter-sized
    temporaries)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = batch["input_ids"].device.type
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device_type == "cuda" or None)

    def step() -> None:
        with _backend_ctx(backend):
            with policy.autocast(device_type):
                loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _loss(model: nn.Module, batch: dict, policy: PrecisionPolicy, backend: str | None = None) -> float:
    with torch.no_grad(), _backend_ctx(backend), policy.autocast(batch["input_ids"].device.type):
        return float(model(**batch).loss)


def bench_step(
    impl: str,
    model: nn.Module,
    batch: dict,
    backend: str | None,
    case: dict,
    device: torch.device,
    timer: TimerConfig,
    policy: PrecisionPolicy,
    predicted_mb: float | None = None,
) -> dict:
    """One record: step timings, tokens/s and peak memory (after warm-up, optimizer state included) of a step
    under ``policy``, with the estimator's ``predicted_mb`` when given.

    For a package backend the record is an error unless that backend really ran (``last_backend``); for
    ``auto`` the backend that ran is recorded.
    """
    rec = {"case": case, "pass": "train_step", "impl": impl, **mv.parameter_counts(model)}
    if predicted_mb is not None:
        rec["predicted_peak_mb"] = predicted_mb
    free_memory(device)  # the previous step closure (optimizer state, grads) is gone: start clean
    try:
        mv.set_gradient_checkpointing(model, case["gradient_checkpointing"])
        step = train_step_fn(model, batch, backend, policy)
        record_backend(None)  # so that the check below sees this run's backend, not an earlier one
        timing = measure(step, device, timer)
        peak = peak_memory_mb(step, device)
        synchronize(device)
        if backend == AUTO:
            rec["ran_backend"] = scale_kernels.last_backend()
        elif backend is not None and scale_kernels.last_backend() != backend:
            raise RuntimeError(f"asked for backend {backend!r} but {scale_kernels.last_backend()!r} ran")
        tokens = batch["input_ids"].numel()
        rec.update(timing_fields(timing, peak), tokens_per_s=tokens / (timing.median_ms * 1e-3))
        if peak is not None and predicted_mb:
            rec["measured_vs_predicted"] = peak / predicted_mb
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
    policy: PrecisionPolicy,
    predict: Callable[[str, dict], float | None] = lambda impl, case: None,
) -> list[dict]:
    """Build one baseline model and measure it in every case (the model is freed when this returns). A build
    that runs out of memory is recorded as ``oom`` for every case, never dropped."""
    model, status = _build(build, device)
    if model is None:
        return [{**_unmeasured(impl, case, status), "predicted_peak_mb": predict(impl, case)} for case in cases]
    return [bench_step(impl, model, batch, None, case, device, timer, policy, predict(impl, case)) for case in cases]


def _build(build: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module | None, str | None]:
    """``(model, None)``, or ``(None, status)`` for a build that raised (an OOM: ``oom``), its memory freed."""
    try:
        return build(), None
    except Exception as exc:
        status = failure_status(exc)
    free_memory(device)  # after the except block: the exception and the frames it held are gone
    return None, status


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
    predict: Callable[[str, dict], float | None] = lambda impl, case: None,
    handwritten: bool = True,
    liger_ops: list[str] | None = None,
) -> list[dict]:
    """The hand-written upscaled model, then the same model on each package backend (swap undone).

    The swap is checked first: before any training step, the hand-written model must give the package
    model's loss (within ``LOSS_RTOL``), else its records are errors.
    """
    impls = [package_impl(b) for b in backends] + [mv.HANDWRITTEN_UPSCALED]
    policy = mv.precision_policy(dtype)
    reason = mv.upscale_unavailable_reason()
    if reason is not None:
        return [_unmeasured(impl, case, f"skipped: {reason}") for case in cases for impl in impls]
    if spec.mode == "route":
        ids = batch["input_ids"]
        batch = {**batch, "scale_route": mv.route_mask(ids.shape[0], ids.shape[1], device)}
    model, status = _build(lambda: mv.build_upscaled(spec, device, dtype), device)
    if model is None:
        return [_unmeasured(impl, case, status) for case in cases for impl in impls]
    model.eval()
    mv.set_backend(model, None)  # the backend comes from use_backend(...) in each step
    records = []
    if handwritten:
        loss_pkg = _loss(model, batch, policy, backends[0] if backends else None)
        mv.swap_to_handwritten(model)
        loss_hw = _loss(model, batch, policy)
        impl = mv.HANDWRITTEN_UPSCALED
        if abs(loss_hw - loss_pkg) <= LOSS_RTOL[dtype] * abs(loss_pkg):
            records = [
                bench_step(impl, model, batch, None, case, device, timer, policy, predict(impl, case)) for case in cases
            ]
        else:
            status = f"error: hand-written model loss {loss_hw} != package model loss {loss_pkg} (swap is wrong)"
            records = [_unmeasured(impl, case, status) for case in cases]
        mv.restore_forward(model)
    for backend in backends:
        impl = package_impl(backend)
        records += [
            bench_step(impl, model, batch, backend, case, device, timer, policy, predict(impl, case)) for case in cases
        ]
    if liger_ops and backends:  # last: liger's RoPE patch is process-wide for the family
        impl = package_impl(f"{backends[0]}+liger")
        try:
            apply_liger_kernels(model, liger_ops)
        except (ImportError, ValueError) as exc:
            return records + [_unmeasured(impl, case, f"skipped: {exc}") for case in cases]
        records += [bench_step(impl, model, batch, backends[0], case, device, timer, policy) for case in cases]
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
    parser.add_argument(
        "--liger",
        nargs="+",
        choices=LIGER_OPS,
        default=None,
        help="also measure the package model with liger-kernel's ops (scale_kernels[<backend>+liger]; needs the "
        "'liger' extra, recorded as skipped without it)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=None,
        help="model shapes (default: 1b and 8b on CUDA; --smoke: a tiny config). 8b: batch 1 x 4096, checkpointing "
        "on, upscaled + full_ft only (--batch-size/--seq-len/--checkpointing/--variants apply to 1b)",
    )
    return parser


def _predictor(spec: mv.ModelSpec, dtype: torch.dtype) -> Callable[[str, dict], float | None]:
    memo: dict[tuple, float | None] = {}

    def predict(impl: str, case: dict) -> float | None:
        key = (mv.METHOD_OF.get(impl, "scale"), case["gradient_checkpointing"], case["batch_size"], case["seq_len"])
        if key not in memo:
            memo[key] = mv.predicted_peak_mb(spec, impl, dtype, case)
        return memo[key]

    return predict


def run(args: argparse.Namespace) -> dict:
    """Run the model benchmark described by parsed ``args``; returns the finalized results (not written)."""
    device, dtype = cli.resolve_device(args), cli.resolve_dtype(args)
    args.no_do_bench = True  # a step is long and stateful: CUDA events with a fixed count of steps
    timer = cli.resolve_timer(args, warmup=3, iters=10)
    shapes = ["smoke"] if args.smoke else (args.shapes or ["1b", "8b"])
    backends = usable_backends(device, dtype, args.backends or [AUTO])  # default: the dispatcher's choice
    usable = [b for b, reason in backends.items() if reason is None]
    policy = mv.precision_policy(dtype)
    settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "precision": {
            "frozen": str(policy.frozen_dtype).removeprefix("torch."),
            "trainable": str(policy.trainable_dtype).removeprefix("torch."),
            "compute": str(policy.autocast_dtype).removeprefix("torch."),
            "full_ft": "every weight is an fp32 master (it trains)",
        },
        "shapes": {},
        "mode": args.mode,
        "lora": mv.LORA,
        "optimizer": f"AdamW(lr=1e-5{', fused=True' if device.type == 'cuda' else ''}), state in fp32",
        "skipped_backends": {b: r for b, r in backends.items() if r},
        **cli.timer_settings(timer, device),
    }
    payload = new_results("model", args.smoke, device, settings)
    for shape in shapes:
        if shape == "smoke":
            base, upscale, batch_size, seq_len, ckpts, variants = mv.SMOKE_LLAMA, mv.SMOKE_UPSCALE, 2, 16, None, None
        else:
            base, upscale, batch_size, seq_len, ckpts, variants = SHAPES[shape]
        if ckpts is None:  # the 1b (and smoke) shape follows the command line
            batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len
            ckpts, variants = args.checkpointing, args.variants or list(VARIANTS)
        spec = mv.ModelSpec(base, upscale, args.mode)
        settings["shapes"][shape] = {
            "base_config": base,
            "upscale": upscale,
            "batch_size": batch_size,
            "seq_len": seq_len,
        }
        batch = make_batch(base["vocab_size"], batch_size, seq_len, device)
        cases = [
            {"shape": shape, "gradient_checkpointing": c == "on", "batch_size": batch_size, "seq_len": seq_len,
             "mode": spec.mode}
            for c in ckpts
        ]  # fmt: skip
        predict = _predictor(spec, dtype)
        builders = {
            mv.FULL_FT: lambda spec=spec: mv.build_full_ft(spec, device, dtype),
            mv.LORA_NAME: lambda spec=spec: mv.build_lora(spec, device, dtype),
        }
        for variant in variants:
            print(f"[bench_model] {shape} {variant}", file=sys.stderr, flush=True)
            if variant == "upscaled":
                payload["records"] += bench_upscaled(
                    spec, usable, batch, cases, device, dtype, timer, predict, shape != "8b", args.liger
                )
            else:
                payload["records"] += bench_variant(
                    variant, builders[variant], batch, cases, device, timer, policy, predict
                )
            free_memory(device)
    return finalize(payload)


def main(argv: list[str] | None = None) -> int:
    return cli.main_for("model", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
