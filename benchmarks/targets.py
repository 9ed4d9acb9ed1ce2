"""The performance targets of issue 6 §5, evaluated on a results file as met / not met / not evaluated.

Targets are defined for an H100 in bf16; ``on_target_hardware`` records whether the run was one. A target
whose case or implementation is missing from the results is reported as ``not evaluated`` (never as met).
Fused implementations are the package's ``triton`` and ``cuda`` backends and ``auto`` (the dispatcher's choice;
the ``torch`` backend is the unfused fallback and is not held to these targets). The model targets are issue
13's: Llama-1B shape tokens/s vs the hand-written upscaled model and vs full fine-tuning, peak memory vs full
fine-tuning (same precision recipe), and the Llama-8B shape training on one 80 GB GPU (a status target).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from .cases import DECODE_MAX_TOKENS
from .results import impl_backend

FUSED_BACKENDS = ("triton", "cuda", "auto")  # auto: the dispatcher's choice on the target hardware
TARGET_D, TARGET_E, TARGET_PREFILL_T = 4096, 1024, 16384
_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    """``metric`` of the comparison of a fused impl against ``baseline`` must satisfy ``op threshold``."""

    id: str
    kind: str
    description: str
    pass_name: str
    baseline: str
    metric: str
    op: str
    threshold: float
    applies: Callable[[dict], bool]


def _prefill_target_shape(case: dict) -> bool:
    return (case.get("tokens"), case.get("d"), case.get("e")) == (TARGET_PREFILL_T, TARGET_D, TARGET_E)


def _model_1b_shape(case: dict) -> bool:
    """The model targets' case: the Llama-1B shape (smoke runs: the tiny shape, flagged not on target hardware)."""
    return case.get("shape", "1b") in ("1b", "smoke")


def _decode_target_shape(case: dict) -> bool:
    return case.get("tokens", DECODE_MAX_TOKENS + 1) <= DECODE_MAX_TOKENS and (
        case.get("d"),
        case.get("e"),
    ) == (TARGET_D, TARGET_E)


TARGETS = (
    Target(
        "layer_forward_vs_gemm",
        "layer",
        "fused forward >= 0.95x the equal-FLOP cuBLAS GEMM (TFLOP/s), T=16384 d=4096 e=1024",
        "forward",
        "equal_flop_gemm",
        "throughput_ratio",
        ">=",
        0.95,
        _prefill_target_shape,
    ),
    Target(
        "layer_train_vs_handwritten",
        "layer",
        "layer train step >= 1.3x faster than the hand-written module, T=16384 d=4096 e=1024",
        "train_step",
        "handwritten",
        "speedup",
        ">=",
        1.3,
        _prefill_target_shape,
    ),
    Target(
        "layer_train_vs_dense",
        "layer",
        "layer train step >= 1.25x faster than the dense fully-trainable linear, T=16384 d=4096 e=1024",
        "train_step",
        "dense_linear",
        "speedup",
        ">=",
        1.25,
        _prefill_target_shape,
    ),
    Target(
        "layer_decode_vs_handwritten",
        "layer",
        "decode (T <= 16, d=4096 e=1024) forward >= 2x the hand-written module",
        "forward",
        "handwritten",
        "speedup",
        ">=",
        2.0,
        _decode_target_shape,
    ),
    Target(
        "model_tokens_vs_handwritten",
        "model",
        "model train step tokens/s >= 1.3x the hand-written upscaled model (Llama-1B shape, 4 x 2048)",
        "train_step",
        "handwritten_upscaled",
        "speedup",
        ">=",
        1.3,
        _model_1b_shape,
    ),
    Target(
        "model_tokens_vs_full_ft",
        "model",
        "model train step tokens/s >= 1.0x full fine-tuning (Llama-1B shape, 4 x 2048, same recipe)",
        "train_step",
        "full_ft",
        "throughput_ratio",
        ">=",
        1.0,
        _model_1b_shape,
    ),
    Target(
        "model_memory_vs_full_ft",
        "model",
        "model train step peak memory <= 0.6x full fine-tuning (Llama-1B shape, same recipe)",
        "train_step",
        "full_ft",
        "mem_ratio",
        "<=",
        0.6,
        _model_1b_shape,
    ),
)
# status targets: a fused implementation's record of this shape is ok (it trained) where the baseline's is not
MODEL_8B_TARGET = ("model_8b_trains", "Llama-8B shape (1 x 4096): scale_kernels trains on one 80 GB GPU", "8b")


def on_target_hardware(payload: dict) -> bool:
    """True when the run was on an H100 in bf16 (the conditions the targets are stated for)."""
    return "H100" in payload["env"]["device_name"] and payload["settings"].get("dtype") == "bfloat16"


def _fused(impl: str) -> bool:
    return impl_backend(impl) in FUSED_BACKENDS


def _row(target: Target, status: str, **fields) -> dict:
    return {
        "id": target.id,
        "description": target.description,
        "metric": target.metric,
        "op": target.op,
        "threshold": target.threshold,
        "status": status,
        **fields,
    }


def evaluate_target(target: Target, payload: dict) -> list[dict]:
    """One row per matching (fused impl, case) comparison; one ``not evaluated`` row if none matches."""
    hardware = on_target_hardware(payload)
    rows = []
    for comp in payload["comparisons"]:
        if not (
            _fused(comp["impl"])
            and comp["baseline"] == target.baseline
            and comp["pass"] == target.pass_name
            and target.applies(comp["case"])
        ):
            continue
        value = comp[target.metric]
        if value is None:
            status = "not evaluated"
        else:
            status = "met" if _OPS[target.op](value, target.threshold) else "not met"
        rows.append(
            _row(target, status, impl=comp["impl"], case=comp["case"], value=value, on_target_hardware=hardware)
        )
    if not rows:
        reason = (
            f"no {target.pass_name} comparison of a fused backend ({', '.join(FUSED_BACKENDS)}) against "
            f"{target.baseline} matching this target in these results"
        )
        rows.append(
            _row(
                target,
                "not evaluated",
                impl=None,
                case=None,
                value=None,
                on_target_hardware=hardware,
                reason=reason,
            )
        )
    return rows


def evaluate_trains(payload: dict) -> list[dict]:
    """The 8B target: met when a fused implementation's 8B record has status ok, not met when it failed, not
    evaluated when the shape was not run. The full-FT record's status (``oom`` expected) is reported alongside."""
    target_id, description, shape = MODEL_8B_TARGET
    recs = [r for r in payload["records"] if r["case"].get("shape") == shape]
    pkg = [r for r in recs if _fused(r["impl"])]
    row = {"id": target_id, "description": description, "metric": "status", "op": "==", "threshold": "ok"}
    row.update(impl=None, case=None, value=None, on_target_hardware=on_target_hardware(payload))
    if not pkg:
        return [{**row, "status": "not evaluated", "reason": f"no {shape} record of a fused backend in these results"}]
    full = [r["status"] for r in recs if r["impl"] == "full_ft"]
    return [
        {**row, "status": "met" if r["status"] == "ok" else "not met", "impl": r["impl"], "case": r["case"],
         "value": r["status"], "reason": f"full_ft: {full[0] if full else 'not run'}"}
        for r in pkg
    ]  # fmt: skip


def evaluate(payload: dict) -> list[dict]:
    """All targets of ``payload["kind"]`` evaluated on its comparisons."""
    rows = [row for t in TARGETS if t.kind == payload["kind"] for row in evaluate_target(t, payload)]
    return rows + (evaluate_trains(payload) if payload["kind"] == "model" else [])


def summary(rows: list[dict]) -> dict[str, str]:
    """Per target id: ``not met`` if any row is, ``met`` if all are, ``incomplete`` if some rows could not be
    evaluated but the others are met, else ``not evaluated``."""
    statuses: dict[str, set[str]] = {}
    for row in rows:
        statuses.setdefault(row["id"], set()).add(row["status"])
    out = {}
    for target_id, seen in statuses.items():
        if "not met" in seen:
            out[target_id] = "not met"
        elif seen == {"met"}:
            out[target_id] = "met"
        else:
            out[target_id] = "incomplete" if "met" in seen else "not evaluated"
    return out
