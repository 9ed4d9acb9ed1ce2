"""The performance targets, evaluated on a results file as met / not met / not evaluated.

    python -m benchmarks.targets benchmarks/results/<device>/     # every target of the files in a folder

Targets hold for what users get, ``scale_kernels[auto]`` (the automatic per-shape backend choice); the
single-backend rows are informative. Layer and model targets are stated for an H100 in bf16
(``on_target_hardware`` records whether the run was one); the host-overhead targets for a CPU run of
``benchmarks.bench_host``. The model targets compare the Llama-1B shape against the hand-written
upscaled model and full fine-tuning with the same precision recipe; the Llama-8B shape training on one 80 GB GPU
is a status target (:func:`evaluate_trains`). A target whose case or implementation is missing from the results
is ``not evaluated`` (never met), with the reason.
"""

from __future__ import annotations

import argparse
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cases import DECODE_MAX_TOKENS
from .schema import load_json, package_impl

TARGET_IMPL = package_impl("auto")
TARGET_D, TARGET_E, TARGET_PREFILL_T = 4096, 1024, 16384
HOST_T, HOST_D, HOST_E = 16, 256, 64
KINDS = ("layer", "model", "host")
_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    """``metric`` of the comparison of ``scale_kernels[auto]`` against ``baseline`` in ``passes`` must satisfy
    ``op threshold`` on every case where ``applies(case)``."""

    id: str
    issue: int  # the tracker issue that set the target (kept in every result row)
    kind: str
    description: str
    passes: tuple[str, ...]
    baseline: str
    metric: str
    op: str
    threshold: float | str
    applies: Callable[[dict], bool]


def _widths(case: dict, d: int, e: int) -> bool:
    return (case.get("d"), case.get("e")) == (d, e)


def _prefill_target_shape(case: dict) -> bool:
    return case.get("tokens") == TARGET_PREFILL_T and _widths(case, TARGET_D, TARGET_E)


def _decode_target_shape(case: dict) -> bool:
    return case.get("tokens", DECODE_MAX_TOKENS + 1) <= DECODE_MAX_TOKENS and _widths(case, TARGET_D, TARGET_E)


def _model_1b_shape(case: dict) -> bool:
    """The model targets' case: the Llama-1B shape (smoke runs: the tiny shape, flagged not on target hardware)."""
    return case.get("shape", "1b") in ("1b", "smoke")


def _host_shape(case: dict) -> bool:
    return case.get("tokens") == HOST_T and _widths(case, HOST_D, HOST_E)


def _any_case(case: dict) -> bool:
    return True


ALL_LAYER_PASSES = ("forward", "backward", "train_step")
TARGETS = (
    Target(
        "layer_forward_vs_gemm",
        11,
        "layer",
        "forward >= 0.95x the equal-FLOP cuBLAS GEMM (TFLOP/s), T=16384 d=4096 e=1024, every mode",
        ("forward",),
        "equal_flop_gemm",
        "throughput_ratio",
        ">=",
        0.95,
        _prefill_target_shape,
    ),
    Target(
        "layer_train_vs_handwritten",
        11,
        "layer",
        "train step >= 1.2x faster than the hand-written module, T=16384 d=4096 e=1024, every mode",
        ("train_step",),
        "handwritten",
        "speedup",
        ">=",
        1.2,
        _prefill_target_shape,
    ),
    Target(
        "layer_decode_vs_handwritten",
        11,
        "layer",
        "decode (T <= 16, d=4096 e=1024) forward >= 2x faster than the hand-written module",
        ("forward",),
        "handwritten",
        "speedup",
        ">=",
        2.0,
        _decode_target_shape,
    ),
    Target(
        "layer_never_slower_than_handwritten",
        11,
        "layer",
        "no benchmarked case (every T, mode and pass) below 0.98x the hand-written module",
        ALL_LAYER_PASSES,
        "handwritten",
        "speedup",
        ">=",
        0.98,
        _any_case,
    ),
    Target(
        "layer_train_vs_dense",
        6,
        "layer",
        "train step >= 1.25x faster than the dense fully-trainable linear, T=16384 d=4096 e=1024",
        ("train_step",),
        "dense_linear",
        "speedup",
        ">=",
        1.25,
        _prefill_target_shape,
    ),
    Target(
        "model_tokens_vs_handwritten",
        13,
        "model",
        "model train step tokens/s >= 1.3x the hand-written upscaled model (Llama-1B shape, 4 x 2048)",
        ("train_step",),
        "handwritten_upscaled",
        "speedup",
        ">=",
        1.3,
        _model_1b_shape,
    ),
    Target(
        "model_tokens_vs_full_ft",
        13,
        "model",
        "model train step tokens/s >= 1.0x full fine-tuning (Llama-1B shape, 4 x 2048, same recipe)",
        ("train_step",),
        "full_ft",
        "throughput_ratio",
        ">=",
        1.0,
        _model_1b_shape,
    ),
    Target(
        "model_memory_vs_full_ft",
        13,
        "model",
        "model train step peak memory <= 0.6x full fine-tuning (Llama-1B shape, same recipe)",
        ("train_step",),
        "full_ft",
        "mem_ratio",
        "<=",
        0.6,
        _model_1b_shape,
    ),
    Target(
        "host_forward_vs_handwritten",
        11,
        "host",
        "CPU, M=16 d=256 e=64: forward time <= 1.2x the hand-written eager layer, every mode",
        ("forward",),
        "handwritten",
        "paired_time_ratio",
        "<=",
        1.2,
        _host_shape,
    ),
    Target(
        "host_train_vs_handwritten",
        11,
        "host",
        "CPU, M=16 d=256 e=64: train step time <= 1.2x the hand-written eager layer, every mode",
        ("train_step",),
        "handwritten",
        "paired_time_ratio",
        "<=",
        1.2,
        _host_shape,
    ),
)
# a status target: scale_kernels[auto]'s record of this shape is ok (it trained), reported with full FT's status
MODEL_8B_TARGET = Target(
    "model_8b_trains",
    13,
    "model",
    "Llama-8B shape (1 x 4096): scale_kernels trains on one 80 GB GPU (full fine-tuning's status reported)",
    ("train_step",),
    "full_ft",
    "status",
    "==",
    "ok",
    lambda case: case.get("shape") == "8b",
)


def on_target_hardware(payload: dict) -> bool:
    """Layer / model: an H100 in bf16. Host: a CPU (the targets are about host work)."""
    if payload["kind"] == "host":
        return payload["env"]["device"] == "cpu"
    return "H100" in payload["env"]["device_name"] and payload["settings"].get("dtype") == "bfloat16"


def _row(target: Target, status: str, **fields) -> dict:
    return {
        "id": target.id,
        "issue": target.issue,
        "description": target.description,
        "metric": target.metric,
        "op": target.op,
        "threshold": target.threshold,
        "status": status,
        **fields,
    }


def evaluate_target(target: Target, payload: dict) -> list[dict]:
    """One row per matching ``scale_kernels[auto]`` comparison; one ``not evaluated`` row if none matches."""
    hardware = on_target_hardware(payload)
    if payload.get("smoke"):
        reason = "a smoke run checks the scripts; its times are not measurements"
        return [
            _row(target, "not evaluated", impl=None, case=None, value=None, on_target_hardware=False, reason=reason)
        ]
    ran = {
        (str(r["case"]), r["pass"]): r.get("ran_backend")
        for r in payload.get("records", [])
        if r.get("impl") == TARGET_IMPL
    }
    rows = []
    for comp in payload["comparisons"]:
        if not (
            comp["impl"] == TARGET_IMPL
            and comp["baseline"] == target.baseline
            and comp["pass"] in target.passes
            and target.applies(comp["case"])
        ):
            continue
        value = comp.get(target.metric)
        if value is None:
            status = "not evaluated"
        else:
            status = "met" if _OPS[target.op](value, target.threshold) else "not met"
        fields = dict(impl=comp["impl"], case=comp["case"], value=value, on_target_hardware=hardware)
        fields.update({"pass": comp["pass"], "ran_backend": ran.get((str(comp["case"]), comp["pass"]))})
        rows.append(_row(target, status, **fields))
    if not rows:
        reason = (
            f"no {'/'.join(target.passes)} comparison of {TARGET_IMPL} against {target.baseline} "
            "matching this target in these results"
        )
        rows.append(
            _row(target, "not evaluated", impl=None, case=None, value=None, on_target_hardware=hardware, reason=reason)
        )
    return rows


def evaluate_trains(payload: dict) -> list[dict]:
    """The 8B status target: met when ``scale_kernels[auto]``'s 8B record has status ok, not met when it failed,
    not evaluated when the shape was not run. The full-FT record's status (``oom`` expected) is the reason."""
    target = MODEL_8B_TARGET
    records = [r for r in payload.get("records", []) if target.applies(r["case"])]
    full = [r["status"] for r in records if r["impl"] == target.baseline]
    rows = [
        _row(target, "met" if r["status"] == "ok" else "not met", impl=r["impl"], case=r["case"], value=r["status"],
             on_target_hardware=on_target_hardware(payload), reason=f"full_ft: {full[0] if full else 'not run'}")
        for r in records
        if r["impl"] == TARGET_IMPL
    ]  # fmt: skip
    if rows:
        return rows
    reason = f"no 8b record of {TARGET_IMPL} in these results"
    return [_row(target, "not evaluated", impl=None, case=None, value=None, on_target_hardware=False, reason=reason)]


def evaluate(payload: dict) -> list[dict]:
    """All targets of ``payload["kind"]`` evaluated on its comparisons (and the model kind's status target)."""
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


def folder_payloads(folder: Path) -> list[dict]:
    """The results files (``layer.json``, ``model.json``, ``host.json``) present in ``folder``, their targets
    evaluated afresh (a file written before a target changed is judged by the current definition)."""
    payloads = [load_json(folder / f"{kind}.json") for kind in KINDS if (folder / f"{kind}.json").exists()]
    for payload in payloads:
        payload["targets"] = evaluate(payload)
    return payloads


def summary_lines(payloads: list[dict]) -> list[str]:
    """One line per target of every kind: its summary status, and why for the rows that are not met."""
    lines = []
    evaluated = {p["kind"] for p in payloads}
    rows = [row for p in payloads for row in p["targets"]]
    for target in (*TARGETS, MODEL_8B_TARGET):
        if target.kind not in evaluated:
            lines.append(f"target {target.id}: not evaluated (no {target.kind}.json)  [{target.description}]")
            continue
        mine = [r for r in rows if r["id"] == target.id]
        status = summary(mine)[target.id]
        reasons = [r["reason"] for r in mine if r.get("reason")]
        if status == "not evaluated" and reasons:
            note = f" ({reasons[0]})"
        else:
            note = "" if all(r["on_target_hardware"] for r in mine) else " (not on the target hardware)"
        lines.append(f"target {target.id}: {status}{note}  [{target.description}]")
        for r in mine:
            if r["status"] == "not met":
                case = r["case"] or {}
                where = f"{case.get('mode')} T={case.get('tokens')} {r.get('pass')} (ran {r.get('ran_backend')})"
                value = f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"]
                lines.append(f"    not met: {where}: {r['metric']} {value}, needs {r['op']} {r['threshold']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__)
    parser.add_argument("folder", type=Path, help="a results folder (layer.json / model.json / host.json)")
    args = parser.parse_args(argv)
    for line in summary_lines(folder_payloads(args.folder)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
