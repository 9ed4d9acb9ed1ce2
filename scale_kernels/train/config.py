"""Training configuration: one dataclass, filled from defaults, a YAML/JSON file and command-line flags.

Precedence: dataclass defaults < config file < explicit flags. Every field carries its help text and, where
the values are a fixed set, its choices (``fields(TrainConfig)[i].metadata``: the CLI's ``--help`` shows
them). :meth:`TrainConfig.validate` checks every field and raises ``ValueError`` (``TypeError`` for a value of
the wrong type) naming the field and the expected value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from scale_kernels.backends import BACKEND_NAMES
from scale_kernels.models import ATTENTION, MLP
from scale_kernels.modules import INITS, check_choice, check_size

from .data import DEFAULT_SEPARATOR

SCALE_METHODS = ("scale-preserve", "scale-adapt", "scale-route")
BASELINE_METHODS = ("full", "lora", "freeze", "depth")
METHODS = SCALE_METHODS + BASELINE_METHODS

# Per-method default learning rates (overridable with --lr), chosen for short runs: SCALE 1e-3 for the
# expansion (W12 gets w12_lr_scale times it); dense full/freeze fine-tuning 1e-4; LoRA adapters and
# LLaMA-Pro's new blocks 5e-4. The committed language-shift sweep measures two learning rates per method (five
# for full FT).
DEFAULT_LR = {
    "scale-preserve": 1e-3,
    "scale-adapt": 1e-3,
    "scale-route": 1e-3,
    "full": 1e-4,
    "freeze": 1e-4,
    "lora": 5e-4,
    "depth": 5e-4,
}
PRECISIONS = ("fp32", "bf16", "fp16")
ROUTE_TRAIN = ("policy", "adapt")
ROUTE_RULES = ("paper", "inverted")
DATA_SOURCES = "data sources (comma-separated; see DATA SOURCES below)"


def option(default: Any = None, help: str = "", choices: tuple[str, ...] | None = None, *, factory=None) -> Any:
    """A TrainConfig field with its ``--help`` text and, for a fixed set of values, its ``choices``."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything one continual pre-training run needs. Lists may be given as comma-separated strings."""

    # model and method
    model: str = option("smollm2-135m", "base model (see MODEL below)")
    method: str = option("scale-preserve", "training method", METHODS)
    width: float = option(0.25, "relative width increase: derives the SCALE sizes below and the depth blocks")
    extra_hidden: int | None = option(None, "SCALE: extra hidden width (default: width x hidden size)")
    extra_kv_heads: int | None = option(None, "SCALE: extra KV heads (default: width x KV heads, at least 1)")
    extra_intermediate: int | None = option(None, "SCALE: extra FFN width (default: width x FFN width)")
    # collaborative adaptation: W12 (adapt/route) trains only in these layers and projections
    adapt_layers: list[int] | None = option(
        None,
        "SCALE adapt/route: layers whose W12 trains (negative counts from the top; default: the top "
        "adapt_fraction of the layers)",
    )
    adapt_fraction: float = option(0.25, "SCALE adapt/route: share of the (upper) layers whose W12 trains")
    adapt_modules: list[str] = option(
        help="SCALE adapt/route: projections whose W12 trains: attention, mlp, all or names among "
        + ", ".join(ATTENTION + MLP),
        factory=lambda: ["attention"],
    )
    init: str = option("random", "SCALE: initialisation of W21 / W22 / E_up", INITS)
    # gate the LM head's W_head_up with the route, so the preservation path is exactly the base model.
    gate_head: bool | None = option(
        None, "SCALE: the route gates the head expansion W_head_up (default: true for scale-route, else false)"
    )
    route_tau: float = option(0.5, "SCALE-Route: cosine-similarity threshold of the rule")
    route_rule: str = option(
        "paper", "SCALE-Route: paper = adaptation where the two paths disagree; inverted = the ablation", ROUTE_RULES
    )
    route_train: str = option(
        "policy", "SCALE-Route training: policy = the rule picks the path; adapt = adaptation path only", ROUTE_TRAIN
    )
    route_warmup_steps: int | None = option(
        None, "SCALE-Route, route_train=policy: steps training the adaptation path only (default: half the steps)"
    )
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    freeze_lower: int | None = option(None, "freeze: lower layers kept frozen (default: 3/4 of them)")
    depth_blocks: int | None = option(None, "depth: new LLaMA-Pro blocks (default: round(width x layers))")
    backend: str | None = option(None, "scale_kernels backend of the SCALE op (default: automatic)", BACKEND_NAMES)
    # data; default: the language shift English -> Spanish (train on the Spanish NT minus every 20th chapter)
    train_data: list[str] = option(help="training " + DATA_SOURCES, factory=lambda: ["builtin:bible-es"])
    eval_old: list[str] = option(
        help="old-domain (forgetting) evaluation " + DATA_SOURCES,
        factory=lambda: ["builtin:fortunes", "builtin:bible/heldout"],
    )
    eval_new: list[str] | None = option(
        None, "new-domain (adaptation) evaluation " + DATA_SOURCES + " (default: held out of train_data)"
    )
    eval_fraction: float = option(0.05, "held-out split: every round(1 / eval_fraction)-th document")
    separator: str = option(DEFAULT_SEPARATOR, "text joining packed documents (never the EOS / chat token)")
    seq_len: int = option(128, "tokens per packed sequence")
    eval_sequences: int = option(36, "eval sequences per domain, shared evenly by its sources")
    # optimisation
    steps: int = option(30, "optimizer steps")
    batch_size: int = option(4, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float | None = option(
        None, "learning rate (default per method: " + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")"
    )
    w12_lr_scale: float = option(0.1, "SCALE adapt/route: W12 learning rate = lr x this")
    head_lr_scale: float = option(1.0, "SCALE: W_head_up learning rate = lr x this")
    warmup_steps: int | None = option(
        None, "linear warmup steps; step k runs at (k+1)/(warmup+1) of lr (default: 10% of the steps, >= 1)"
    )
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr x this")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)")
    precision: str = option("fp32", "autocast precision (fp16 needs CUDA)", PRECISIONS)
    gradient_checkpointing: bool = option(False, "HF activation checkpointing (non-reentrant)")
    fsdp: bool = option(False, "FSDP2 instead of DDP when launched on several processes")
    seed: int = option(0, "seed of the expansion init and the data order")
    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch intra-op threads (default: torch's)")
    # bookkeeping
    output_dir: str = option("runs/cpt", "folder of the run's logs, checkpoints and results")
    base_cache: str | None = option(None, "folder of the cached base-model outputs (default: output_dir/base_cache)")
    eval_every: int = option(0, "evaluate every N steps (0: at the end only)")
    eval_at_start: bool = option(True, "evaluate before the first step")
    save_every: int = option(0, "checkpoint every N steps (0: none)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    save_final: bool = option(True, "write the method's artefact (expansion / adapter / trained tensors) to final/")
    resume: bool = option(True, "resume from output_dir/checkpoints/latest when present")
    progress: bool = option(True, "progress bars (false: a plain log line every 10% of the steps)")

    # ------------------------------------------------------------------ derived values
    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def warmup(self) -> int:
        return max(1, round(self.steps / 10)) if self.warmup_steps is None else self.warmup_steps

    @property
    def head_gated(self) -> bool:
        return self.method == "scale-route" if self.gate_head is None else self.gate_head

    @property
    def routed(self) -> bool:
        """Whether the method picks, per token, between the preservation and the adaptation path."""
        return self.method == "scale-route" or (self.method == "scale-preserve" and self.head_gated)

    @property
    def route_warmup(self) -> int:
        return self.steps // 2 if self.route_warmup_steps is None else self.route_warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every field; return self. Raises ValueError (TypeError for a wrong type) naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] is not None and value is not None:
                check_choice(f.name, value, f.metadata["choices"])
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(
                    f"device must be 'auto' or a torch device (cpu, cuda, cuda:N), got {self.device!r}"
                ) from e
        if self.gate_head and self.method not in ("scale-preserve", "scale-route"):
            raise ValueError(
                f"gate_head=true applies to scale-preserve and scale-route, not {self.method!r} "
                "(scale-adapt has no route: use scale-route)"
            )
        if not self.separator:
            raise ValueError("separator must be a non-empty string")
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "eval_sequences",
            "lora_r",
            "lora_alpha",
            "keep_checkpoints",
        ):
            check_size(name, getattr(self, name), minimum=1)
        for name in ("steps", "eval_every", "save_every", "seed"):
            check_size(name, getattr(self, name))
        for name in (
            "extra_hidden",
            "extra_kv_heads",
            "extra_intermediate",
            "freeze_lower",
            "depth_blocks",
            "warmup_steps",
            "route_warmup_steps",
        ):
            if getattr(self, name) is not None:
                check_size(name, getattr(self, name))
        if self.threads is not None:
            check_size("threads", self.threads, minimum=1)
        for name in (
            "width",
            "weight_decay",
            "max_grad_norm",
            "min_lr_ratio",
            "route_tau",
            "eval_fraction",
            "adapt_fraction",
            "w12_lr_scale",
            "head_lr_scale",
        ):
            _check_float(self, name)
        if not 0.0 < self.adapt_fraction <= 1.0:
            raise ValueError(f"adapt_fraction must be in (0, 1], got {self.adapt_fraction}")
        for name in ("w12_lr_scale", "head_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None:
            _check_float(self, "lr")
            if self.lr <= 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.width < 0:
            raise ValueError(f"width must be >= 0, got {self.width}")
        if not self.train_data:
            raise ValueError("train_data must name at least one file, directory or builtin corpus")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        return self


def _check_float(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ---------------------------------------------------------------------- parsing helpers
def field_kinds() -> dict[str, str]:
    """``{field: kind}`` with kind in int / float / bool / str / list[int] / list[str] (for the CLI)."""
    kinds = {}
    for f in fields(TrainConfig):
        t = str(f.type)
        if "list[int]" in t:
            kinds[f.name] = "list[int]"
        elif "list[str]" in t:
            kinds[f.name] = "list[str]"
        elif t.startswith("bool"):  # "bool" and "bool | None"
            kinds[f.name] = "bool"
        elif t.startswith("int"):
            kinds[f.name] = "int"
        elif t.startswith("float"):
            kinds[f.name] = "float"
        else:
            kinds[f.name] = "str"
    return kinds


def coerce(name: str, value: Any) -> Any:
    """Convert a file or flag value to the field's type (comma-separated strings become lists)."""
    kind = field_kinds()[name]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    try:
        if kind.startswith("list"):
            parts = value.split(",") if isinstance(value, str) else list(value)
            parts = [v.strip() if isinstance(v, str) else v for v in parts]
            items = [v for v in parts if v != ""]
            return [int(v) for v in items] if kind == "list[int]" else [str(v) for v in items]
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} expects {kind}, got {value!r}") from e
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.json`` or ``.yaml``/``.yml`` file holding a mapping of TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError("YAML configs need PyYAML: pip install pyyaml (or use a .json config)") from e
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    return data


def make_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Build and validate a TrainConfig from file values and explicit overrides (None = not given)."""
    known = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for source in (file_values or {}, {k: v for k, v in overrides.items() if v is not None}):
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ValueError(f"unknown config option {key!r}; known options: {sorted(known)}")
            values[key] = coerce(key, value)
    return TrainConfig(**values).validate()
