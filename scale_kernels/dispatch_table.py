"""Measured dispatch tables: which backend is fastest for a call shape on one GPU.

A table is one JSON file written by ``python -m scale_kernels.tune`` (see :mod:`scale_kernels.tune`)::

    {"format": "scale_kernels.dispatch_table", "version": 1,
     "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
     "created_utc": "...", "timer": "do_bench", "complete": true,
     "entries": [{"dtype": "bfloat16", "d_in": 4096, "e_in": 1024, "d_out": 4096, "e_out": 1024,
                  "w12": true, "route": true, "pass": "train", "tokens": 16384,
                  "ms": {"torch": 2.91, "triton": 3.40}, "failed": {"cuda": "not built"}}]}

A table applies to a call when ``device_name`` equals ``torch.cuda.get_device_name()`` and ``torch`` /
``triton`` equal the running major.minor versions (another version may change either side of the comparison:
such a table is ignored, and :func:`scale_kernels.explain_dispatch` says so). An entry matches on dtype, the
four widths, the mode flags (``w12``: a W12 term; ``route``: a per-token gate; ``pass``: ``"forward"`` when
no gradient is needed, else ``"train"``) and the token count: the entries at the smallest distance
``|log2(tokens) - log2(M)|``, if that distance is at most :data:`MAX_TOKEN_DISTANCE` (a factor of 4). Under
``torch.compile`` sizes may be symbolic, so the choice made at trace time ignores the widths and the token
count: it uses every entry with the call's dtype and mode flags (see :func:`lookup`).

Where tables live, highest precedence first: the files and folders in the environment variable
``SCALE_KERNELS_DISPATCH_TABLES`` (``os.pathsep``-separated) or, when it is unset, the user folder
``$XDG_CACHE_HOME/scale_kernels/dispatch_tables`` (``~/.cache/...``); then the tables shipped with the package
(``scale_kernels/dispatch_tables/*.json``). For one entry key the first table that has it wins.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

FORMAT = "scale_kernels.dispatch_table"
VERSION = 1
ENV_VAR = "SCALE_KERNELS_DISPATCH_TABLES"
PACKAGE_DIR = Path(__file__).resolve().parent / "dispatch_tables"
MAX_TOKEN_DISTANCE = 2  # log2 steps: an entry measured at T stands for token counts in [T/4, 4T]
ANY = -1  # wildcard width / token count (see lookup)
PASSES = ("forward", "train")


class EntryKey(NamedTuple):
    """What an entry is measured for, apart from the token count."""

    dtype: str
    d_in: int
    e_in: int
    d_out: int
    e_out: int
    w12: bool
    route: bool
    pass_name: str


class Measurement(NamedTuple):
    """One matching table entry: median milliseconds per backend (only backends that ran)."""

    tokens: int
    ms: dict[str, float]
    table: str


class Table(NamedTuple):
    path: str
    header: dict
    entries: dict[EntryKey, dict[int, dict[str, float]]]  # key -> tokens -> backend -> ms


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# the dtypes every backend supports, by name (as tables and the command lines spell them)
DTYPES = {dtype_name(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def major_minor(version: str | None) -> str | None:
    """``"2.11.0+cu130"`` -> ``"2.11"``; None stays None."""
    if version is None:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


@functools.cache  # the metadata lookup reads the installed distributions (about 0.4 ms)
def _triton_version() -> str | None:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def software_key() -> dict[str, str | None]:
    """The versions a table must have been measured with: torch and triton major.minor."""
    return {"torch": major_minor(torch.__version__), "triton": major_minor(_triton_version())}


def user_dir() -> Path:
    """Default folder for tables written by ``python -m scale_kernels.tune``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "scale_kernels" / "dispatch_tables"


def search_paths() -> list[Path]:
    """Files and folders searched for tables, highest precedence first."""
    env = os.environ.get(ENV_VAR)
    user = [Path(p) for p in env.split(os.pathsep) if p] if env else [user_dir()]
    return [*user, PACKAGE_DIR]


def _json_files(paths: Iterable[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
    return files


def validate(payload: object, source: str = "table") -> dict:
    """``payload`` if it is a dispatch table of this format version, else a ValueError saying what is wrong."""
    _parse(payload, source)
    return payload  # type: ignore[return-value]


def _parse(payload: object, source: str) -> dict[EntryKey, dict[int, dict[str, float]]]:
    """The entries of a valid table (key -> tokens -> backend -> ms), else the ValueError of :func:`validate`."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source}: not a scale_kernels dispatch table (format {FORMAT!r} expected)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{source}: dispatch table version {payload.get('version')!r}, this package reads {VERSION}")
    for field in ("device_name", "torch", "triton", "entries"):
        if field not in payload:
            raise ValueError(f"{source}: dispatch table lacks the field {field!r}")
    entries: dict[EntryKey, dict[int, dict[str, float]]] = {}
    for i, entry in enumerate(payload["entries"]):
        try:
            key = _entry_key(entry)
            tokens = int(entry["tokens"])
            ms = {str(k): float(v) for k, v in entry["ms"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: entry {i} is malformed ({exc!r})") from None
        if tokens < 1 or entry["pass"] not in PASSES or any(not (v > 0 and math.isfinite(v)) for v in ms.values()):
            raise ValueError(f"{source}: entry {i} has tokens < 1, an unknown pass or a non-positive time")
        entries.setdefault(key, {})[tokens] = ms
    return entries


def _entry_key(entry: dict) -> EntryKey:
    return EntryKey(
        str(entry["dtype"]),
        int(entry["d_in"]),
        int(entry["e_in"]),
        int(entry["d_out"]),
        int(entry["e_out"]),
        bool(entry["w12"]),
        bool(entry["route"]),
        str(entry["pass"]),
    )


def _read(path: Path) -> tuple[Table | None, str | None]:
    """The table at ``path``, or None and why it cannot be used."""
    try:
        payload = json.loads(path.read_text())
        entries = _parse(payload, str(path))
    except (OSError, ValueError) as exc:
        return None, str(exc)
    return Table(str(path), {k: v for k, v in payload.items() if k != "entries"}, entries), None


@functools.cache
def tables_for(device_name: str) -> tuple[tuple[Table, ...], tuple[str, ...]]:
    """Tables that apply to ``device_name`` with the running versions (precedence order), and one note per
    table that was found but skipped (other GPU, other versions, unreadable)."""
    wanted = software_key()
    tables, notes = [], []
    for path in _json_files(search_paths()):
        table, problem = _read(path)
        if table is None:
            notes.append(f"{path}: {problem}")
            continue
        header = table.header
        if header["device_name"] != device_name:
            continue
        versions = {k: major_minor(header.get(k)) for k in wanted}
        if versions != wanted:
            notes.append(f"{path}: measured with {versions}, running {wanted}: ignored")
            continue
        tables.append(table)
    return tuple(tables), tuple(notes)


def reload() -> None:
    """Forget the tables read so far (after writing a new one, or changing ``SCALE_KERNELS_DISPATCH_TABLES``)."""
    tables_for.cache_clear()


def lookup(device_name: str, key: EntryKey, tokens: int) -> list[Measurement]:
    """The measurements a choice for ``key`` at ``tokens`` tokens is made from.

    With a concrete key and token count: the entries of the first table that has ``key``, at the token counts
    nearest to ``tokens`` (log2 distance, at most :data:`MAX_TOKEN_DISTANCE`; empty when none is that close).
    ``tokens == ANY`` and widths equal to ``ANY`` are wildcards (the choice made at ``torch.compile`` trace
    time, where sizes may be symbolic): every entry of every matching key, each key from its first table.
    """
    tables = tables_for(device_name)[0]
    if tokens == ANY or ANY in (key.d_in, key.e_in, key.d_out, key.e_out):
        found: list[Measurement] = []
        seen: set[EntryKey] = set()
        for table in tables:
            for entry_key, by_tokens in table.entries.items():
                if entry_key not in seen and _matches(entry_key, key):
                    seen.add(entry_key)
                    found += [Measurement(t, ms, table.path) for t, ms in sorted(by_tokens.items())]
        return found
    for table in tables:
        by_tokens = table.entries.get(key)
        if by_tokens is None:
            continue
        target = math.log2(max(tokens, 1))
        distance = {t: abs(math.log2(t) - target) for t in by_tokens}
        best = min(distance.values())
        if best > MAX_TOKEN_DISTANCE:
            return []
        return [Measurement(t, by_tokens[t], table.path) for t in sorted(by_tokens) if distance[t] == best]
    return []


def _matches(entry_key: EntryKey, key: EntryKey) -> bool:
    return all(want == ANY or have == want for have, want in zip(entry_key, key))


def new_table(device_name: str, timer: str) -> dict:
    """An empty table for ``device_name`` with the running versions."""
    import datetime as _dt

    return {
        "format": FORMAT,
        "version": VERSION,
        "device_name": device_name,
        **software_key(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timer": timer,
        "complete": False,
        "entries": [],
    }


def entry(key: EntryKey, tokens: int, ms: dict[str, float], failed: dict[str, str]) -> dict:
    """One table entry (JSON form)."""
    fields = key._asdict()
    fields["pass"] = fields.pop("pass_name")
    return {**fields, "tokens": tokens, "ms": ms, "failed": failed}


def write(payload: dict, path: Path) -> Path:
    """Validate and write ``payload`` atomically (a reader never sees half a file)."""
    validate(payload, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def default_file_name(device_name: str) -> str:
    """``<gpu-slug>_torch<X.Y>_triton<X.Y>.json``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    versions = software_key()
    return f"{slug}_torch{versions['torch']}_triton{versions['triton']}.json"
