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

# Per-method default learning rates (overridable with --lr), chosen for short runs: SCALE uses 1e-3 as in
# the paper; dense full/freeze fine-tuning 1e-4 (the paper used 1e-5 over a much longer run); LoRA adapters
# and LLaMA-Pro's new blocks 5e-4.
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
ROUTE_TRAIN = ("adapt", "policy")


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
    adapt_layers: list[int] | None = None
    adapt_modules: list[str] | None = None
    init: str = "random"
    route_tau: float = 0.5
    route_train: str = "adapt"  # path used while training scale-route ("policy": the fixed rule; see docs)
    lora_r: int = 8
    lora_alpha: int = 16
    freeze_lower: int | None = None  # layers frozen by the "freeze" baseline (default: lower 3/4)
    depth_blocks: int | None = None  # new blocks of the "depth" baseline (default: round(width * layers))
    backend: str | None = None  # scale_kernels backend (torch / triton / cuda); None = automatic
    # data
    train_data: list[str] = field(default_factory=lambda: ["builtin:bible"])
    eval_old: list[str] = field(default_factory=lambda: ["builtin:fortunes"])
    eval_new: list[str] | None = None  # None: hold out a slice of train_data
    eval_fraction: float = 0.05
    seq_len: int = 128
    eval_sequences: int = 32
    # optimisation
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR[method]
    warmup_steps: int | None = None  # None: 10% of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    device: str = "auto"
    # bookkeeping
    output_dir: str = "runs/cpt"
    eval_every: int = 0  # 0: only at the end
    eval_at_start: bool = True
    save_every: int = 0  # 0: only the final save
    keep_checkpoints: int = 2
    resume: bool = True  # resume from output_dir/checkpoints/latest when present
    progress: bool = True

    # ------------------------------------------------------------------ derived values
    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

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
        for name in ("seq_len", "batch_size", "grad_accum", "eval_sequences", "lora_r", "lora_alpha",
                     "keep_checkpoints"):
            _check_int(self, name, minimum=1)
        for name in ("steps", "eval_every", "save_every", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("extra_hidden", "extra_kv_heads", "extra_intermediate", "freeze_lower", "depth_blocks",
                     "warmup_steps"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=0)
        for name in ("width", "weight_decay", "max_grad_norm", "min_lr_ratio", "route_tau", "eval_fraction"):
            _check_float(self, name)
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
        if self.eval_new is None and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1) when eval_new is not given, "
                             f"got {self.eval_fraction}")
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
        elif t.startswith("bool"):
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
