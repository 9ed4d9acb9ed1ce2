"""Persistence of upscaled models: expansion-only checkpoints, full round trips, dense export, reports.

* :func:`save_expansion` / :func:`load_expansion`: only the expansion parameters (``weight_21``,
  ``weight_22``, ``weight_12``, ``bias_up``, ``weight_up``) as ``expansion.safetensors`` plus
  ``expansion_config.json`` (the :class:`~scale_kernels.models.UpscaleConfig` and the base model's class
  and sizes). The base weights are not duplicated: they are loaded from the base model you pass.
* ``model.save_pretrained(d)`` works on an upscaled model as is (the config carries the new sizes and
  ``scale_upscale``); :func:`load_upscaled` reads it back. ``AutoModelForCausalLM.from_pretrained(d)``
  alone cannot rebuild the expansion modules (it would build a plain model of the wider config and
  report size mismatches), hence the dedicated loader.
* :func:`merge_to_dense`: a plain HF model of the wider config with materialised block weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models.core import CONFIG_KEY, UpscaleConfig, family_of, upscale_config_of, upscale_model
from .modules import GroupedRMSNorm, ScaleEmbedding, ScaleLinear, ScaleRMSNorm

EXPANSION_WEIGHTS = "expansion.safetensors"
EXPANSION_CONFIG = "expansion_config.json"
EXPANSION_PARAM_NAMES = ("weight_21", "weight_22", "weight_12", "bias_up", "weight_up")
FORMAT_VERSION = 1


def expansion_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every expansion parameter of an upscaled model (the new parameters only)."""
    upscale_config_of(model)
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] in EXPANSION_PARAM_NAMES
    }


def save_expansion(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``expansion.safetensors`` + ``expansion_config.json`` into ``directory`` (created)."""
    cfg = upscale_config_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in expansion_state_dict(model).items()}
    save_file(tensors, str(directory / EXPANSION_WEIGHTS), metadata={"format": "pt"})
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_type": model.config.model_type,
        "upscale": cfg.to_dict(),
    }
    (directory / EXPANSION_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def _check_base_matches(base_model: nn.Module, meta: dict, cfg: UpscaleConfig) -> None:
    family_of(base_model)
    if type(base_model).__name__ != meta["model_class"]:
        raise ValueError(
            f"base_model is a {type(base_model).__name__}, but the expansion was saved from a "
            f"{meta['model_class']}"
        )
    config = base_model.config
    wrong = {k: (getattr(config, k), v) for k, v in cfg.base_sizes().items() if getattr(config, k) != v}
    if wrong:
        details = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in wrong.items())
        raise ValueError(f"base_model does not match the expansion's base model: {details}")


@torch.no_grad()
def load_expansion(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Upscale ``base_model`` in place as recorded in ``directory`` and load the saved expansion weights.

    ``base_model`` must be the (un-upscaled) base model the expansion was trained on: same class and sizes.
    Returns the upscaled model (the same object).
    """
    directory = Path(directory)
    for name in (EXPANSION_CONFIG, EXPANSION_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; was it written by save_expansion?")
    meta = json.loads((directory / EXPANSION_CONFIG).read_text())
    cfg = UpscaleConfig.from_dict(meta["upscale"])
    _check_base_matches(base_model, meta, cfg)
    model = upscale_model(base_model, **cfg.upscale_kwargs())
    saved = load_file(str(directory / EXPANSION_WEIGHTS))
    expected = expansion_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"expansion checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, param in expected.items():
        if saved[name].shape != param.shape:
            raise ValueError(
                f"{name}: saved shape {tuple(saved[name].shape)} != model shape {tuple(param.shape)}"
            )
        param.copy_(saved[name])
    _restore_config_record(model, cfg)
    return model


def _restore_config_record(model: nn.Module, cfg: UpscaleConfig) -> None:
    """Keep the original init/seed in the config record (the rebuild used zeros before loading weights)."""
    setattr(model.config, CONFIG_KEY, cfg.to_dict())


def _read_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}; save with save_pretrained")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(directory / f)))
    return state


@torch.no_grad()
def load_upscaled(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved with ``upscaled_model.save_pretrained(directory)``.

    Rebuilds the base model from the config (``config.scale_upscale`` holds the base sizes), upscales it
    with the recorded settings and loads every weight. Tied embeddings are re-tied by construction.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(
            f"{directory} holds no upscaled model (config has no {CONFIG_KEY}); use from_pretrained"
        )
    cfg = UpscaleConfig.from_dict(record)
    base_config = copy.deepcopy(config)
    delattr(base_config, CONFIG_KEY)
    for key, value in cfg.base_sizes().items():
        setattr(base_config, key, value)
    model = AutoModelForCausalLM.from_config(base_config, dtype=dtype or config.dtype)
    upscale_model(model, **cfg.upscale_kwargs())
    state = _read_model_weights(directory)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.lm_head.weight is model.model.embed_tokens.weight else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise ValueError(f"{directory}: missing weights {missing}, unexpected {unexpected}")
    _restore_config_record(model, cfg)
    return model


def _dense_linear(module: ScaleLinear, route: float) -> nn.Linear:
    """``nn.Linear`` holding ``[[W, r*W12], [W21, W22]]`` and bias ``[b ; b_up]`` (absent blocks: 0)."""
    w, d_out, d_in = module.weight, module.out_features, module.in_features
    dense = nn.Linear(
        module.total_in, module.total_out, bias=module.bias is not None, device=w.device, dtype=w.dtype
    )
    full = w.new_zeros(module.total_out, module.total_in)
    full[:d_out, :d_in] = w
    if module.weight_12 is not None:
        gate = route if module.routable else 1.0  # the LM head's W_head_up is never routed
        full[:d_out, d_in:] = gate * module.weight_12
    full[d_out:, :d_in] = module.weight_21
    full[d_out:, d_in:] = module.weight_22
    dense.weight.copy_(full)
    if module.bias is not None:
        up = module.bias_up if module.bias_up is not None else module.bias.new_zeros(module.extra_out)
        dense.bias.copy_(torch.cat([module.bias, up]))
    return dense


def _dense_module(module: nn.Module, route: float) -> nn.Module | None:
    """The plain replacement of one expansion module (None if ``module`` is not one)."""
    if isinstance(module, ScaleLinear):
        return _dense_linear(module, route)
    if isinstance(module, ScaleRMSNorm):
        norm = GroupedRMSNorm(module.hidden_size, module.extra, module.variance_epsilon,
                              device=module.weight.device, dtype=module.weight.dtype)
        norm.weight.copy_(torch.cat([module.weight, module.weight_up]))
        return norm
    if isinstance(module, ScaleEmbedding):
        w = torch.cat([module.weight, module.weight_up], dim=1)
        return nn.Embedding.from_pretrained(w.clone(), freeze=False, padding_idx=module.padding_idx)
    return None


@torch.no_grad()
def merge_to_dense(model: nn.Module, *, route: float | None = None) -> nn.Module:
    """Export an upscaled model as a plain HF model of the wider config with the same outputs.

    Every ``ScaleLinear`` becomes an ``nn.Linear`` holding ``[[W, r*W12], [W21, W22]]`` (zeros where W12 is
    absent), the embedding ``[E ; E_up]``, the LM head ``[W_head, W_head_up]`` (always untied: the widened
    head and embedding differ). RMSNorms become :class:`~scale_kernels.modules.GroupedRMSNorm`: a single
    ``weight (d + e,)`` in the HF layout that still normalises ``[:d]`` and ``[d:]`` separately, because a
    joint RMSNorm over the wider stream would change the original stream (a vanilla HF class loading the
    saved dense checkpoint is therefore close to, not equal to, the upscaled model).

    Args:
        route: the fixed W12 gate ``r`` folded into the weights. Preserve: ignored. Adapt: default 1.
            Route: required (0 = preservation path, 1 = adaptation path); a token-dependent route cannot be
            expressed by static weights.

    Returns a new model (the upscaled model is not modified); all its parameters require grad.
    """
    cfg = upscale_config_of(model)
    if route is None:
        if cfg.mode == "route":
            raise ValueError(
                "merge_to_dense: a SCALE-Route model routes each token at run time; static weights need a "
                "fixed route: pass route=0.0 (preservation path) or route=1.0 (adaptation path)"
            )
        route = 1.0
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        replacement = _dense_module(module, float(route))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent_name) if parent_name else dense, child, replacement)
    dense._forward_pre_hooks.clear()
    dense._forward_pre_hooks_with_kwargs.clear()
    for attr in ("_scale_state", "scale_has_route", "scale_upscaled_modules", "_validate_model_kwargs"):
        dense.__dict__.pop(attr, None)
    delattr(dense.config, CONFIG_KEY)
    dense.config.tie_word_embeddings = False
    for p in dense.parameters():
        p.requires_grad_(True)
    return dense


def _count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def trainable_parameter_report(model: nn.Module) -> str:
    """One line like PEFT's: trainable / frozen / total parameter counts (tied weights counted once)."""
    params = list(model.parameters())
    trainable = _count(p for p in params if p.requires_grad)
    total = _count(params)
    pct = 100.0 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,} || frozen params: {total - trainable:,} || all params: {total:,} "
        f"|| trainable%: {pct:.4f}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_parameter_report`."""
    print(trainable_parameter_report(model))
