"""The benchmark results file format: its schema tag, the implementation names, reading and writing a file.

A results file is one JSON object::

    {"schema": SCHEMA, "kind": "layer" | "model" | "host", "smoke": bool, "label": str, "env": {...},
     "settings": {...}, "records": [...], "comparisons": [...], "targets": [...]}

(filled by :mod:`benchmarks.results`; ``targets`` evaluated by :mod:`benchmarks.targets`). An implementation is
named ``scale_kernels[<backend>]`` for this package, or by its baseline name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "scale_kernels.benchmarks/1"
PACKAGE_PREFIX = "scale_kernels["


def package_impl(backend: str) -> str:
    """Implementation name of this package's op or model on ``backend`` (e.g. ``scale_kernels[triton]``)."""
    return f"{PACKAGE_PREFIX}{backend}]"


def impl_backend(impl: str) -> str | None:
    """The backend of a package implementation name, None for a baseline."""
    return impl[len(PACKAGE_PREFIX) : -1] if is_package(impl) else None


def is_package(impl: str) -> bool:
    """Whether ``impl`` names this package's op or model (``scale_kernels[<backend>]``), not a baseline."""
    return impl.startswith(PACKAGE_PREFIX) and impl.endswith("]")


def write_json(payload: dict, path: Path) -> Path:
    """Write atomically: a reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_json(path: Path) -> dict:
    """Read a results file; raises ValueError if it is not one of ours."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a scale_kernels benchmark results file (schema {SCHEMA!r} expected)")
    return payload
