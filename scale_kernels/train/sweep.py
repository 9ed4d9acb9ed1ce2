"""Sweeps: many runs (method variant x learning rate x seed) on one data budget, in parallel processes,
resumable, summarised as a forgetting-vs-adaptation trade-off (:mod:`.report`).

Every run is ``python -m scale_kernels.train train --config <run>/config.json`` in its own process (peak
memory per run; a failing run does not stop the others), with its output in ``<run>/train.log``. ``jobs``
runs go at once; with ``threads=1`` per run, ``jobs=2`` keeps a 2-core CPU busy with less overhead than
one run on two threads. The base model is evaluated once first (``<out>/base``), which also writes the
cache of base-model outputs every run shares (``<out>/base_cache``).

Resuming: a run whose ``results.json`` holds the same configuration is reused; a killed run restarts from
its last checkpoint (``save_every``); its checkpoints are deleted once it has finished. So re-running a
killed sweep's command continues where it stopped. ``<out>/sweep_state.json`` accumulates the wall time of
every invocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .run_checkpoints import write_json

BASE = "base"
# relative cost of one training step per method (full fine-tuning = 1; measured on a 2-core CPU with
# SmolLM2-135M), for ordering the runs (longest first) and the time estimates
METHOD_COST = {
    "full": 1.0,
    "freeze": 0.6,
    "lora": 0.75,
    "depth": 0.7,
    "scale-preserve": 1.05,
    "scale-adapt": 1.1,
    "scale-route": 1.1,
}
RULE_COST = 0.4  # the extra preservation-path forward of a routed method training with the rule


@dataclass(frozen=True)
class Variant:
    """A method with fixed options, swept over ``lrs``. ``name`` labels its runs in tables and plots."""

    name: str
    method: str
    lrs: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()
    description: str = ""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""

    variant: Variant
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}_lr{self.lr:g}_s{self.seed}"

    def config(self, base: TrainConfig, out_dir: Path) -> TrainConfig:
        return replace(
            base,
            method=self.variant.method,
            lr=self.lr,
            seed=self.seed,
            eval_at_start=False,
            output_dir=str(out_dir / "runs" / self.name),
            **dict(self.variant.options),
        ).validate()


def grid(variants: Sequence[Variant], seeds: Sequence[int], *, all_seeds: bool = False) -> list[RunSpec]:
    """Every learning rate of every variant with ``seeds[0]``; the variant's last learning rate with every
    seed (``all_seeds``: every learning rate with every seed)."""
    runs = []
    for v in variants:
        for i, lr in enumerate(v.lrs):
            for seed in seeds if all_seeds or i == len(v.lrs) - 1 else seeds[:1]:
                runs.append(RunSpec(v, lr, seed))
    return runs


def estimated_cost(cfg: TrainConfig) -> float:
    """Relative cost of a run (training steps x per-step cost; see ``METHOD_COST``)."""
    per_step = METHOD_COST[cfg.method] + (RULE_COST if cfg.routed and cfg.route_train == "policy" else 0.0)
    return per_step * cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len


def _finished_results(cfg: TrainConfig) -> dict[str, Any] | None:
    """The ``results.json`` of a finished run with exactly this configuration, else None."""
    path = Path(cfg.output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        return results if results["config"] == cfg.to_dict() else None
    except (ValueError, KeyError):
        return None


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


_CHILDREN: set[subprocess.Popen] = set()  # the runs' processes, stopped when the sweep stops early
_CHILDREN_LOCK = threading.Lock()


def _stop_children() -> None:
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        proc.terminate()
    for proc in children:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _stopping_children_on_exit():
    """Stop the runs' processes when the sweep ends early (an error, Ctrl-C, or SIGTERM in the main thread):
    a later invocation resumes them from their checkpoints instead of racing orphans."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    except BaseException:
        _stop_children()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_one(cfg: TrainConfig, *, subprocess_run: bool = True) -> dict[str, Any]:
    """Train ``cfg`` (in a subprocess logging to ``<output_dir>/train.log`` by default), return its results as
    recorded in ``<output_dir>/results.json``. Raises RuntimeError when the run fails."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not subprocess_run:
        from .trainer import run_training

        run_training(cfg)
        return json.loads((out / "results.json").read_text(encoding="utf-8"))
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    cmd = [sys.executable, "-m", "scale_kernels.train", "train", "--config", str(config_path)]
    env = _subprocess_env()
    if cfg.threads is not None:  # also the BLAS/OpenMP pools, before torch starts them
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    with open(out / "train.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            returncode = proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    if returncode != 0:
        error = _last_line(out / "train.log", lambda line: line.startswith("error: "))
        raise RuntimeError(f"exit {returncode}{': ' + error if error else ''}; see {out / 'train.log'}")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _last_line(log: Path, wanted: Callable[[str], bool]) -> str:
    """The last line of the end of a run's log that is ``wanted`` (or '')."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    found = [ln for ln in lines if wanted(ln)]
    return found[-1] if found else ""


def _last_step_line(log: Path) -> str:
    """The last ``step i/n`` progress line of a run's log, without its tag and learning rate (or '')."""
    line = _last_line(log, lambda ln: "] step " in ln)
    return line.split("] ", 1)[1].split(" lr ")[0] if line else ""


def _format_seconds(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class _State:
    """``sweep_state.json``: the wall time of every invocation of a sweep in ``out_dir``."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "sweep_state.json"
        self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.data.setdefault("invocations", [])
        self.start = time.time()
        self.data["invocations"].append({"started": self.start, "wall_seconds": 0.0})
        self.save()

    def save(self) -> None:
        self.data["invocations"][-1]["wall_seconds"] = time.time() - self.start
        write_json(self.path, self.data)

    @property
    def wall_seconds(self) -> float:
        return sum(inv["wall_seconds"] for inv in self.data["invocations"])


def run_sweep(
    base_cfg: TrainConfig,
    runs: Sequence[RunSpec],
    out_dir: str | Path,
    *,
    jobs: int = 1,
    results_dir: str | Path | None = None,
    reuse: bool = True,
    subprocess_run: bool = True,
    status_every: float = 60.0,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Evaluate the base model, train every run of ``runs`` (``jobs`` at once) and write the report
    (``comparison.json``, ``tradeoff.png``, ``README.md``) into ``results_dir`` (default ``out_dir``).
    Returns the comparison (see :func:`.report.build_comparison`)."""
    from .report import build_comparison, write_report

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if jobs > 1 and not subprocess_run:
        raise ValueError("jobs > 1 needs subprocess_run=True (runs in one process would share torch's global state)")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs of the sweep share a name: {sorted(n for n in names if names.count(n) > 1)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _State(out_dir)
    base_cfg = replace(base_cfg, resume=True, base_cache=str(out_dir / "base_cache")).validate()
    base_run = replace(
        base_cfg, method="full", steps=0, eval_at_start=True, save_final=False, output_dir=str(out_dir / BASE)
    ).validate()
    configs = {spec.name: spec.config(base_cfg, out_dir) for spec in runs}
    finished_results = {}  # run name -> its results.json (reused, or trained now)
    if reuse:
        for spec in runs:
            if (found := _finished_results(configs[spec.name])) is not None:
                finished_results[spec.name] = found
    todo = [s for s in runs if s.name not in finished_results]
    total_cost = sum(estimated_cost(c) for c in configs.values())
    log(f"[sweep] {len(runs)} runs ({len(runs) - len(todo)} already done), {jobs} at once; output in {out_dir}")
    base = _finished_results(base_run) if reuse else None
    if base is None:
        log("[sweep] evaluating the base model and caching its outputs")
        base = run_one(base_run, subprocess_run=subprocess_run)
    todo.sort(key=lambda s: -estimated_cost(configs[s.name]))
    done_cost, failures = total_cost - sum(estimated_cost(configs[s.name]) for s in todo), {}
    started_at, launched, finished = time.time(), 0, 0
    cost_done_here = 0.0

    def launch(spec: RunSpec) -> dict[str, Any]:
        return run_one(configs[spec.name], subprocess_run=subprocess_run)

    # the pool waits for its threads on exit, so the children must be stopped first (the inner context)
    with ThreadPoolExecutor(max_workers=jobs) as pool, _stopping_children_on_exit():
        pending: dict[Future, RunSpec] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                spec = queue.pop(0)
                launched += 1
                log(f"[sweep] start {spec.name} ({launched}/{len(todo)}) -> {configs[spec.name].output_dir}/train.log")
                pending[pool.submit(launch, spec)] = spec
            done, _ = wait(pending, timeout=status_every, return_when=FIRST_COMPLETED)
            for future in done:
                spec = pending.pop(future)
                finished += 1
                cost = estimated_cost(configs[spec.name])
                cost_done_here += cost
                done_cost += cost
                try:
                    result = future.result()
                except (RuntimeError, ValueError) as e:
                    failures[spec.name] = str(e)
                    log(f"[sweep] FAILED {spec.name}: {e}")
                    continue
                shutil.rmtree(Path(configs[spec.name].output_dir) / "checkpoints", ignore_errors=True)
                finished_results[spec.name] = result
                after = result["after"]
                log(
                    f"[sweep] done {spec.name}: old-domain ppl {base['evals'][0]['old']['ppl']:.2f} -> "
                    f"{after['old']['ppl']:.2f}, new-domain ppl {base['evals'][0]['new']['ppl']:.2f} -> "
                    f"{after['new']['ppl']:.2f} ({_format_seconds(result['train_seconds'])} training)"
                )
            elapsed = time.time() - started_at
            state.save()
            if pending:
                running = "; ".join(
                    f"{s.name} {_last_step_line(Path(configs[s.name].output_dir) / 'train.log')}"
                    for s in pending.values()
                )
                eta = ""
                if cost_done_here > 0:
                    eta = f", about {_format_seconds(elapsed / cost_done_here * (total_cost - done_cost))} left"
                log(f"[sweep] {_format_seconds(elapsed)} elapsed, {finished}/{len(todo)} finished{eta} | {running}")
    results = [(spec, finished_results[spec.name]) for spec in runs if spec.name in finished_results]
    state.save()
    info = {
        **(meta or {}),
        "jobs": jobs,
        "wall_seconds": state.wall_seconds,
        "invocations": len(state.data["invocations"]),
        "failures": failures,
    }
    comparison = build_comparison(base, results, base_cfg, info)
    write_report(comparison, Path(results_dir) if results_dir is not None else out_dir)
    log(
        f"[sweep] finished in {_format_seconds(state.wall_seconds)} (all invocations); report in "
        f"{results_dir if results_dir is not None else out_dir}"
    )
    return comparison
