"""The continual pre-training loop: AdamW over the trainable parameters only (per-group learning rates),
linear warmup + cosine schedule, gradient accumulation, bf16/fp16 autocast, gradient checkpointing,
periodic evaluation against the cached base model, atomic checkpoints with exact resume, and a final
method-specific save.

Multi-GPU runs use PyTorch's own engines: launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE``
> 1) the model is wrapped in ``DistributedDataParallel`` (or sharded with FSDP2 ``fully_shard`` when
``fsdp=True``); every rank reads its own slice of each global batch.

Outputs in ``output_dir``: ``log.json`` (every eval and every step's loss, rewritten after each eval),
``checkpoints/`` (see :mod:`.run_checkpoints`), ``final/`` (the method's artefact, unless ``save_final`` is
false) and ``results.json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale_kernels.models import set_activation_checkpointing
from scale_kernels.parameters import count_parameters, trainable_parameter_report, trainable_state_dict

from . import run_checkpoints
from .base_cache import BaseReference
from .config import TrainConfig
from .data import (
    BatchStream,
    PackedText,
    holdout_every,
    load_documents,
    pack_documents,
    split_documents,
    spread_subset,
)
from .evaluate import autocast_context, evaluate
from .methods import MethodSetup, check_supported, param_groups, prepare_method, unwrap
from .model_loading import load_model_and_tokenizer

Tensor = torch.Tensor
# Fields that must match between a checkpoint and the run resuming from it.
RESUME_KEYS = (
    "model",
    "method",
    "width",
    "extra_hidden",
    "extra_kv_heads",
    "extra_intermediate",
    "adapt_layers",
    "adapt_fraction",
    "adapt_modules",
    "init",
    "gate_head",
    "route_tau",
    "route_rule",
    "route_train",
    "route_warmup_steps",
    "lora_r",
    "freeze_lower",
    "depth_blocks",
    "train_data",
    "eval_fraction",
    "separator",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "w12_lr_scale",
    "head_lr_scale",
    "warmup_steps",
    "steps",
    "seed",
)
EVAL_DOMAINS = ("old", "new")


@dataclass
class RunData:
    """Packed sequences: ``train`` and the two eval sets ``old`` / ``new``, with the rows of each eval
    source (``sources[domain][source]``, a slice) when a domain has several."""

    train: PackedText
    old: PackedText
    new: PackedText
    sources: dict[str, dict[str, slice]] = field(default_factory=dict)


def _eval_set(sources: list[str], docs_of, count: int, pack) -> tuple[PackedText, dict[str, slice]]:
    """``count`` sequences shared evenly by ``sources`` (each packed on its own, evenly spread over it), and
    the rows of each source."""
    shares = [count // len(sources) + (i < count % len(sources)) for i in range(len(sources))]
    parts, rows, start = [], {}, 0
    for src, n in zip(sources, shares):
        if n:
            parts.append(spread_subset(pack(docs_of(src), f"eval data {src!r}"), n))
            rows[src] = slice(start, start + len(parts[-1]))
            start += len(parts[-1])
    return PackedText.cat(parts), rows


def build_data(cfg: TrainConfig, tokenizer) -> RunData:
    """Load, split and pack the train / old-domain / new-domain data of ``cfg``."""
    k = holdout_every(cfg.eval_fraction)
    docs_of = lambda src: load_documents([src], holdout_every=k)
    pack = lambda docs, name: pack_documents(docs, tokenizer, cfg.seq_len, separator=cfg.separator, name=name)
    train_docs = load_documents(cfg.train_data, holdout_every=k)
    if cfg.eval_new is None:
        train_docs, new_docs = split_documents(train_docs, cfg.eval_fraction)
        new = spread_subset(pack(new_docs, "new-domain eval data (held out of train_data)"), cfg.eval_sequences)
        new_rows = {}
    else:
        new, new_rows = _eval_set(cfg.eval_new, docs_of, cfg.eval_sequences, pack)
    old, old_rows = _eval_set(cfg.eval_old, docs_of, cfg.eval_sequences, pack)
    sources = {domain: rows for domain, rows in (("old", old_rows), ("new", new_rows)) if len(rows) > 1}
    return RunData(train=pack(train_docs, "train data"), old=old, new=new, sources=sources)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of step ``step`` (0-based): linear warmup ``(step + 1) / (warmup + 1)`` over the first
    ``warmup`` steps (so no warmup step runs at the full rate), then cosine decay from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group started by torchrun / accelerate (``WORLD_SIZE`` > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(cfg: TrainConfig, dist_info: DistInfo) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def wrap_distributed(model: nn.Module, cfg: TrainConfig, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` (``fsdp=True``) when running on several processes."""
    if dist_info.world_size == 1:
        return model
    if cfg.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise ValueError("fsdp=True needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        for layer in unwrap(model).model.layers if hasattr(unwrap(model), "model") else []:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what was measured (CUDA allocator peak, or the process's peak RSS on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def _process_cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all threads: with the wall time it shows how
    much a run was slowed by other processes on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@torch.no_grad()
def _probe_logits(model: nn.Module, ids: Tensor) -> Tensor:
    model.eval()
    logits = model(input_ids=ids, use_cache=False).logits.float()
    model.train()
    return logits


class PhaseLog:
    """One line per finished phase of a run, ``[tag] what: result (seconds)``; silent when not ``enabled``
    (ranks other than the main one). Lines go through ``tqdm.write``, so they do not break a progress bar."""

    def __init__(self, tag: str, enabled: bool = True):
        self.tag, self.enabled = tag, enabled

    def line(self, text: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(f"[{self.tag}] {text}")

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[Callable[[str], None]]:
        """Time the block, then print ``what``; the block may pass a result to the yielded function."""
        start, results = time.perf_counter(), []
        yield results.append
        shown = f"{what}: {results[-1]}" if results else what
        self.line(f"{shown} ({time.perf_counter() - start:.1f} s)")


class Trainer:
    """One training run of one method. Build with :meth:`from_config`, then call :meth:`run`."""

    def __init__(
        self,
        cfg: TrainConfig,
        setup: MethodSetup,
        data: RunData,
        device: torch.device,
        dist_info: DistInfo,
        preservation: dict[str, float],
        base: BaseReference | None = None,
        log: PhaseLog | None = None,
    ):
        self.cfg, self.setup, self.data, self.device, self.dist = cfg, setup, data, device, dist_info
        self.preservation, self.base = preservation, base
        self.log = log or PhaseLog(cfg.method, dist_info.main)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.model = setup.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = param_groups(setup, cfg)
        self.group_lrs = {g["name"]: g["lr"] for g in groups}
        # the fused (single-kernel) AdamW: on a CPU ~9x faster than the default per-tensor loops, which for
        # full fine-tuning of a 135M model is ~1 s of a ~6 s step; FSDP2's sharded tensors keep the default
        fused = device.type in ("cpu", "cuda") and not cfg.fsdp
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.stream = BatchStream(
            data.train.ids, cfg.batch_size, cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size
        )
        self.step = 0
        self.last_route_fraction: float | None = None
        self.losses: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self.train_seconds, self.tokens_seen = 0.0, 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Trainer:
        """Load the model and data, apply the method, check that the function is preserved at step 0.

        Prints a line per phase with its duration (main process only)."""
        cfg.validate()
        if cfg.fsdp and cfg.save_every:
            raise ValueError("save_every > 0 (mid-run checkpoints) is not supported with fsdp=True yet")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        dist_info = init_distributed()
        device = pick_device(cfg, dist_info)
        autocast_context(device, cfg.precision)  # a precision the device cannot run fails here, not mid-run
        log = PhaseLog(cfg.method, dist_info.main)
        torch.manual_seed(cfg.seed)
        with log.phase(f"model {cfg.model}") as result:
            model, tokenizer = load_model_and_tokenizer(cfg.model)
            result(f"{type(model).__name__}, {count_parameters(model)[1] / 1e6:.1f}M parameters")
        check_supported(model, cfg.method)
        with log.phase("data") as result:
            data = build_data(cfg, tokenizer)
            result(
                f"train {len(data.train)} x {cfg.seq_len} tokens, eval old {len(data.old)} / new {len(data.new)} "
                "sequences"
            )
        cache = cfg.base_cache or str(Path(cfg.output_dir) / "base_cache")
        with log.phase("base model outputs on the eval sets") as result:
            base = BaseReference.build(
                model,
                cfg.model,
                {d: getattr(data, d) for d in EVAL_DOMAINS},
                cache,
                batch_size=cfg.batch_size,
                device=device,
                progress=cfg.progress and dist_info.main,
            )
            result(base.origin)
        model.cpu()
        probe = data.new.ids[:1]
        base_logits = base.logits("new", slice(0, 1)).cpu()
        with log.phase(f"method {cfg.method}") as result:
            setup = prepare_method(model, cfg)
            result(trainable_parameter_report(setup.model))
        new_logits = _probe_logits(setup.model, probe)  # the plain forward: the adaptation path if routed
        preservation = {
            "max_abs_logit_diff": float((new_logits - base_logits).abs().max()),
            "max_abs_logit": float(base_logits.abs().max()),
            "probe_tokens": int(probe.numel()),
        }
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(unwrap(setup.model))
        setup.model.to(device)
        setup.model = wrap_distributed(setup.model, cfg, device, dist_info)
        return cls(cfg, setup, data, device, dist_info, preservation, base, log)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        return {k: d[k] for k in RESUME_KEYS}

    def save_checkpoint(self) -> Path | None:
        if not self.dist.main:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": run_checkpoints.rng_state(),
            "data": self.stream.state_dict(),
            "losses": self.losses,
            "evals": self.evals,
            "fingerprint": self._fingerprint(),
            "train_seconds": self.train_seconds,
            "tokens_seen": self.tokens_seen,
        }
        tensors = trainable_state_dict(unwrap(self.model))
        return run_checkpoints.save_checkpoint(self.ckpt_dir, self.step, tensors, state, keep=self.cfg.keep_checkpoints)

    def maybe_resume(self) -> bool:
        """Restore the latest complete checkpoint of ``output_dir`` (if any and ``resume``)."""
        folder = run_checkpoints.latest_checkpoint(self.ckpt_dir) if self.cfg.resume else None
        if folder is None:
            return False
        step, tensors, state = run_checkpoints.load_checkpoint(folder)
        if state["fingerprint"] != self._fingerprint():
            diff = {
                k: (state["fingerprint"].get(k), v)
                for k, v in self._fingerprint().items()
                if state["fingerprint"].get(k) != v
            }
            raise ValueError(
                f"checkpoint {folder} was written by a different run configuration "
                f"(checkpoint value, this run): {diff}; use another output_dir or resume=false"
            )
        named = dict(unwrap(self.model).named_parameters())
        if set(tensors) != {n for n, p in named.items() if p.requires_grad}:
            raise ValueError(f"checkpoint {folder} holds other trainable tensors than this model")
        with torch.no_grad():
            for name, tensor in tensors.items():
                named[name].copy_(tensor.to(named[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        run_checkpoints.set_rng_state(state["rng"])
        self.stream.load_state_dict(state["data"])
        self.losses, self.evals = list(state["losses"]), list(state["evals"])
        self.train_seconds, self.tokens_seen = float(state["train_seconds"]), int(state["tokens_seen"])
        self.step = step
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Both domains: the method's metrics under ``old`` / ``new``, extra views under ``views``."""
        row: dict[str, Any] = {"step": self.step}
        self.model.eval()
        try:
            with self.log.phase(f"eval at step {self.step}") as result:
                for domain in EVAL_DOMAINS:
                    base = (lambda rows, d=domain: self.base.logits(d, rows)) if self.base is not None else None
                    metrics = evaluate(
                        self.setup.predict,
                        getattr(self.data, domain),
                        batch_size=self.cfg.batch_size,
                        device=self.device,
                        precision=self.cfg.precision,
                        base=base,
                        sources=self.data.sources.get(domain),
                        progress=f"eval {domain}" if self.cfg.progress and self.dist.main else None,
                    )
                    row[domain] = metrics.pop("model")
                    for view, values in metrics.items():
                        row.setdefault("views", {}).setdefault(view, {})[domain] = values
                result(f"old-domain ppl {row['old']['ppl']:.3f}, new-domain ppl {row['new']['ppl']:.3f}")
        finally:
            self.model.train()
        self.evals.append(row)
        if self.dist.main:
            run_checkpoints.write_json(self.out / "log.json", {"evals": self.evals, "losses": self.losses})
        return row

    # ------------------------------------------------------------------ training
    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        cfg, model = self.cfg, self.model
        model.train()
        total, routed = 0.0, []
        use_rule = self.step >= cfg.route_warmup
        for micro in range(cfg.grad_accum):
            ids = self.stream.next_batch().to(self.device)
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast_context(self.device, cfg.precision):
                    loss, fraction = self.setup.training_loss(ids, use_rule=use_rule)
                    loss = loss / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
            self.tokens_seen += ids.numel()
            if fraction is not None:
                routed.append(fraction)
        self.last_route_fraction = sum(routed) / len(routed) if routed else None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run(self) -> dict[str, Any]:
        """Train to ``cfg.steps`` (resuming if a checkpoint exists), evaluate, save; return the results."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        if self.step == 0 and cfg.eval_at_start and not self.evals:
            self.evaluate()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.main),
            desc=cfg.method,
            dynamic_ncols=True,
        )
        log_lines = not cfg.progress and self.dist.main
        log_every = max(1, cfg.steps // 10)
        session_tokens, session_seconds = 0, 0.0
        while self.step < cfg.steps:
            start_tokens, start = self.tokens_seen, time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step()
            elapsed = time.perf_counter() - start
            self.train_seconds += elapsed
            session_seconds += elapsed
            session_tokens += self.tokens_seen - start_tokens
            self.step += 1
            record = {"step": self.step, "loss": loss, "lr": lr, "seconds": elapsed}
            if self.last_route_fraction is not None:
                record["route_adapt_fraction"] = self.last_route_fraction
            self.losses.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{session_tokens / max(session_seconds, 1e-9):.0f}")
            if log_lines and (self.step % log_every == 0 or self.step == cfg.steps):
                routed = "" if self.last_route_fraction is None else f" routed {self.last_route_fraction:.0%}"
                print(
                    f"[{cfg.method}] step {self.step}/{cfg.steps} loss {loss:.4f} lr {lr:.3g}{routed} "
                    f"{session_seconds / max(1, session_tokens) * 1000:.1f} ms/token",
                    flush=True,
                )
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate()
        if cfg.steps > 0 and self.dist.main:
            if cfg.save_every:
                self.save_checkpoint()
            if cfg.save_final:
                with self.log.phase(f"final artefact in {self.out / 'final'}"):
                    self.setup.save_final(self.out / "final")
        return self._results(resumed)

    def _results(self, resumed: bool) -> dict[str, Any]:
        memory, memory_kind = peak_memory(self.device)
        results = {
            "method": self.cfg.method,
            "config": self.cfg.to_dict(),
            "details": {**self.setup.details, "param_group_lrs": self.group_lrs},
            "preservation": self.preservation,
            "resumed": resumed,
            "losses": self.losses,
            "evals": self.evals,
            "before": self.evals[0] if self.evals and self.evals[0]["step"] == 0 else None,
            "after": self.evals[-1] if self.evals else None,
            "tokens_seen": self.tokens_seen,
            "train_tokens": self.tokens_seen * self.dist.world_size,
            "train_seconds": self.train_seconds,
            "tokens_per_s": (
                self.tokens_seen * self.dist.world_size / self.train_seconds if self.train_seconds > 0 else None
            ),  # all ranks together
            "peak_memory_bytes": memory,
            "process_cpu_seconds": _process_cpu_seconds(),
            "peak_memory_kind": memory_kind,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "torch_version": torch.__version__,
        }
        if self.dist.main:
            run_checkpoints.write_json(self.out / "results.json", results)
        return results


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Build a :class:`Trainer` for ``cfg`` and run it (optionally under a forced scale_kernels backend)."""
    if cfg.backend:
        from scale_kernels import use_backend

        with use_backend(cfg.backend):
            return Trainer.from_config(cfg).run()
    return Trainer.from_config(cfg).run()
