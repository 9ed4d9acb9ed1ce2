"""Atomic training checkpoints: write into a temporary folder, then rename; a ``latest`` pointer file.

Layout under ``<output_dir>/checkpoints``::

    step-00000010/trainable.safetensors   the parameters that train (fp32 or their dtype, exact)
    step-00000010/state.pt                optimizer, scheduler, RNG states, data position, history
    step-00000010/meta.json               written last: a folder without it is incomplete
    latest                                name of the newest complete checkpoint (replaced atomically)

A run killed during a save leaves a ``.tmp-*`` folder that is ignored (and removed by the next save);
``latest`` keeps pointing to the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Tensor = torch.Tensor
LATEST = "latest"
META = "meta.json"


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step may consume (torch CPU/CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    state["python_version"], state["python_gauss"] = random.getstate()[0], random.getstate()[2]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))


def _write_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def save_checkpoint(
    root: str | Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and point ``latest`` at it; keep the newest
    ``keep`` complete checkpoints. Returns the checkpoint folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    _write_tensors(tmp / "trainable.safetensors", tensors)
    _write_state(tmp / "state.pt", state)
    (tmp / META).write_text(json.dumps({"step": step, "complete": True}), encoding="utf-8")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp{os.getpid()}"
    pointer.write_text(name, encoding="utf-8")
    os.replace(pointer, root / LATEST)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temp file + rename): a reader never sees half a file (a run's log and results, the
    sweep's state)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / META).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``latest`` names if complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / META).is_file():
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(folder: str | Path) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
    """``(step, tensors, state)`` of a complete checkpoint folder."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return int(meta["step"]), tensors, state
