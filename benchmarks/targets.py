"""The performance targets of issue 6 §5, evaluated on a results file as met / not met / not evaluated.

Targets are defined for an H100 in bf16; ``on_target_hardware`` records whether the run was one. A target
whose case or implementation is missing from the results is reported as ``not evaluated`` (never as met).
Fused implementations are the package's ``triton`` and ``cuda`` backends (the ``torch`` backend is the
unfused fallback and is not held to these targets).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from .cases import DECODE_MAX_TOKENS
from .results import impl_backend

FUSED_BACKENDS = ("triton", "cuda")
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
        "model train step tokens/s >= 1.3x the hand-written upscaled model",
        "train_step",
        "handwritten_upscaled",
        "speedup",
        ">=",
        1.3,
        lambda case: True,
    ),
    Target(
        "model_memory_vs_full_ft",
        "model",
        "model train step peak memory <= 0.6x full fine-tuning",
        "train_step",
        "full_ft",
        "mem_ratio",
        "<=",
        0.6,
        lambda case: True,
    ),
)


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


def evaluate(payload: dict) -> list[dict]:
    """All targets of ``payload["kind"]`` evaluated on its comparisons."""
    return [row for t in TARGETS if t.kind == payload["kind"] for row in evaluate_target(t, payload)]


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
