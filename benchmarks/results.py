"""Results of a benchmark run: environment header, records, ratios against each baseline, targets, merging, saving.

The file format (schema tag, implementation names, reading and writing) is :mod:`benchmarks.schema`.
A record is one (case, pass, impl) measurement: ``median_ms``, ``p20_ms``, ``p80_ms``, ``peak_mem_mb`` (None
when not measured, i.e. on CPU) plus a kind-specific throughput (``tflops`` or ``tokens_per_s``), and
``status`` ``"ok"`` or the reason it has no numbers (``"error: ..."``, ``"oom"``).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from .schema import SCHEMA, is_package, load_json, write_json
from .targets import evaluate

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
THROUGHPUT_KEYS = ("tflops", "tokens_per_s")


def device_name(device: torch.device) -> str:
    """Marketing name of the GPU, or the CPU model (from /proc/cpuinfo where available)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def device_slug(name: str) -> str:
    """File-name form of a device name (``"NVIDIA H100 80GB HBM3"`` -> ``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Device name and the versions that matter for the numbers."""
    import scale_kernels

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "scale_kernels": scale_kernels.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def smoke_label(env: dict) -> str:
    return f"CPU SMOKE RUN on {env['device_name']}: tiny shapes, each case run once; these are not performance numbers"


def new_results(kind: str, smoke: bool, device: torch.device, settings: dict) -> dict:
    """An empty results object with the environment header; ``label`` says clearly what a smoke run is."""
    env = environment(device)
    label = smoke_label(env) if smoke else f"measured on {env['device_name']}"
    return {
        "schema": SCHEMA,
        "kind": kind,
        "smoke": smoke,
        "label": label,
        "env": env,
        "settings": settings,
        "records": [],
        "comparisons": [],
        "targets": [],
    }


def default_out_dir(env: dict, smoke: bool) -> Path:
    """``benchmarks/results/<device>``; a CPU smoke run goes to ``benchmarks/results/cpu-smoke``."""
    if smoke and not env["device"].startswith("cuda"):
        return RESULTS_ROOT / "cpu-smoke"
    return RESULTS_ROOT / (device_slug(env["device_name"]) + ("-smoke" if smoke else ""))


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _group_key(record: dict) -> str:
    return json.dumps([record["case"], record["pass"]], sort_keys=True)


def comparisons(records: list[dict]) -> list[dict]:
    """Every package record against every baseline record of the same case and pass (status ok on both).

    ``speedup`` = baseline median / package median (> 1: the package is faster); ``time_ratio`` = its inverse
    (package / baseline time, the host-overhead figure); ``throughput_ratio`` =
    package / baseline TFLOP/s or tokens/s (differs from speedup when the baseline does other FLOPs, e.g.
    the dense layer or the equal-FLOP GEMM); ``mem_ratio`` = package / baseline peak memory.
    """
    groups: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("status") == "ok":
            groups.setdefault(_group_key(rec), []).append(rec)
    out = []
    for group in groups.values():
        for pkg in (r for r in group if is_package(r["impl"])):
            for base in (r for r in group if not is_package(r["impl"])):
                key = next((k for k in THROUGHPUT_KEYS if k in pkg and k in base), None)
                out.append(
                    {
                        "case": pkg["case"],
                        "pass": pkg["pass"],
                        "impl": pkg["impl"],
                        "baseline": base["impl"],
                        "speedup": _ratio(base["median_ms"], pkg["median_ms"]),
                        "time_ratio": _ratio(pkg["median_ms"], base["median_ms"]),
                        "throughput_ratio": _ratio(pkg.get(key), base.get(key)) if key else None,
                        "mem_ratio": _ratio(pkg.get("peak_mem_mb"), base.get("peak_mem_mb")),
                    }
                )
    return out


def failure_status(exc: BaseException) -> str:
    """Record status for a measurement that raised: ``"oom"`` or ``"error: <type>: <message>"``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def timing_fields(timing, peak_mem_mb: float | None) -> dict:
    """The numeric fields of an ``ok`` record from a :class:`benchmarks.timing.Timing`."""
    return {
        "status": "ok",
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "runs": timing.runs,
        "peak_mem_mb": peak_mem_mb,
    }


def finalize(payload: dict) -> dict:
    """Fill ``comparisons`` and ``targets`` from the records (in place) and return the payload."""
    payload["comparisons"] = comparisons(payload["records"])
    payload["targets"] = evaluate(payload)
    return payload


def _record_key(record: dict) -> str:
    return json.dumps([record["case"], record["pass"], record["impl"]], sort_keys=True)


def _identity(payload: dict) -> dict:
    """What must agree for two results files to be merged."""
    return {
        "kind": payload["kind"],
        "smoke": payload["smoke"],
        "device_name": payload["env"]["device_name"],
        "dtype": payload["settings"].get("dtype"),
    }


def _run_stamp(payload: dict) -> dict:
    return {k: payload["env"].get(k) for k in ("git_commit", "timestamp_utc")}


def merge_results(old: dict, new: dict) -> dict:
    """``new``'s records added to ``old``'s (a record of the same case, pass and impl is replaced).

    For a benchmark run in chunks (e.g. one ``--hidden`` at a time): both must have the same kind, smoke
    flag, device and dtype (ValueError otherwise). ``settings`` are the newest run's; ``env["runs"]`` lists
    the commit and time of every contributing run.
    """
    if _identity(old) != _identity(new):
        raise ValueError(f"cannot merge results of different runs: {_identity(old)} vs {_identity(new)}")
    fresh = {_record_key(r) for r in new["records"]}
    merged = {**new, "env": dict(new["env"])}
    merged["records"] = [r for r in old["records"] if _record_key(r) not in fresh] + new["records"]
    merged["env"]["runs"] = old["env"].get("runs", [_run_stamp(old)]) + [_run_stamp(new)]
    return finalize(merged)


def save(payload: dict, out: Path, append: bool = False) -> Path:
    """Write ``payload`` to ``out``; with ``append``, merge it into the results already there first."""
    out = Path(out)
    if append and out.exists():
        payload = merge_results(load_json(out), payload)
    return write_json(payload, out)


def report_failures(payload: dict, prefix: str) -> None:
    """Print every record that has no numbers (errors, OOMs, skipped variants) to stderr."""
    for rec in payload["records"]:
        if rec["status"] != "ok":
            print(f"{prefix} {rec['impl']} {rec['pass']} {rec['case']}: {rec['status']}", file=sys.stderr)
