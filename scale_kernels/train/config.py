"""Training configuration: one dataclass, filled from defaults, a YAML/JSON file and command-line flags.

Precedence: dataclass defaults < config file < explicit flags. Every field is validated in
:meth:`TrainConfig.validate`, which raises ``ValueError`` naming the field and the expected value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCALE_METHODS = ("scale-preserve", "scale-adapt", "scale-route")
BASELINE_METHODS = ("full", "lora", "freeze", "depth")
METHODS = SCALE_METHODS + BASELINE_METHODS

# Per-method default learning rates (overridable with --lr), chosen for short runs: SCALE 1e-3 for the
# expansion (W12 gets w12_lr_scale times it); dense full/freeze fine-tuning 1e-4; LoRA adapters and
# LLaMA-Pro's new blocks 5e-4. The committed language-shift sweep measures two learning rates per method.
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


@dataclass
class TrainConfig:
    """Everything one continual pre-training run needs. Lists may be given as comma-separated strings."""

    # model and method
    model: str = "smollm2-135m"  # "smollm2-135m" (bundled GGUF), a local HF folder or a HF hub id
    method: str = "scale-preserve"
    width: float = 0.25  # relative width increase used to derive the SCALE / depth sizes below
    extra_hidden: int | None = None
    extra_kv_heads: int | None = None
    extra_intermediate: int | None = None
    # collaborative adaptation: W12 (adapt/route) trains only in these layers (None: the top adapt_fraction
    # of the layers) and these projections ("attention", "mlp", "all" or q_proj, ...)
    adapt_layers: list[int] | None = None
    adapt_fraction: float = 0.25
    adapt_modules: list[str] = field(default_factory=lambda: ["attention"])
    init: str = "random"
    # gate the LM head's W_head_up with the route, so the preservation path is exactly the base model.
    # None: True for scale-route, False otherwise; True on scale-preserve routes it with the rule below
    gate_head: bool | None = None
    route_tau: float = 0.5
    route_rule: str = "paper"  # "paper": adaptation where the paths disagree; "inverted": the ablation
    route_train: str = "policy"  # "policy": the rule picks the path in training too; "adapt": adapt path only
    route_warmup_steps: int | None = None  # policy: adaptation path only for these first steps (None: half)
    lora_r: int = 8
    lora_alpha: int = 16
    freeze_lower: int | None = None  # layers frozen by the "freeze" baseline (default: lower 3/4)
    depth_blocks: int | None = None  # new blocks of the "depth" baseline (default: round(width * layers))
    backend: str | None = None  # scale_kernels backend (torch / triton / cuda); None = automatic
    # data
    # default: the language shift English -> Spanish (train on the Spanish NT minus every 20th chapter)
    train_data: list[str] = field(default_factory=lambda: ["builtin:bible-es"])
    eval_old: list[str] = field(default_factory=lambda: ["builtin:fortunes", "builtin:bible/heldout"])
    eval_new: list[str] | None = None  # None: hold out every 20th document of train_data
    eval_fraction: float = 0.05  # held-out split: every round(1/eval_fraction)-th document (20th)
    separator: str = "\n\n"  # joins packed documents (never the EOS / chat token)
    seq_len: int = 128
    eval_sequences: int = 36  # per domain, shared evenly by its sources (36 x 127 = 4572 targets)
    # optimisation
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR[method]
    w12_lr_scale: float = 0.1  # W12 learning rate = lr x this (SCALE adapt/route)
    head_lr_scale: float = 1.0  # W_head_up learning rate = lr x this (SCALE)
    warmup_steps: int | None = None  # None: 10% of steps (at least 1); step k of the warmup runs at (k+1)/(w+1)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # bookkeeping
    output_dir: str = "runs/cpt"
    base_cache: str | None = None  # folder of the cached base-model eval outputs (None: output_dir/base_cache)
    eval_every: int = 0  # 0: only at the end
    eval_at_start: bool = True
    save_every: int = 0  # 0: only the final save
    keep_checkpoints: int = 2
    save_final: bool = True  # write the method's artefact (expansion / adapter / trained tensors) to final/
    resume: bool = True  # resume from output_dir/checkpoints/latest when present
    progress: bool = True  # a progress bar; false: a plain log line every 10% of the steps

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
        """Check every field; return self. Raises ValueError naming the field."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.route_train not in ROUTE_TRAIN:
            raise ValueError(f"route_train must be one of {ROUTE_TRAIN}, got {self.route_train!r}")
        if self.route_rule not in ROUTE_RULES:
            raise ValueError(f"route_rule must be one of {ROUTE_RULES}, got {self.route_rule!r}")
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
            _check_int(self, name, minimum=1)
        for name in ("steps", "eval_every", "save_every", "seed"):
            _check_int(self, name, minimum=0)
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
                _check_int(self, name, minimum=0)
        if self.threads is not None:
            _check_int(self, "threads", minimum=1)
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


def _check_int(cfg: TrainConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
