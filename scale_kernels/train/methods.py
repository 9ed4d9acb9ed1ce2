"""Turning a loaded base model into what a method trains: SCALE variants and the baselines.

:func:`prepare_method` returns a :class:`MethodSetup`: the model to train, its training loss and its
evaluation predictions (routed SCALE methods pick per token between two paths of the model), and how to
write the final, method-specific artefact (an expansion-only checkpoint for SCALE, a PEFT adapter for
LoRA, the trained tensors otherwise). :func:`param_groups` gives the per-group learning rates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from scale_kernels.models.lora import apply_lora
from scale_kernels.parameters import count_parameters, trainable_state_dict

from . import baseline_methods
from .config import SCALE_METHODS, TrainConfig
from .evaluate import Prediction, causal_lm_loss

Tensor = torch.Tensor


def save_trainable(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """Write the trained tensors (``trainable.safetensors``) and ``method.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in trainable_state_dict(model).items()}
    save_file(tensors, str(directory / "trainable.safetensors"))
    (directory / "method.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


# extra evaluation views of a SCALE model (same trained weights, another way of predicting): key -> label
VIEW_LABELS = {
    "gated_rule": "head gated by the rule (at eval only)",
    "adapt_path": "adaptation path only",
    "inverted_rule": "inverted rule (at eval only)",
    "paper_rule": "paper rule (at eval only)",
}


@dataclass
class MethodSetup:
    """A model ready to train, plus the per-method hooks the trainer needs.

    For a *routed* method (SCALE-Route; SCALE-Preserve with ``gate_head``) every token is predicted by one
    of two paths of the same model, chosen by ``policy`` (the fixed rule, :class:`scale_kernels.RoutePolicy`)
    from their two next-token distributions: the preservation path (route 0 everywhere: exactly the base
    model when the head is gated) and the adaptation path (route 1 everywhere).
    """

    model: nn.Module
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    # the rule (a scale_kernels.RoutePolicy): routed methods predict with it; the other SCALE methods use it
    # only for the "gated_rule" evaluation view (the base model vs the trained model, per token)
    policy: Any = None
    routed: bool = False
    route_train: str = "policy"  # "policy": the rule also picks the path in training; "adapt": adapt path
    preserve_path_trains: bool = False  # routed, head not gated: the preservation path has trainable terms

    @property
    def scale(self) -> bool:
        """A SCALE model (upscaled)."""
        return self.method in SCALE_METHODS

    def _logits(self, ids: Tensor, **kwargs: Any) -> Tensor:
        return self.model(input_ids=ids, use_cache=False, **kwargs).logits

    def _path_logits(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(preserve, adapt)`` logits; both from one forward of the doubled batch when the preservation
        path trains (so DDP sees one forward), else the preservation path without gradient."""
        if self.preserve_path_trains:
            b = ids.shape[0]
            route = torch.arange(2 * b, device=ids.device) >= b  # first copy route 0, second route 1
            both = self._logits(torch.cat([ids, ids]), scale_route=route)
            return both[:b], both[b:]
        with torch.no_grad():
            preserve = self._logits(ids, scale_route=False)
        return preserve, self._logits(ids, scale_route=True)

    def training_loss(self, ids: Tensor, *, use_rule: bool) -> tuple[Tensor, float | None]:
        """``(mean next-token loss, share of targets routed to adaptation or None)`` of one batch.

        Routed methods with ``route_train="policy"`` and ``use_rule`` (after the route warmup): each target is
        predicted by the path the rule picks, so only adaptation-path targets train the adaptation path. Else
        a routed method trains its adaptation path on every target.
        """
        if not self.routed:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss, None
        if self.route_train == "adapt" or not use_rule:
            return self.model(input_ids=ids, labels=ids, use_cache=False, scale_route=True).loss, None
        logits, route = self.policy.select(*self._path_logits(ids))
        return causal_lm_loss(logits, ids), float(route[:, :-1].float().mean())

    def predict(self, ids: Tensor, base_logits: Tensor | None) -> dict[str, Prediction]:
        """Evaluation predictions of a batch: ``"model"`` (the method's) plus extra views (``VIEW_LABELS``).

        ``base_logits`` (the base model on ``ids``, or None) serve as the preservation path of a gated head.
        """
        if not self.routed:
            logits = self._logits(ids)
            out = {"model": Prediction(logits)}
            if self.policy is not None and base_logits is not None:  # the exact base vs this model, per token
                paths = (base_logits, logits)
                out["gated_rule"] = Prediction(route=self.policy.route_from_logits(*paths), paths=paths)
            return out
        if base_logits is not None and not self.preserve_path_trains:
            paths = (base_logits, self._logits(ids, scale_route=True))
        else:
            paths = self._path_logits(ids)
        route = self.policy.route_from_logits(*paths)
        other = "paper_rule" if self.policy.inverted else "inverted_rule"  # the same threshold, inverted
        return {
            "model": Prediction(route=route, paths=paths),
            "adapt_path": Prediction(paths[1], torch.ones(ids.shape, dtype=torch.bool, device=ids.device)),
            other: Prediction(route=~route, paths=paths),
        }

    def save_final(self, directory: Path) -> None:
        """The method's final artefact (expansion-only for SCALE, adapter for LoRA, trained tensors else)."""
        directory.mkdir(parents=True, exist_ok=True)
        model = unwrap(self.model)
        meta = {"method": self.method, **self.details}
        if self.scale:
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


def top_layers(n_layers: int, fraction: float) -> list[int]:
    """The upper ``ceil(fraction * n_layers)`` layer indices (collaborative adaptation's default)."""
    k = max(1, math.ceil(fraction * n_layers - 1e-9))
    return list(range(n_layers - k, n_layers))


def check_supported(model: nn.Module, method: str) -> None:
    """ValueError naming ``method`` and what it needs when it cannot train ``model`` (checked right after
    loading, before the data and the base-model evaluation)."""
    if method in SCALE_METHODS:
        from scale_kernels.models import family_of

        try:
            family_of(model)
        except ValueError as e:
            raise ValueError(
                f"method {method!r} cannot upscale this model ({e}); the baselines 'full' and 'lora' train any "
                "HF causal LM"
            ) from e
    elif method in ("freeze", "depth"):
        baseline_methods.decoder_layers(model, method)


def _prepare_scale(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    from scale_kernels import RoutePolicy, upscale_model

    mode = cfg.method.split("-", 1)[1]
    sizes = scale_sizes(model.config, cfg)
    details: dict[str, Any] = {"mode": mode, **sizes, "init": cfg.init, "gate_head": cfg.head_gated}
    w12: dict[str, Any] = {}
    if mode != "preserve":
        n_layers = len(baseline_methods.decoder_layers(model, cfg.method))
        layers = cfg.adapt_layers if cfg.adapt_layers is not None else top_layers(n_layers, cfg.adapt_fraction)
        w12 = {"adapt_layers": layers, "adapt_modules": cfg.adapt_modules}
        details.update(w12)
    upscale_model(
        model,
        sizes["extra_hidden"],
        extra_kv_heads=sizes["extra_kv_heads"] or None,
        extra_intermediate=sizes["extra_intermediate"],
        mode=mode,
        init=cfg.init,
        seed=cfg.seed,
        gate_head=cfg.head_gated,
        **w12,
    )
    policy = RoutePolicy(tau=cfg.route_tau, inverted=cfg.routed and cfg.route_rule == "inverted")
    if cfg.routed:
        details.update(
            route_tau=cfg.route_tau,
            route_rule=cfg.route_rule,
            route_train=cfg.route_train,
            route_warmup_steps=cfg.route_warmup,
        )
    return MethodSetup(
        model,
        cfg.method,
        details,
        policy=policy,
        routed=cfg.routed,
        route_train=cfg.route_train,
        preserve_path_trains=cfg.routed and not cfg.head_gated,
    )


def _prepare_full(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    return MethodSetup(baseline_methods.apply_full(model), "full")


def _prepare_lora(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    wrapped = apply_lora(model, cfg.lora_r, cfg.lora_alpha)
    return MethodSetup(wrapped, "lora", {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha})


def _prepare_freeze(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    n_layers = len(baseline_methods.decoder_layers(model, "freeze"))
    lower = (3 * n_layers) // 4 if cfg.freeze_lower is None else cfg.freeze_lower
    return MethodSetup(baseline_methods.apply_freeze(model, lower), "freeze", {"freeze_lower": lower})


def _prepare_depth(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    n_layers = len(baseline_methods.decoder_layers(model, "depth"))
    blocks = cfg.depth_blocks if cfg.depth_blocks is not None else max(1, round(cfg.width * n_layers))
    return MethodSetup(
        baseline_methods.apply_depth(model, blocks),
        "depth",
        {"depth_blocks": blocks, "insert_after": baseline_methods.insertion_points(n_layers, blocks)},
    )


PREPARERS: dict[str, Callable[[nn.Module, TrainConfig], MethodSetup]] = {
    "scale-preserve": _prepare_scale,
    "scale-adapt": _prepare_scale,
    "scale-route": _prepare_scale,
    "full": _prepare_full,
    "freeze": _prepare_freeze,
    "lora": _prepare_lora,
    "depth": _prepare_depth,
}


def prepare_method(model: nn.Module, cfg: TrainConfig) -> MethodSetup:
    """Apply ``cfg.method`` to ``model`` (in place; LoRA wraps it) and report what trains."""
    check_supported(model, cfg.method)
    setup = PREPARERS[cfg.method](model, cfg)
    trainable, total = count_parameters(setup.model)
    if trainable == 0:
        raise RuntimeError(f"method {cfg.method!r} left no trainable parameter")
    setup.details.update(trainable_params=trainable, total_params=total)
    return setup


def param_groups(setup: MethodSetup, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups ``{"name", "params", "lr"}`` (empty groups dropped).

    SCALE: ``expansion`` (W21, W22, biases, E_up, norm weights) at ``lr``; ``w12`` (the W12 blocks of the
    adapt/route layers) at ``lr * w12_lr_scale``; ``head_up`` (the LM head's W_head_up) at
    ``lr * head_lr_scale``. Other methods: one group ``all`` at ``lr``.
    """
    model = unwrap(setup.model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not setup.scale:
        return [{"name": "all", "params": [p for _, p in trainable], "lr": cfg.learning_rate}]
    head_up = getattr(model.get_output_embeddings(), "weight_12", None)
    factors = {"expansion": 1.0, "w12": cfg.w12_lr_scale, "head_up": cfg.head_lr_scale}
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in factors}
    for name, p in trainable:
        key = "head_up" if p is head_up else "w12" if name.endswith("weight_12") else "expansion"
        groups[key].append(p)
    return [
        {"name": key, "params": params, "lr": cfg.learning_rate * factors[key]}
        for key, params in groups.items()
        if params
    ]
