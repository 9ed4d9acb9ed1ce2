"""Shared core for width-upscaling Hugging Face decoder-only causal LMs (Llama / Qwen2 / Mistral layout).

The supported families share one module tree::

    model.model.embed_tokens                      -> ScaleEmbedding        [E ; E_up]
    model.model.layers[i].input_layernorm         -> ScaleRMSNorm          (split statistics)
    model.model.layers[i].self_attn.{q,k,v}_proj  -> ScaleLinear           d+e -> heads*hd + new heads*hd
    model.model.layers[i].self_attn.o_proj        -> ScaleLinear           heads*hd + new -> d+e
    model.model.layers[i].post_attention_layernorm-> ScaleRMSNorm
    model.model.layers[i].mlp.{gate,up}_proj      -> ScaleLinear           d+e -> i+e_ffn
    model.model.layers[i].mlp.down_proj           -> ScaleLinear           i+e_ffn -> d+e
    model.model.norm                              -> ScaleRMSNorm
    model.lm_head                                 -> ScaleLMHead           W h + W_up h_up

Submodules are swapped; no forward is patched. The attention reshapes q/k/v with ``view(..., -1,
head_dim)``, so appended heads come after the original ones; with GQA group ``g`` query head ``i`` reads
KV head ``i // g``, and appending ``g * extra_kv_heads`` query heads after ``extra_kv_heads`` KV heads maps
every new query head onto a new KV head (``(n_q + j) // g = n_kv + j // g``). head_dim, the group size and
RoPE are unchanged; the config is updated so the model reports its new sizes.

The supported families (:data:`FAMILIES`) and what differs between them:

* Llama (``LlamaForCausalLM``), the reference layout: q/k/v/o and MLP projections carry a bias only when
  ``config.attention_bias`` / ``config.mlp_bias`` is set (:class:`~scale_kernels.ScaleLinear` keeps whatever bias
  the layer has, frozen, and adds ``bias_up``). ``LlamaAttention`` reads ``head_dim`` and
  ``num_key_value_groups`` at init; the group size is unchanged by construction. Rotary inverse frequencies depend
  on ``head_dim`` only. ``tie_word_embeddings=True`` (Llama-3.2-1B) ties ``lm_head.weight`` to the embedding: the
  frozen part stays shared, the head's ``W_head_up`` is its own zero-initialised parameter.
* Qwen2 (``Qwen2ForCausalLM``): q/k/v always have a bias, o_proj and the MLP none (the new q/k/v heads get a
  trainable zero-initialised ``bias_up``). ``Qwen2Config`` has no ``head_dim`` field (the attention falls back to
  ``hidden_size // num_attention_heads``), so upscaling writes ``head_dim`` into the config: ``(hidden +
  extra_hidden) / (heads + extra_heads)`` is in general not the pretrained head_dim. Sliding-window layers only
  change the attention mask.
* Mistral (``MistralForCausalLM``): no biases; ``MistralConfig.head_dim`` is a real field (it may differ from
  ``hidden_size // num_attention_heads``) and is kept. ``sliding_window`` only changes the attention mask; KV-cache
  layers are sized from the tensors they receive, so extra KV heads need no cache changes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, fields

import torch
from torch import nn

from ..modules import (
    DEFAULT_INIT_STD,
    INITS,
    MODES,
    RouteState,
    ScaleEmbedding,
    ScaleLinear,
    ScaleLMHead,
    ScaleRMSNorm,
    check_choice,
    check_size,
)
from ..route import install_route_hook, uninstall_route_hook
from .fused_loss import install_fused_loss, uninstall_fused_loss

logger = logging.getLogger("scale_kernels")

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULE_ALIASES = {
    "attention": ATTENTION,
    "attn": ATTENTION,
    "self_attn": ATTENTION,
    "mlp": MLP,
    "ffn": MLP,
    "all": ATTENTION + MLP,
}
CONFIG_KEY = "scale_upscale"
UPSCALED_MODULES_ATTR = "scale_upscaled_modules"  # set on an upscaled model: how many modules were swapped


@dataclass(frozen=True)
class FamilySpec:
    """A supported HF family: the ``*ForCausalLM`` class name and ``config.model_type``."""

    model_class: str
    model_type: str

    @property
    def modeling_module(self) -> str:
        """The transformers module defining the family (``transformers.models.llama.modeling_llama``)."""
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(model_class="LlamaForCausalLM", model_type="llama"),
    FamilySpec(model_class="Qwen2ForCausalLM", model_type="qwen2"),
    FamilySpec(model_class="MistralForCausalLM", model_type="mistral"),
)


@dataclass(frozen=True)
class UpscaleConfig:
    """All that rebuilds an upscaled model from its base model (stored in ``config.scale_upscale``)."""

    extra_hidden: int
    extra_heads: int
    extra_kv_heads: int
    extra_intermediate: int
    mode: str
    adapt_layers: tuple[int, ...]
    adapt_modules: tuple[str, ...]
    init: str
    seed: int | None
    head_dim: int
    base_hidden_size: int
    base_num_attention_heads: int
    base_num_key_value_heads: int
    base_intermediate_size: int
    gate_head: bool = False  # the route mask also gates the LM head's W_head_up

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapt_layers"], d["adapt_modules"] = list(self.adapt_layers), list(self.adapt_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UpscaleConfig:
        names = {f.name for f in fields(cls)}
        # a field with a default (gate_head) may be absent: records written before it existed
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"upscale config is missing {sorted(missing)}; was it written by scale_kernels?")
        kw = {k: d[k] for k in names if k in d}
        kw["adapt_layers"], kw["adapt_modules"] = tuple(d["adapt_layers"]), tuple(d["adapt_modules"])
        return cls(**kw)

    def upscale_kwargs(self) -> dict:
        """Arguments of :func:`upscale_model` that rebuild this expansion (weights zero-initialised)."""
        adapt = self.mode != "preserve"
        return {
            "extra_hidden": self.extra_hidden,
            "extra_heads": self.extra_heads,
            "extra_kv_heads": self.extra_kv_heads,
            "extra_intermediate": self.extra_intermediate,
            "mode": self.mode,
            "adapt_layers": list(self.adapt_layers) if adapt else None,
            "adapt_modules": list(self.adapt_modules) if adapt else None,
            "init": "zeros",
            "gate_head": self.gate_head,
        }

    def base_sizes(self) -> dict[str, int]:
        """The HF config fields of the base model (before upscaling)."""
        return {
            "hidden_size": self.base_hidden_size,
            "num_attention_heads": self.base_num_attention_heads,
            "num_key_value_heads": self.base_num_key_value_heads,
            "intermediate_size": self.base_intermediate_size,
        }


def family_of(model: nn.Module) -> FamilySpec:
    """The family spec of ``model``; ValueError naming the supported classes otherwise."""
    supported = {spec.model_class: spec for spec in FAMILIES}
    name = type(model).__name__
    if name not in supported:
        raise ValueError(f"upscale_model: unsupported architecture {name}; supported: {', '.join(sorted(supported))}")
    return supported[name]


def _resolve_heads(config, extra_heads: int | None, extra_kv_heads: int | None) -> tuple[int, int]:
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_q // n_kv
    if extra_heads is None and extra_kv_heads is None:
        return 0, 0
    if extra_kv_heads is not None:
        check_size("extra_kv_heads", extra_kv_heads)
    if extra_heads is None:
        return group * extra_kv_heads, extra_kv_heads
    check_size("extra_heads", extra_heads)
    if extra_heads % group != 0:
        raise ValueError(
            f"extra_heads={extra_heads} must be a multiple of the GQA group size {group} "
            f"(num_attention_heads={n_q} / num_key_value_heads={n_kv}), so every new query head reads a new "
            f"KV head"
        )
    if extra_kv_heads is not None and extra_heads != group * extra_kv_heads:
        raise ValueError(
            f"extra_heads={extra_heads} and extra_kv_heads={extra_kv_heads} are inconsistent: with GQA group "
            f"size {group} extra_heads must be {group} * extra_kv_heads = {group * extra_kv_heads}"
        )
    return extra_heads, extra_heads // group


def _resolve_layers(adapt_layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    if adapt_layers is None:
        return tuple(range(n_layers))
    if isinstance(adapt_layers, int):
        adapt_layers = [adapt_layers]
    out = set()
    for i in adapt_layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(f"adapt_layers entries must be ints in [-{n_layers}, {n_layers}), got {i!r}")
        out.add(i % n_layers)
    return tuple(sorted(out))


def _resolve_modules(adapt_modules: Iterable[str] | str | None) -> tuple[str, ...]:
    if adapt_modules is None:
        return ATTENTION + MLP
    if isinstance(adapt_modules, str):
        adapt_modules = [adapt_modules]
    out: list[str] = []
    for name in adapt_modules:
        names = MODULE_ALIASES.get(name, (name,))
        for n in names:
            if n not in ATTENTION + MLP:
                raise ValueError(
                    f"adapt_modules entry {name!r} unknown; use {sorted(MODULE_ALIASES)} or projection names "
                    f"{ATTENTION + MLP}"
                )
            if n not in out:
                out.append(n)
    return tuple(n for n in ATTENTION + MLP if n in out)


def resolve_upscale_config(
    model: nn.Module,
    extra_hidden: int,
    extra_heads: int | None,
    extra_kv_heads: int | None,
    extra_intermediate: int,
    mode: str,
    adapt_layers,
    adapt_modules,
    init: str,
    seed: int | None,
    gate_head: bool = False,
) -> UpscaleConfig:
    """Validate the :func:`upscale_model` arguments against ``model`` and resolve defaults."""
    family_of(model)
    config = model.config
    if getattr(config, CONFIG_KEY, None):
        raise ValueError("model is already upscaled (config.scale_upscale is set); upscale the base model")
    check_size("extra_hidden", extra_hidden)
    check_size("extra_intermediate", extra_intermediate)
    check_choice("mode", mode, MODES)
    check_choice("init", init, INITS)
    if seed is not None:
        check_size("seed", seed)
    if not isinstance(gate_head, bool):
        raise TypeError(f"gate_head must be a bool, got {type(gate_head).__name__} ({gate_head!r})")
    if gate_head and extra_hidden == 0:
        raise ValueError("gate_head=True gates the LM head's W_head_up, which needs extra_hidden > 0")
    extra_heads, extra_kv_heads = _resolve_heads(config, extra_heads, extra_kv_heads)
    if extra_hidden == extra_heads == extra_intermediate == 0:
        raise ValueError("nothing to upscale: extra_hidden, extra_heads and extra_intermediate are all 0")
    n_layers = len(model.model.layers)
    if mode == "preserve":
        if adapt_layers is not None or adapt_modules is not None:
            raise ValueError(
                "adapt_layers / adapt_modules choose where W12 trains, but mode='preserve' has no W12; "
                "use mode='adapt' or mode='route'"
            )
        layers, modules = (), ()
    else:
        layers, modules = _resolve_layers(adapt_layers, n_layers), _resolve_modules(adapt_modules)
        if not layers or not modules:
            raise ValueError("adapt_layers / adapt_modules select nothing; use mode='preserve' for that")
    return UpscaleConfig(
        extra_hidden=extra_hidden,
        extra_heads=extra_heads,
        extra_kv_heads=extra_kv_heads,
        extra_intermediate=extra_intermediate,
        mode=mode,
        adapt_layers=layers,
        adapt_modules=modules,
        init=init,
        seed=seed,
        head_dim=int(model.model.layers[0].self_attn.head_dim),
        base_hidden_size=config.hidden_size,
        base_num_attention_heads=config.num_attention_heads,
        base_num_key_value_heads=config.num_key_value_heads,
        base_intermediate_size=config.intermediate_size,
        gate_head=gate_head,
    )


def _extra_widths(cfg: UpscaleConfig) -> dict[str, tuple[int, int]]:
    """``(extra_in, extra_out)`` per projection."""
    e, hd = cfg.extra_hidden, cfg.head_dim
    eq, ekv, ei = cfg.extra_heads * hd, cfg.extra_kv_heads * hd, cfg.extra_intermediate
    return {
        "q_proj": (e, eq),
        "k_proj": (e, ekv),
        "v_proj": (e, ekv),
        "o_proj": (eq, e),
        "gate_proj": (e, ei),
        "up_proj": (e, ei),
        "down_proj": (ei, e),
    }


class _Builder:
    """Swaps the modules of one model according to an :class:`UpscaleConfig`."""

    def __init__(self, model: nn.Module, cfg: UpscaleConfig, state: RouteState) -> None:
        self.model, self.cfg, self.state = model, cfg, state
        self.std = float(getattr(model.config, "initializer_range", DEFAULT_INIT_STD))
        self.generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        self.widths = _extra_widths(cfg)
        self.count = 0

    def linear(self, parent: nn.Module, name: str, mode: str) -> None:
        extra_in, extra_out = self.widths[name]
        if extra_in == extra_out == 0:
            return
        new = ScaleLinear.from_linear(
            getattr(parent, name),
            extra_in,
            extra_out,
            mode=mode,
            init=self.cfg.init,
            std=self.std,
            generator=self.generator,
        )
        new.route_state = self.state
        setattr(parent, name, new)
        self.count += 1

    def layer(self, index: int, layer: nn.Module) -> None:
        cfg = self.cfg
        adapt = index in cfg.adapt_layers
        for parent, names in ((layer.self_attn, ATTENTION), (layer.mlp, MLP)):
            for name in names:
                mode = cfg.mode if adapt and name in cfg.adapt_modules else "preserve"
                self.linear(parent, name, mode)
        if cfg.extra_hidden:
            for name in ("input_layernorm", "post_attention_layernorm"):
                setattr(layer, name, ScaleRMSNorm.from_norm(getattr(layer, name), cfg.extra_hidden))

    def ends(self) -> None:
        """Embedding, final norm and LM head (only when the hidden stream is widened)."""
        e, inner, model = self.cfg.extra_hidden, self.model.model, self.model
        if not e:
            return
        inner.embed_tokens = ScaleEmbedding.from_embedding(
            inner.embed_tokens, e, self.cfg.init, std=self.std, generator=self.generator
        )
        inner.norm = ScaleRMSNorm.from_norm(inner.norm, e)
        # reuses a tied weight: stays tied
        model.lm_head = ScaleLMHead.from_head(model.lm_head, e, gated=self.cfg.gate_head)
        model.lm_head.route_state = self.state
        self.count += 1


def _own_config(model: nn.Module):
    """Give ``model`` a private copy of its config (HF modules share one object, often the caller's)."""
    shared = model.config
    config = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = config
    return config


def _update_config(model: nn.Module, cfg: UpscaleConfig) -> None:
    """Record the new sizes in a private copy of the config (the caller's config object is not mutated)."""
    config = _own_config(model)
    config.hidden_size = cfg.base_hidden_size + cfg.extra_hidden
    config.num_attention_heads = cfg.base_num_attention_heads + cfg.extra_heads
    config.num_key_value_heads = cfg.base_num_key_value_heads + cfg.extra_kv_heads
    config.intermediate_size = cfg.base_intermediate_size + cfg.extra_intermediate
    config.head_dim = cfg.head_dim
    setattr(config, CONFIG_KEY, cfg.to_dict())
    for layer in model.model.layers:  # informational copies some HF modules keep
        layer.hidden_size = config.hidden_size
        layer.mlp.hidden_size, layer.mlp.intermediate_size = config.hidden_size, config.intermediate_size


def upscale_model(
    model: nn.Module,
    extra_hidden: int,
    *,
    extra_heads: int | None = None,
    extra_kv_heads: int | None = None,
    extra_intermediate: int = 0,
    mode: str = "preserve",
    adapt_layers: Iterable[int] | None = None,
    adapt_modules: Iterable[str] | str | None = None,
    init: str = "random",
    seed: int | None = None,
    fused_loss: bool = True,
    gate_head: bool = False,
) -> nn.Module:
    """Width-upscale a HF causal LM in place (SCALE) and return it.

    Args:
        model: a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``MistralForCausalLM``.
        extra_hidden: ``e``: hidden width ``d -> d + e`` (embedding, residual stream, norms, LM head input).
        extra_heads / extra_kv_heads: new query / KV heads (head_dim unchanged). Give either; the other is
            derived from the GQA group size ``g = heads / kv_heads`` (``extra_heads = g * extra_kv_heads``);
            both must agree. Neither: no new heads.
        extra_intermediate: FFN width ``i -> i + extra_intermediate``.
        mode: ``"preserve"`` (no W12 anywhere), ``"adapt"`` (W12 zero-init and trainable) or ``"route"``
            (adapt + per-token route mask ``model(..., scale_route=mask)``).
        adapt_layers: layer indices (negative allowed) whose projections get a trainable W12; default all.
        adapt_modules: ``"attention"``, ``"mlp"``, ``"all"`` or projection names (``"q_proj"``, ...);
            default all.
        init: ``W21``/``W22``/``E_up`` initialisation: ``"random"`` (N(0, initializer_range^2)), ``"svd"``
            (principal directions of the frozen weights) or ``"zeros"``. W12 and ``W_head_up`` are always 0.
        seed: seed for the random/svd initialisation (None: the global torch RNG).
        fused_loss: in training mode, ``model(ids, labels=...)`` computes its loss with the fused LM head +
            cross-entropy (logits never materialised; the output's ``logits`` is None). Per-model switch:
            ``model.scale_fused_loss``. See :mod:`scale_kernels.models.fused_loss`. Needs ``extra_hidden > 0``
            (the head is a ``ScaleLMHead``); otherwise the model's own loss runs.
        gate_head: the model-level route mask (``model(..., scale_route=mask)``) also gates the LM head's
            ``W_head_up``, so route 0 is exactly the base model, the head included (default: the head
            expansion is never gated). Makes a Preserve model routable too (its only routed term is the head).

    Every original parameter ends with ``requires_grad=False``; only expansion parameters train. A fresh
    model of any mode reproduces the base model's logits exactly (up to fp rounding).
    """
    if not isinstance(fused_loss, bool):
        raise TypeError(f"fused_loss must be a bool, got {fused_loss!r}")
    cfg = resolve_upscale_config(
        model,
        extra_hidden,
        extra_heads,
        extra_kv_heads,
        extra_intermediate,
        mode,
        adapt_layers,
        adapt_modules,
        init,
        seed,
        gate_head,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    state = RouteState()
    builder = _Builder(model, cfg, state)
    for i, layer in enumerate(model.model.layers):
        builder.layer(i, layer)
    builder.ends()
    if builder.count == 0:  # cannot happen after validation; never let a no-op pass silently
        raise RuntimeError("upscale_model: no module was upscaled")
    _update_config(model, cfg)
    setattr(model, UPSCALED_MODULES_ATTR, builder.count)
    install_route_hook(model, state, has_route=cfg.mode != "preserve" or cfg.gate_head)
    install_fused_loss(model, fused_loss)
    logger.info(
        "upscale_model: %d modules upscaled in %s (mode=%s, +%d hidden, +%d heads, +%d kv heads, +%d ffn)",
        builder.count,
        type(model).__name__,
        cfg.mode,
        cfg.extra_hidden,
        cfg.extra_heads,
        cfg.extra_kv_heads,
        cfg.extra_intermediate,
    )
    return model


def upscale_config_of(model: nn.Module) -> UpscaleConfig:
    """The :class:`UpscaleConfig` of an upscaled model (ValueError if ``model`` is not upscaled)."""
    d = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not d:
        raise ValueError(f"{type(model).__name__} is not an upscaled model (no config.{CONFIG_KEY})")
    return UpscaleConfig.from_dict(d)


def remove_upscale_hooks(model: nn.Module) -> None:
    """Remove what :func:`upscale_model` attached to ``model`` itself: the route and fused-loss hooks and the
    attributes they and this module set (hooks others registered stay). The expansion modules and the config
    record are left as they are (:func:`scale_kernels.merge_to_dense` replaces them)."""
    uninstall_route_hook(model)
    uninstall_fused_loss(model)
    model.__dict__.pop(UPSCALED_MODULES_ATTR, None)
