"""Width-upscaled building blocks (SCALE): :class:`ScaleLinear`, split RMSNorm, expanded embedding, LM head.

Every module keeps the pretrained tensor under its original name (``weight`` / ``bias``, frozen,
``requires_grad=False``) so Hugging Face state dicts still load, and adds the expansion blocks as separate
trainable parameters:

=====================  ==========================================  =========================================
module                 frozen (original)                           trainable (expansion)
=====================  ==========================================  =========================================
``ScaleLinear``        ``weight (d_out, d_in)``, ``bias (d_out,)``   ``weight_21 (e_out, d_in)``,
                                                                   ``weight_22 (e_out, e_in)``,
                                                                   ``weight_12 (d_out, e_in)`` (Adapt/Route),
                                                                   ``bias_up (e_out,)`` (if ``bias``)
``ScaleRMSNorm``       ``weight (d,)``                             ``weight_up (e,)``
``ScaleEmbedding``     ``weight (vocab, d)``                       ``weight_up (vocab, e)``
``ScaleLMHead``        ``weight (vocab, d)`` (may be tied)         ``weight_12 (vocab, e)`` (= W_head_up)
=====================  ==========================================  =========================================

Each of them is an :class:`ExpansionModule`: it names its own expansion parameters
(:attr:`~ExpansionModule.expansion_parameter_names`; :data:`EXPANSION_PARAM_NAMES` is their union) and turns itself
into its plain dense equivalent (:meth:`~ExpansionModule.to_dense`, used by :func:`scale_kernels.merge_to_dense`).

Modules that belong to an upscaled model share one :class:`RouteState` (set by
:func:`scale_kernels.upscale_model`); it carries the per-token route mask of the current forward and the
"original stream only" switch used by :func:`scale_kernels.original_stream`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .functional import upscaled_linear
from .ops import split_rms_norm as _split_norm
from .ops.fused_head_cross_entropy import fused_head_cross_entropy
from .ops.selection import triton_or_torch

Tensor = torch.Tensor

MODES = ("preserve", "adapt", "route")
INITS = ("zeros", "random", "svd")
DEFAULT_INIT_STD = 0.02


@dataclass
class RouteState:
    """Per-model state shared by all expansion modules of one upscaled model.

    Attributes:
        mask: ``(batch, seq)`` bool mask / float gate for the W12 terms of the current forward, or None
            (= route 1 everywhere, the adaptation path).
        original_only: when True every W12 term and the LM head's expansion term are skipped, so the model
            computes exactly the pretrained base model.
    """

    mask: Tensor | None = None
    original_only: bool = False


def check_size(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; ValueError naming ``name`` and the choices otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """N(0, std^2) drawn on the CPU (so a seeded generator gives the same values on every device)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def svd_expansion_rows(weight: Tensor, rows: int, std: float, generator: torch.Generator | None) -> Tensor:
    """``(rows, d_in)``: ``U_k^T W`` for the top ``k = min(rows, rank)`` left singular vectors of ``W``.

    Row j is the projection of W's output onto its j-th principal output direction (``s_j v_j^T``), so an
    expansion neuron starts as a copy of one of the most informative features of the original layer.
    Rows beyond ``min(d_out, d_in)`` are N(0, std^2).
    """
    _, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # on weight's device
    out = _normal((rows, weight.shape[1]), std, generator)
    k = min(rows, s.numel())
    out[:k] = (s[:k, None] * vh[:k]).cpu()
    return out


class ExpansionModule(nn.Module):
    """Base of the width-upscaled modules: frozen original tensors plus trainable expansion blocks.

    A subclass lists its expansion parameters in :attr:`expansion_parameter_names` (those it registers as None,
    e.g. ``weight_12`` in Preserve mode, are skipped) and implements :meth:`to_dense`.
    """

    expansion_parameter_names: ClassVar[tuple[str, ...]] = ()

    def expansion_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of this module's own expansion parameters (zero-size blocks included)."""
        for name in self.expansion_parameter_names:
            param = getattr(self, name)
            if param is not None:
                yield name, param

    def to_dense(self, *, route: float = 1.0) -> nn.Module:
        """A new plain module (its own tensors) computing the same function on the widened input.

        ``route`` is the fixed W12 gate folded into the weights; modules without a routed term ignore it.
        """
        raise NotImplementedError


class ScaleLinear(ExpansionModule):
    """``[y ; y_up] = [[W, r*W12], [W21, W22]] [x ; x_up] + [b ; b_up]`` via the fused ``upscaled_linear``.

    Args:
        in_features, out_features: original widths ``d_in``, ``d_out`` (of the frozen ``weight``).
        extra_in, extra_out: expansion widths ``e_in``, ``e_out`` (either may be 0).
        bias: whether the original layer has a (frozen) bias; the expansion then gets a trainable ``bias_up``.
        mode: ``"preserve"`` (no W12: the original outputs never see the expansion), ``"adapt"`` (W12
            zero-initialised and trainable) or ``"route"`` (as adapt, W12 gated per token by the route mask).
        init: initialisation of ``weight_21`` / ``weight_22`` (see :meth:`reset_expansion`).

    Shapes: input ``(..., in_features + extra_in)``, output ``(..., out_features + extra_out)``.
    ``weight`` / ``bias`` get ``nn.Linear``'s default init here; :meth:`from_linear` reuses a trained layer's.
    """

    routable = True  # whether the model-level route mask gates this module's W12 term
    expansion_parameter_names = ("weight_21", "weight_22", "weight_12", "bias_up")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        extra_in: int,
        extra_out: int,
        bias: bool = True,
        mode: str = "preserve",
        *,
        init: str = "random",
        std: float = DEFAULT_INIT_STD,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_size("in_features", in_features, minimum=1)
        self.out_features = check_size("out_features", out_features, minimum=1)
        self.extra_in = check_size("extra_in", extra_in)
        self.extra_out = check_size("extra_out", extra_out)
        self.mode = check_choice("mode", mode, MODES)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # an empty block (e_out == 0, e.g. the LM head, or e_in == 0) has nothing to train: it stays out of the
        # optimizer, and FSDP2 never has to reduce-scatter a 0-element gradient
        self.weight_21 = nn.Parameter(torch.zeros(extra_out, in_features, **kw), requires_grad=extra_out > 0)
        self.weight_22 = nn.Parameter(torch.zeros(extra_out, extra_in, **kw), requires_grad=extra_out * extra_in > 0)
        if self._has_w12():
            self.weight_12 = nn.Parameter(torch.zeros(out_features, extra_in, **kw))
        else:
            self.register_parameter("weight_12", None)
        if bias and extra_out > 0:
            self.bias_up = nn.Parameter(torch.zeros(extra_out, **kw))
        else:
            self.register_parameter("bias_up", None)
        self.route_state: RouteState | None = None
        self.backend: str | None = None
        self._reset_base()
        if init != "svd":  # svd needs the pretrained weight: from_linear applies it after copying W
            self.reset_expansion(init, std=std, generator=generator)

    def _has_w12(self) -> bool:
        return self.mode != "preserve" and self.extra_in > 0

    @torch.no_grad()
    def _reset_base(self) -> None:
        """``nn.Linear``'s default init for a standalone module (``from_linear`` swaps in real weights)."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def total_in(self) -> int:
        return self.in_features + self.extra_in

    @property
    def total_out(self) -> int:
        return self.out_features + self.extra_out

    @torch.no_grad()
    def reset_expansion(
        self, init: str = "random", *, std: float = DEFAULT_INIT_STD, generator: torch.Generator | None = None
    ) -> None:
        """Re-initialise ``weight_21`` / ``weight_22`` (``weight_12`` and ``bias_up`` are always zero).

        ``init``:
          * ``"zeros"``: W21 = W22 = 0 (the expansion outputs start at ``b_up``; used when loading weights).
          * ``"random"``: W21, W22 ~ N(0, std^2) (std = 0.02, HF's usual ``initializer_range``).
          * ``"svd"``: W21 = ``U_k^T W`` (the top-e_out principal output directions of the frozen W, see
            :func:`svd_expansion_rows`), W22 ~ N(0, std^2).

        ``weight_12`` is zero in every case: that is what makes a fresh Adapt/Route layer preserve the
        original outputs exactly.
        """
        check_choice("init", init, INITS)
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std}")
        if init == "zeros":
            w21 = torch.zeros(self.weight_21.shape)
            w22 = torch.zeros(self.weight_22.shape)
        elif init == "random":
            w21 = _normal(tuple(self.weight_21.shape), std, generator)
            w22 = _normal(tuple(self.weight_22.shape), std, generator)
        else:
            w21 = svd_expansion_rows(self.weight, self.extra_out, std, generator)
            w22 = _normal(tuple(self.weight_22.shape), std, generator)
        self.weight_21.copy_(w21)
        self.weight_22.copy_(w22)
        for p in (self.weight_12, self.bias_up):
            if p is not None:
                p.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        extra_in: int,
        extra_out: int,
        mode: str = "preserve",
        init: str = "random",
        *,
        std: float = DEFAULT_INIT_STD,
        generator: torch.Generator | None = None,
    ) -> ScaleLinear:
        """Wrap a pretrained ``nn.Linear``: its ``weight``/``bias`` are reused (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            extra_in,
            extra_out,
            bias=linear.bias is not None,
            mode=mode,
            init="zeros",
            device=w.device,
            dtype=w.dtype,
        )
        w.requires_grad_(False)
        module.weight = w
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            module.bias = linear.bias
        module.reset_expansion(init, std=std, generator=generator)
        return module

    def _w12_and_route(self, route: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        w12, state = self.weight_12, self.route_state
        if state is not None:
            if state.original_only:
                return None, None
            if route is None and self.routable:
                route = state.mask
        if w12 is None:
            route = None
        return w12, route

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        """``x (..., in_features + extra_in) -> (..., out_features + extra_out)``.

        ``route`` (``x.shape[:-1]``, bool or float) gates the W12 term per token; when None the model-level
        mask (``model(..., scale_route=mask)``) is used, and without one the gate is 1.
        """
        w12, route = self._w12_and_route(route)
        return upscaled_linear(
            x,
            self.weight,
            self.weight_21,
            self.weight_22,
            w12,
            self.bias,
            self.bias_up,
            route,
            backend=self.backend,
        )

    @torch.no_grad()
    def to_dense(self, *, route: float = 1.0) -> nn.Linear:
        """``nn.Linear(in + extra_in, out + extra_out)`` holding ``[[W, r*W12], [W21, W22]]`` and bias ``[b ; b_up]``
        (absent blocks: 0). ``route`` is the W12 gate ``r``; a module the route does not gate
        (:attr:`routable` False, e.g. the default LM head) folds in its W12 ungated."""
        w, d_out, d_in = self.weight, self.out_features, self.in_features
        dense = nn.Linear(self.total_in, self.total_out, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        full = w.new_zeros(self.total_out, self.total_in)
        full[:d_out, :d_in] = w
        if self.weight_12 is not None:
            full[:d_out, d_in:] = (route if self.routable else 1.0) * self.weight_12
        full[d_out:, :d_in] = self.weight_21
        full[d_out:, d_in:] = self.weight_22
        dense.weight.copy_(full)
        if self.bias is not None:
            up = self.bias_up if self.bias_up is not None else self.bias.new_zeros(self.extra_out)
            dense.bias.copy_(torch.cat([self.bias, up]))
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}+{self.extra_in}, out_features={self.out_features}+"
            f"{self.extra_out}, bias={self.bias is not None}, mode={self.mode}, "
            f"w12={'trainable' if self.weight_12 is not None else 'none'}"
        )


@dataclass
class HeadLossRequest:
    """A causal-LM loss for :class:`ScaleLMHead` to compute (fused) at its next forward, instead of logits.

    Fields are HF's ``ForCausalLMLoss`` arguments; ``loss`` is filled in by the head.
    """

    labels: Tensor | None
    shift_labels: Tensor | None = None
    ignore_index: int = -100
    num_items_in_batch: Tensor | int | None = None
    loss: Tensor | None = None


class ScaleLMHead(ScaleLinear):
    """Expanded LM head: ``logits = W_head h + W_head_up h_up`` (``e_out = 0``).

    ``W_head_up`` is stored as ``weight_12 (vocab, e)``, zero-initialised and trainable in every mode (it
    is how the expansion reaches the output, SCALE-Preserve included). By default the route mask does not
    gate it (only :func:`scale_kernels.original_stream` switches it off); a *gated* head (``routable =
    True``, ``upscale_model(..., gate_head=True)``) is gated by the model-level route mask like a W12 term,
    so route 0 gives exactly the base model's logits. ``weight`` may be the (tied) input embedding.

    :meth:`causal_lm_loss` computes HF's causal-LM loss of the head's logits with the fused head +
    cross-entropy (logits never materialised). An upscaled model uses it automatically in training (see
    :mod:`scale_kernels.models.fused_loss`) by setting :attr:`pending_loss` before its forward.
    """

    routable = False  # per instance: from_head(..., gated=True) sets it

    def __init__(
        self,
        in_features: int,
        out_features: int,
        extra_in: int,
        extra_out: int = 0,
        bias: bool = False,
        mode: str = "adapt",
        **kwargs,
    ) -> None:
        check_size("extra_in", extra_in, minimum=1)
        if extra_out != 0:
            raise ValueError(f"ScaleLMHead has no expansion outputs: extra_out must be 0, got {extra_out!r}")
        super().__init__(in_features, out_features, extra_in, 0, bias=bias, mode=mode, **kwargs)

    def _has_w12(self) -> bool:
        return True

    pending_loss: HeadLossRequest | None = None

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        """``(..., in_features + extra_in) -> (..., vocab)`` logits; with a :attr:`pending_loss` request, its fused
        loss is computed instead (stored in the request) and an empty ``(..., 0)`` placeholder is returned."""
        request = self.pending_loss
        if request is None:
            return super().forward(x, route)
        self.pending_loss = None
        request.loss = self.causal_lm_loss(
            x,
            request.labels,
            shift_labels=request.shift_labels,
            ignore_index=request.ignore_index,
            num_items_in_batch=request.num_items_in_batch,
        )
        return x.new_empty(*x.shape[:-1], 0)

    def causal_lm_loss(
        self,
        hidden: Tensor,
        labels: Tensor | None = None,
        *,
        shift_labels: Tensor | None = None,
        ignore_index: int = -100,
        num_items_in_batch: Tensor | int | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        """HF's ``ForCausalLMLoss`` of this head's logits on ``hidden (..., in_features + extra_in)``, fused.

        Exactly HF's contract: ``labels (...)`` are shifted by one (``labels[..., t + 1]`` is the target of
        position ``t``; the last position is ignored) unless ``shift_labels`` (already aligned) is given; tokens
        equal to ``ignore_index`` do not count; the loss is the mean over the counted tokens, or their sum divided
        by ``num_items_in_batch`` when given (gradient accumulation). ``W_head_up`` and its route come from
        ``_w12_and_route`` (so ``original_stream`` and model-level route gating apply as in :meth:`forward`).
        """
        if shift_labels is None:
            if labels is None:
                raise ValueError("causal_lm_loss needs labels or shift_labels")
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        tokens = hidden.shape[:-1]
        if tuple(shift_labels.shape) != tuple(tokens):
            raise ValueError(
                f"labels must have the hidden states' token shape {tuple(tokens)}, got {tuple(shift_labels.shape)}"
            )
        w_up, route = self._w12_and_route(None)
        x = hidden.reshape(-1, hidden.shape[-1])
        if w_up is None:  # original stream: h_up does not reach the logits
            x = x[:, : self.in_features]
        if route is not None:
            if tuple(route.shape) != tuple(tokens):
                raise ValueError(f"route must have the token shape {tuple(tokens)}, got {tuple(route.shape)}")
            route = route.reshape(-1)
        loss = fused_head_cross_entropy(
            x,
            self.weight,
            shift_labels.reshape(-1).to(x.device),
            w_up,
            self.bias,
            route,
            ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum",
            chunk_size=chunk_size,
            backend=self.backend,
        )
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @classmethod
    def from_head(cls, linear: nn.Linear, extra_in: int, *, gated: bool = False) -> ScaleLMHead:
        """Wrap a pretrained head (``weight`` reused, so a tied embedding stays tied); ``W_head_up = 0``.
        ``gated``: the model-level route mask gates ``W_head_up`` (route 0 = the base logits)."""
        head = cls.from_linear(linear, extra_in, 0, mode="adapt", init="zeros")
        head.routable = gated
        return head

    def extra_repr(self) -> str:
        gate = "gated by the route" if self.routable else "ungated"
        return f"in_features={self.in_features}+{self.extra_in}, vocab={self.out_features}, head_up={gate}"


class ScaleRMSNorm(ExpansionModule):
    """Split RMSNorm over ``[h ; h_up]`` (``(..., hidden + extra)``, same shape out).

    The original slice is normalised with its own statistics and the frozen ``weight`` (identical to the
    pretrained norm); the expansion slice separately, with the trainable ``weight_up`` (init ones).
    ``extra = 0`` is allowed and then behaves exactly like the original RMSNorm. The output has the input's
    dtype (the stream dtype), whatever the weights' dtypes (e.g. an fp32 master ``weight_up``).

    Forward path: the one-launch Triton kernel (:mod:`scale_kernels.ops.split_rms_norm`) where the package
    dispatcher picks ``triton`` (CUDA tensors by default; ``self.backend`` or ``use_backend`` override it), else
    plain PyTorch. The kernel never computes a gradient for ``weight``; if ``weight`` is made trainable the
    PyTorch path runs so that it gets one.
    """

    expansion_parameter_names = ("weight_up",)

    def __init__(self, hidden_size: int, extra: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = check_size("hidden_size", hidden_size, minimum=1)
        self.extra = check_size("extra", extra)
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype), requires_grad=False)
        self.weight_up = nn.Parameter(torch.ones(extra, device=device, dtype=dtype))
        self.backend: str | None = None

    @classmethod
    def from_norm(cls, norm: nn.Module, extra: int) -> ScaleRMSNorm:
        """Wrap an HF RMSNorm (``weight``, ``variance_epsilon``); its weight is reused and frozen."""
        w = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None:
            raise TypeError(
                f"norm must be an RMSNorm with a 1-D `weight` and `variance_epsilon`, got {type(norm).__name__}"
            )
        module = cls(w.numel(), extra, eps, device=w.device, dtype=w.dtype)
        w.requires_grad_(False)
        module.weight = w
        return module

    def forward(self, x: Tensor) -> Tensor:
        total = self.hidden_size + self.extra
        if x.shape[-1] != total:
            raise ValueError(
                f"ScaleRMSNorm: input must have shape (..., hidden + extra) = (..., {total}), got {tuple(x.shape)}"
            )
        if self.uses_kernel(x):
            return _split_norm.split_rms_norm(x, self.weight, self.weight_up, self.variance_epsilon)
        return _split_norm.split_rms_norm_torch(x, self.weight, self.weight_up, self.variance_epsilon)

    def uses_kernel(self, x: Tensor) -> bool:
        """Whether :meth:`forward` on ``x`` runs the fused Triton kernel (else the PyTorch path)."""
        # triton_or_torch returns "triton" only where the triton backend can run x's device and dtype
        return (
            not self.weight.requires_grad
            and triton_or_torch(self.backend, x.device, x.dtype) == "triton"
            and max(self.hidden_size, self.extra) <= _split_norm.MAX_WIDTH
        )

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}+{self.extra}, eps={self.variance_epsilon}"

    @torch.no_grad()
    def to_dense(self, *, route: float = 1.0) -> GroupedRMSNorm:
        """:class:`GroupedRMSNorm` with ``weight = [weight ; weight_up]`` (``route`` does not apply to a norm)."""
        w = self.weight
        norm = GroupedRMSNorm(self.hidden_size, self.extra, self.variance_epsilon, device=w.device, dtype=w.dtype)
        norm.weight.copy_(torch.cat([w, self.weight_up]))
        return norm


class GroupedRMSNorm(nn.Module):
    """Dense export of :class:`ScaleRMSNorm`: one ``weight (hidden + extra,)`` (HF state-dict layout), but the
    slices ``[:hidden]`` and ``[hidden:]`` are still normalised separately. Used by ``merge_to_dense``."""

    def __init__(self, hidden_size: int, extra: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = check_size("hidden_size", hidden_size, minimum=1)
        self.extra = check_size("extra", extra)
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size + extra, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        w, w_up = self.weight.split([self.hidden_size, self.extra])
        return _split_norm.split_rms_norm_torch(x, w, w_up, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"groups=({self.hidden_size}, {self.extra}), eps={self.variance_epsilon}"


class ScaleEmbedding(ExpansionModule):
    """Expanded token embedding ``[E ; E_up]``: ids ``(...)`` -> ``(..., embedding_dim + extra)``.

    ``weight (vocab, d)`` is the frozen pretrained table, ``weight_up (vocab, extra)`` the trainable part.
    """

    expansion_parameter_names = ("weight_up",)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        extra: int,
        padding_idx: int | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_embeddings = check_size("num_embeddings", num_embeddings, minimum=1)
        self.embedding_dim = check_size("embedding_dim", embedding_dim, minimum=1)
        self.extra = check_size("extra", extra, minimum=1)
        self.padding_idx = padding_idx
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **kw), requires_grad=False)
        self.weight_up = nn.Parameter(torch.zeros(num_embeddings, extra, **kw))

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        extra: int,
        init: str = "random",
        *,
        std: float = DEFAULT_INIT_STD,
        generator: torch.Generator | None = None,
    ) -> ScaleEmbedding:
        """Wrap ``embedding`` (weight reused, frozen). ``init`` of ``E_up``: zeros, N(0, std^2), or svd
        (``E V_k``: each token's coordinates along the top-``extra`` principal directions of the table)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        check_choice("init", init, INITS)
        w = embedding.weight
        module = cls(w.shape[0], w.shape[1], extra, embedding.padding_idx, device=w.device, dtype=w.dtype)
        w.requires_grad_(False)
        module.weight = w
        if init == "random":
            up = _normal((w.shape[0], extra), std, generator)
        elif init == "svd":  # principal coordinates = rows of (U_k^T E^T)^T: reuse the linear-layer helper
            up = svd_expansion_rows(w.t(), extra, std, generator).t()
        else:
            up = torch.zeros(w.shape[0], extra)
        with torch.no_grad():
            module.weight_up.copy_(up)
        return module

    def forward(self, ids: Tensor) -> Tensor:
        """``(...)`` ids -> ``(..., embedding_dim + extra)`` in the frozen table's dtype (the stream dtype: an fp32
        master ``weight_up`` is cast, differentiably, so it still gets an fp32 gradient)."""
        emb = nn.functional.embedding(ids, self.weight, self.padding_idx)
        up = nn.functional.embedding(ids, self.weight_up, self.padding_idx)
        return torch.cat([emb, up.to(emb.dtype)], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}+{self.extra}, padding_idx={self.padding_idx}"

    @torch.no_grad()
    def to_dense(self, *, route: float = 1.0) -> nn.Embedding:
        """``nn.Embedding`` of the table ``[E ; E_up]`` (``(vocab, embedding_dim + extra)``; ``route`` does not
        apply to an embedding)."""
        table = torch.cat([self.weight, self.weight_up], dim=1)
        return nn.Embedding.from_pretrained(table, freeze=False, padding_idx=self.padding_idx)


EXPANSION_MODULES: tuple[type[ExpansionModule], ...] = (ScaleLinear, ScaleRMSNorm, ScaleEmbedding)
# every expansion parameter name of every module, in first-seen order (ScaleLMHead's W_head_up is weight_12)
EXPANSION_PARAM_NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(name for cls in EXPANSION_MODULES for name in cls.expansion_parameter_names)
)
