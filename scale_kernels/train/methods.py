"""Turning a loaded base model into what a method trains: SCALE variants and the baselines.

:func:`prepare_method` returns a :class:`MethodSetup`: the model to train, how to call it during training
and evaluation (SCALE-Route passes a per-token ``scale_route`` mask), and how to write the final,
method-specific artefact (an expansion-only checkpoint for SCALE, a PEFT adapter for LoRA, the trained
tensors otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import baselines
from .config import TrainConfig

Tensor = torch.Tensor


def scale_available() -> bool:
    """True when the SCALE module layer (``scale_kernels.upscale_model``) is importable."""
    import scale_kernels

    return hasattr(scale_kernels, "upscale_model")


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of the parameters that train (shared parameters listed once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, shared (tied) parameters counted once."""
    params = list(model.parameters())  # named/parameters() deduplicate shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_trainable(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """Write the trained tensors (``trainable.safetensors``) and ``method.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous().cpu() for n, t in trainable_state(model).items()},
              str(directory / "trainable.safetensors"))
    (directory / "method.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


@dataclass
class MethodSetup:
    """A model ready to train, plus the per-method hooks the trainer needs."""

    model: nn.Module
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    route_policy: Any = None  # a scale_kernels.RoutePolicy for SCALE-Route
    route_during_training: bool = False

    def forward_kwargs(self, input_ids: Tensor, *, training: bool) -> dict[str, Any]:
        """Extra kwargs for ``model(input_ids, ...)``: the route mask for SCALE-Route."""
        if self.route_policy is None or (training and not self.route_during_training):
            return {}
        return {"scale_route": self.route_policy.compute_route(unwrap(self.model), input_ids)}

    def save_final(self, directory: Path) -> None:
        """The method's final artefact (expansion-only for SCALE, adapter for LoRA, trained tensors else)."""
        directory.mkdir(parents=True, exist_ok=True)
        model = unwrap(self.model)
        meta = {"method": self.method, **self.details}
        if self.method.startswith("scale-"):
            from scale_kernels import save_expansion

            save_expansion(model, directory)
            (directory / "method.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        elif self.method == "lora":
            model.save_pretrained(str(directory))
            (directory / "method.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        else:
            save_trainable(model, directory, meta)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def scale_sizes(config, cfg: TrainConfig) -> dict[str, int]:
    """Expansion sizes: explicit config values, else ``width`` times the base sizes (>= 1 KV head)."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    derived = {
        "extra_hidden": round(cfg.width * config.hidden_size),
        "extra_kv_heads": max(1, round(cfg.width * kv)) if cfg.width > 0 else 0,
        "extra_intermediate": round(cfg.width * config.intermediate_size),
    }
    for name in derived:
        if getattr(cfg, name) is not None:
            derived[name] = getattr(cfg, name)
    if derived["extra_hidden"] < 1:
        raise ValueError(f"SCALE needs extra_hidden >= 1 (set width > 0 or extra_hidden), got {derived}")
    return derived


def _prepare_scale(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    if not scale_available():
        raise ValueError(
            f"method {cfg.method!r} needs the SCALE module layer (scale_kernels.upscale_model), "
            "which this installation lacks"
        )
    from scale_kernels import RoutePolicy, upscale_model

    mode = cfg.method.split("-", 1)[1]
    sizes = scale_sizes(model.config, cfg)
    upscale_model(
        model, sizes["extra_hidden"], extra_kv_heads=sizes["extra_kv_heads"] or None,
        extra_intermediate=sizes["extra_intermediate"], mode=mode,
        adapt_layers=cfg.adapt_layers if mode != "preserve" else None,
        adapt_modules=cfg.adapt_modules if mode != "preserve" else None, init=cfg.init, seed=cfg.seed,
    )
    details = {"mode": mode, **sizes, "adapt_layers": cfg.adapt_layers, "adapt_modules": cfg.adapt_modules,
               "init": cfg.init}
    policy = None
    if mode == "route":
        policy = RoutePolicy(tau=cfg.route_tau)
        details.update(route_tau=cfg.route_tau, route_train=cfg.route_train)
    return MethodSetup(model, cfg.method, details, policy, route_during_training=cfg.route_train == "policy")


def _prepare_baseline(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    n_layers = len(baselines._decoder_layers(model))
    if cfg.method == "full":
        return MethodSetup(baselines.apply_full(model), "full")
    if cfg.method == "freeze":
        lower = (3 * n_layers) // 4 if cfg.freeze_lower is None else cfg.freeze_lower
        return MethodSetup(baselines.apply_freeze(model, lower), "freeze", {"freeze_lower": lower})
    if cfg.method == "lora":
        wrapped = baselines.apply_lora(model, cfg.lora_r, cfg.lora_alpha)
        return MethodSetup(wrapped, "lora", {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha})
    blocks = cfg.depth_blocks if cfg.depth_blocks is not None else max(1, round(cfg.width * n_layers))
    return MethodSetup(baselines.apply_depth(model, blocks), "depth",
                       {"depth_blocks": blocks, "insert_after": baselines.insertion_points(n_layers, blocks)})


PREPARERS: dict[str, Callable[[nn.Module, TrainConfig], MethodSetup]] = {
    "scale-preserve": _prepare_scale, "scale-adapt": _prepare_scale, "scale-route": _prepare_scale,
    "full": _prepare_baseline, "freeze": _prepare_baseline, "lora": _prepare_baseline,
    "depth": _prepare_baseline,
}


def prepare_method(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    """Apply ``cfg.method`` to ``model`` (in place; LoRA wraps it) and report what trains."""
    setup = PREPARERS[cfg.method](model, cfg)
    trainable, total = parameter_counts(setup.model)
    if trainable == 0:
        raise RuntimeError(f"method {cfg.method!r} left no trainable parameter")
    setup.details.update(trainable_params=trainable, total_params=total)
    return setup
