"""Saving, loading and exporting upscaled models: expansion-only checkpoints, full round trips, dense export.

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

from .models.core import CONFIG_KEY, UpscaleConfig, family_of, remove_upscale_hooks, upscale_config_of, upscale_model
from .modules import EXPANSION_PARAM_NAMES, ExpansionModule
from .parameters import expansion_state_dict

__all__ = [
    "EXPANSION_CONFIG",
    "EXPANSION_PARAM_NAMES",
    "EXPANSION_WEIGHTS",
    "FORMAT_VERSION",
    "load_expansion",
    "load_upscaled",
    "merge_to_dense",
    "save_expansion",
]

EXPANSION_WEIGHTS = "expansion.safetensors"
EXPANSION_CONFIG = "expansion_config.json"
FORMAT_VERSION = 1


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
            f"base_model is a {type(base_model).__name__}, but the expansion was saved from a {meta['model_class']}"
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
        raise ValueError(f"expansion checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    for name, param in expected.items():
        if saved[name].shape != param.shape:
            raise ValueError(f"{name}: saved shape {tuple(saved[name].shape)} != model shape {tuple(param.shape)}")
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
        raise ValueError(f"{directory} holds no upscaled model (config has no {CONFIG_KEY}); use from_pretrained")
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


@torch.no_grad()
def merge_to_dense(model: nn.Module, *, route: float | None = None) -> nn.Module:
    """Export an upscaled model as a plain HF model of the wider config with the same outputs.

    Each expansion module is replaced by its own dense form (:meth:`~scale_kernels.modules.ExpansionModule.to_dense`):
    every ``ScaleLinear`` becomes an ``nn.Linear`` holding ``[[W, r*W12], [W21, W22]]`` (zeros where W12 is absent),
    the embedding ``[E ; E_up]``, the LM head ``[W_head, W_head_up]`` (always untied: the widened head and
    embedding differ). RMSNorms become :class:`~scale_kernels.modules.GroupedRMSNorm`: a single ``weight (d + e,)``
    in the HF layout that still normalises ``[:d]`` and ``[d:]`` separately, because a joint RMSNorm over the wider
    stream would change the original stream (a vanilla HF class loading the saved dense checkpoint is therefore
    close to, not equal to, the upscaled model).

    Args:
        route: the fixed W12 gate ``r`` folded into the weights. Preserve: ignored. Adapt: default 1.
            Route: required (0 = preservation path, 1 = adaptation path); a token-dependent route cannot be
            expressed by static weights.

    Returns a new model (the upscaled model is not modified); all its parameters require grad. The package's
    hooks (route mask, fused loss) are removed; hooks registered on the model or on its other modules are kept
    (those on a replaced expansion module go with it).
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
    remove_upscale_hooks(dense)  # only the package's own hooks: hooks the user registered stay
    for name, module in list(dense.named_modules()):
        if isinstance(module, ExpansionModule):
            parent_name, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent_name), child, module.to_dense(route=float(route)))
    delattr(dense.config, CONFIG_KEY)
    dense.config.tie_word_embeddings = False
    for p in dense.parameters():
        p.requires_grad_(True)
    return dense
