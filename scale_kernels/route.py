"""Token-level routing for SCALE-Route, and the "original stream only" switch.

Primary way to pass a route mask: a keyword of the upscaled model's forward (and of ``generate``)::

    out = model(input_ids, scale_route=mask)          # mask (batch, seq): True/1 = adaptation path
    ids = model.generate(input_ids, scale_route=True)  # a constant route for every token

``mask`` may be a Python bool/float, a 0-D tensor, a ``(batch,)`` tensor (one route per sequence) or a
``(batch, seq)`` bool mask / float gate. During cached decoding the model sees only the new tokens: a
``(batch, L)`` mask with ``L`` larger than the current input is sliced at the cache position, so one
mask covering prompt + generated tokens works with ``generate``. The mask gates the W12 term of every
layer that has one; the LM head's ``W_head_up`` only when the model was upscaled with
``gate_head=True`` (then route 0 everywhere is exactly the base model, head included). It stays attached
to the model until its next forward, so gradient-checkpointing recomputation in ``backward`` sees the
same mask.

:class:`RoutePolicy` implements the paper's fixed rule: a token takes the preservation path (route 0)
when the cosine similarity of its preserve-path and adapt-path next-token distributions is ``>= tau``
(0.5 in the paper), and the adaptation path (route 1) otherwise (``inverted=True``: the opposite, an
ablation). It yields a mask for the model forward (:meth:`RoutePolicy.compute_route`) or picks, per
token, the output of one of the two paths (:meth:`RoutePolicy.select`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .modules import RouteState, check_size

Tensor = torch.Tensor
ROUTE_KWARG = "scale_route"
# attributes route.py sets on an upscaled model (removed by uninstall_route_hook)
_STATE_ATTR, _HAS_ROUTE_ATTR, _HOOK_ATTR = "_scale_state", "scale_has_route", "_scale_route_hook"
_GENERATION_HOOK = "prepare_inputs_for_generation"


def route_state_of(model: nn.Module) -> RouteState:
    """The :class:`RouteState` of a model returned by :func:`scale_kernels.upscale_model`."""
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, RouteState):
        raise ValueError(
            f"model ({type(model).__name__}) is not an upscaled model: call scale_kernels.upscale_model first"
        )
    return state


def _input_batch_seq(args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError(f"{ROUTE_KWARG} needs input_ids or inputs_embeds to know the (batch, seq) shape")
    return ids.shape[0], ids.shape[1], ids.device


def _past_length(kwargs: dict) -> int:
    past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers renamed the KV cache kwarg in 5.x
    if past is None or not hasattr(past, "get_seq_length"):
        return 0
    return int(past.get_seq_length())


def prepare_route_mask(mask: object, batch: int, seq: int, past: int, device: torch.device) -> Tensor:
    """Normalise a ``scale_route`` value to a ``(batch, seq)`` bool/float tensor on ``device``."""
    if isinstance(mask, (bool, int, float)):
        if not math.isfinite(mask):
            raise ValueError(f"{ROUTE_KWARG} must be finite, got {mask!r}")
        mask = torch.tensor(mask, dtype=torch.bool if isinstance(mask, bool) else torch.float32)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{ROUTE_KWARG} must be a bool, a float or a tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"{ROUTE_KWARG} must be a bool mask or a float gate, got dtype {mask.dtype}")
    expected = f"(), ({batch},) or ({batch}, seq >= {seq})"
    if mask.dim() == 0:
        mask = mask.expand(batch, seq)
    elif mask.dim() == 1 and mask.shape[0] == batch:
        mask = mask[:, None].expand(batch, seq)
    elif mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] != seq:
        if mask.shape[1] < past + seq:
            raise ValueError(
                f"{ROUTE_KWARG} has {mask.shape[1]} positions but the input covers positions "
                f"{past}..{past + seq - 1} (cache length {past}); expected shape {expected}"
            )
        mask = mask[:, past : past + seq]
    elif mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"{ROUTE_KWARG} must have shape {expected}, got {tuple(mask.shape)}")
    return mask.to(device)


def _route_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an upscaled model: consume ``scale_route`` and set the model's route state.

    The state is looked up on ``module`` at call time (not captured), so ``copy.deepcopy`` of a model works.
    """
    state = route_state_of(module)
    mask = kwargs.pop(ROUTE_KWARG, None)
    if mask is None:
        state.mask = None
        return args, kwargs
    if not getattr(module, _HAS_ROUTE_ATTR, False):
        raise ValueError(
            f"{ROUTE_KWARG} was given but this upscaled model has nothing to route (mode='preserve' without "
            "gate_head); upscale with mode='route' or 'adapt', or with gate_head=True"
        )
    batch, seq, device = _input_batch_seq(args, kwargs)
    state.mask = prepare_route_mask(mask, batch, seq, _past_length(kwargs), device)
    return args, kwargs


class _PrepareInputsWithRoute:
    """``prepare_inputs_for_generation`` of an upscaled model: the class method, plus a ``scale_route`` argument.

    ``generate`` keeps the kwargs it does not know as model kwargs, hands them to ``prepare_inputs_for_generation``
    at every step and what that returns to ``forward`` (where the pre-hook consumes ``scale_route``). It accepts a
    model kwarg only if ``prepare_inputs_for_generation``'s signature names it (or, when that takes ``**kwargs``,
    ``forward``'s does), so this callable's ``__signature__`` is the class method's plus a keyword-only
    ``scale_route``. Every other argument goes to the class method unchanged. Stored on the model instance; it
    holds the model (not a closure), so ``copy.deepcopy`` and pickling carry it over to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _class_method(self) -> Callable:
        return getattr(type(self.model), _GENERATION_HOOK)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self._class_method())
        params = list(signature.parameters.values())[1:]  # without self
        var_keyword = [params.pop()] if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else []
        route = inspect.Parameter(ROUTE_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
        return signature.replace(parameters=[*params, route, *var_keyword])

    def __call__(self, *args, **kwargs) -> dict:
        mask = kwargs.pop(ROUTE_KWARG, None)
        inputs = self._class_method()(self.model, *args, **kwargs)
        if mask is not None:
            inputs[ROUTE_KWARG] = mask
        return inputs


def install_route_hook(model: nn.Module, state: RouteState, *, has_route: bool) -> None:
    """Attach ``state`` to ``model`` and let ``model(..., scale_route=mask)`` / ``generate`` set its mask.

    ``has_route``: whether the model has anything to route (else ``scale_route`` is an error). Installs a forward
    pre-hook (its handle is kept, so :func:`uninstall_route_hook` removes exactly it) and, for HF generation
    models, a per-instance ``prepare_inputs_for_generation`` that declares ``scale_route`` (see
    :class:`_PrepareInputsWithRoute`).
    """
    setattr(model, _STATE_ATTR, state)
    setattr(model, _HAS_ROUTE_ATTR, has_route)
    setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(_route_pre_hook, with_kwargs=True))
    if hasattr(type(model), _GENERATION_HOOK):
        setattr(model, _GENERATION_HOOK, _PrepareInputsWithRoute(model))


def uninstall_route_hook(model: nn.Module) -> None:
    """Undo :func:`install_route_hook`: remove its pre-hook, its ``prepare_inputs_for_generation`` and its
    attributes. Hooks that others registered on ``model`` are left alone."""
    handle = model.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    for attr in (_GENERATION_HOOK, _STATE_ATTR, _HAS_ROUTE_ATTR):
        model.__dict__.pop(attr, None)


@contextlib.contextmanager
def original_stream(model: nn.Module) -> Iterator[None]:
    """Inside the block the upscaled model computes exactly its pretrained base model.

    Every W12 term is skipped (route 0 everywhere) and the LM head ignores ``h_up``; with W, b, norms and
    embeddings frozen, the logits then equal the base model's, whatever the expansion has learned.
    """
    state = route_state_of(model)
    previous = state.original_only
    state.original_only = True
    try:
        yield
    finally:
        state.original_only = previous


def _cache_name(model: nn.Module) -> str:
    """The KV cache's name as ``model.forward``'s argument and output field: ``cache`` in recent transformers 5.x
    releases, ``past_key_values`` in earlier ones (kept there as a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=-1)


@dataclass
class RoutePolicy:
    """The SCALE-Route rule: route 1 (adaptation path) where the preserve-path and adapt-path next-token
    distributions differ, i.e. ``cos(p_preserve, p_adapt) < tau``; route 0 (preservation) otherwise.

    ``inverted=True`` swaps the two outcomes (an ablation: adaptation where the paths agree).
    Masks returned are bool ``(batch, seq)`` with True = adaptation path (what ``scale_route`` expects).
    """

    tau: float = 0.5
    inverted: bool = False

    def __post_init__(self) -> None:
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite float (cosine threshold in [-1, 1]), got {tau!r}")
        if not isinstance(self.inverted, bool):
            raise TypeError(f"inverted must be a bool, got {type(self.inverted).__name__}")

    @staticmethod
    def similarity(logits_preserve: Tensor, logits_adapt: Tensor) -> Tensor:
        """Cosine similarity of the two softmax distributions: ``(..., vocab) x2 -> (...)`` (fp32)."""
        if logits_preserve.shape != logits_adapt.shape:
            raise ValueError(
                f"logits_preserve and logits_adapt must have the same shape (..., vocab), got "
                f"{tuple(logits_preserve.shape)} and {tuple(logits_adapt.shape)}"
            )
        return torch.nn.functional.cosine_similarity(_probs(logits_preserve), _probs(logits_adapt), dim=-1)

    def route_from_logits(self, logits_preserve: Tensor, logits_adapt: Tensor) -> Tensor:
        """``(..., vocab) x2 -> (...)`` bool: True where the token takes the adaptation path."""
        agree = self.similarity(logits_preserve, logits_adapt) >= self.tau
        return agree if self.inverted else ~agree

    def select(self, logits_preserve: Tensor, logits_adapt: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token choice between the outputs of the two paths: ``(..., vocab) x2 -> (logits, route)``.

        ``logits[..., t, :]`` is the adapt-path row where ``route`` (``(...)`` bool, computed without
        gradient) is True, else the preserve-path row. Gradients flow into the chosen rows only.
        """
        with torch.no_grad():
            route = self.route_from_logits(logits_preserve, logits_adapt)
        return torch.where(route[..., None], logits_adapt, logits_preserve), route

    @torch.no_grad()
    def compute_route(self, model: nn.Module, input_ids: Tensor, **forward_kwargs) -> Tensor:
        """Run ``model`` on the preservation path (route 0) and the adaptation path (route 1) and return the
        ``(batch, seq)`` bool route mask (no gradient). Extra kwargs (``attention_mask``...) are passed on."""
        route_state_of(model)
        forward_kwargs = {**forward_kwargs, "use_cache": False}
        preserve = model(input_ids, scale_route=False, **forward_kwargs).logits
        adapt = model(input_ids, scale_route=True, **forward_kwargs).logits
        return self.route_from_logits(preserve, adapt)

    __call__ = compute_route

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Greedy decoding where every token is routed by the policy, with a KV cache.

        The prompt's route comes from :meth:`compute_route`; each new token is fed twice (route 0 and
        route 1, on copies of the cache), and the cache and next-token logits of the chosen path are kept.
        Sequences are decoded one at a time (no padding needed; prompts in one batch share their length).

        Returns ``(sequences (batch, prompt + n), route (batch, prompt + n - 1))``: the route used for every
        fed token (the last generated token is never fed). Positions after an early ``eos`` are
        ``pad_token_id`` / False.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        check_size("max_new_tokens", max_new_tokens, minimum=1)
        total = input_ids.shape[1] + max_new_tokens
        seqs = input_ids.new_full((input_ids.shape[0], total), pad_token_id)
        routes = torch.zeros(input_ids.shape[0], total - 1, dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            seq, route = self._generate_one(model, input_ids[b : b + 1], max_new_tokens, eos_token_id)
            seqs[b, : seq.numel()] = seq
            routes[b, : route.numel()] = route
        return seqs, routes

    def _generate_one(
        self, model: nn.Module, prompt: Tensor, max_new_tokens: int, eos_token_id: int | None
    ) -> tuple[Tensor, Tensor]:
        key = _cache_name(model)
        route = self.compute_route(model, prompt)[0]
        out = model(prompt, scale_route=route[None], use_cache=True)
        cache, logits = out[key], out.logits[:, -1]
        tokens, routes = [prompt[0]], [route]
        for step in range(max_new_tokens):
            tok = logits.argmax(-1, keepdim=True)  # (1, 1)
            tokens.append(tok[0])
            if step == max_new_tokens - 1 or (eos_token_id is not None and tok.item() == eos_token_id):
                break
            cache_adapt = copy.deepcopy(cache)
            out0 = model(tok, scale_route=False, use_cache=True, **{key: cache})
            out1 = model(tok, scale_route=True, use_cache=True, **{key: cache_adapt})
            adapt = self.route_from_logits(out0.logits[:, -1], out1.logits[:, -1])
            routes.append(adapt)
            chosen = out1 if adapt.item() else out0
            cache, logits = chosen[key], chosen.logits[:, -1]
        return torch.cat(tokens), torch.cat(routes)
