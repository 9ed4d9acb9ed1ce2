"""The fused LM head + cross-entropy inside an upscaled HF model's own forward.

``upscale_model`` (``fused_loss=True``, the default) installs two hooks on the ``*ForCausalLM`` model; no forward
is replaced, so HF's own forward (its kwargs, cache, ``logits_to_keep``, ``return_dict``) runs unchanged:

* a forward pre-hook: when the fused loss applies (see :func:`fused_loss_applies`) it takes ``labels`` out of
  the call (HF then computes no loss of its own) and leaves a :class:`~scale_kernels.modules.HeadLossRequest` on
  ``lm_head`` with ``labels`` and HF's loss kwargs (``shift_labels``, ``ignore_index``, ``num_items_in_batch``,
  which stay in the call, as HF passes them on too);
* ``lm_head`` (a :class:`~scale_kernels.ScaleLMHead`), called by HF's forward on the (``logits_to_keep``-sliced)
  last hidden states, computes the fused loss and returns an empty ``(batch, seq, 0)`` placeholder;
* a forward hook puts the loss into the output and sets ``logits`` to None (a tuple output, ``return_dict=False``,
  becomes ``(loss, ...)``).

The fused loss applies in training mode (``model.training``) when ``labels`` are passed as a keyword, as
Liger-Kernel does: a training step needs the loss, not the ``(tokens, vocab)`` logits, so ``logits`` is None. In
eval mode (``Trainer.evaluate``, generation, metrics) the model returns logits and HF's loss as usual. Switch it
off per model with ``model.scale_fused_loss = False`` (or ``upscale_model(..., fused_loss=False)``).
"""

from __future__ import annotations

from torch import nn

from ..modules import HeadLossRequest, ScaleLMHead

FUSED_LOSS_ATTR = "scale_fused_loss"
_REQUEST_ATTR = "_scale_loss_request"
_HOOKS_ATTR = "_scale_fused_loss_hooks"  # the handles of the two hooks (removed by uninstall_fused_loss)


def fused_loss_applies(model: nn.Module, kwargs: dict) -> bool:
    """Whether a forward of ``model`` with keyword arguments ``kwargs`` computes its loss with the fused head."""
    return (
        bool(getattr(model, FUSED_LOSS_ATTR, False))
        and model.training
        and kwargs.get("labels") is not None
        and isinstance(getattr(model, "lm_head", None), ScaleLMHead)
    )


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    model.__dict__.pop(_REQUEST_ATTR, None)
    head = getattr(model, "lm_head", None)
    if isinstance(head, ScaleLMHead):
        head.pending_loss = None  # a request left by a forward that raised must not leak into this one
    if not fused_loss_applies(model, kwargs):
        return None
    kwargs = dict(kwargs)
    request = HeadLossRequest(
        labels=kwargs.pop("labels"),
        shift_labels=kwargs.get("shift_labels"),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
    )
    head.pending_loss = request
    model.__dict__[_REQUEST_ATTR] = request
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    request = model.__dict__.pop(_REQUEST_ATTR, None)
    if request is None:
        return None
    model.lm_head.pending_loss = None
    if request.loss is None:
        raise RuntimeError(
            f"{type(model).__name__}.forward did not call lm_head: the fused loss could not run. Set "
            f"model.{FUSED_LOSS_ATTR} = False to use the model's own loss"
        )
    if isinstance(output, tuple):
        return (request.loss, *output[1:])  # output[0] is the placeholder logits
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    return type(output)(loss=request.loss, **fields)  # logits None (not a key, as in an output built without)


def install_fused_loss(model: nn.Module, enabled: bool = True) -> None:
    """Install the hooks (once: a second call only sets the switch) and set ``model.scale_fused_loss = enabled``."""
    if not isinstance(enabled, bool):
        raise TypeError(f"fused_loss must be a bool, got {enabled!r}")
    setattr(model, FUSED_LOSS_ATTR, enabled)
    if _HOOKS_ATTR not in model.__dict__:
        hooks = (
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True),
        )
        setattr(model, _HOOKS_ATTR, hooks)


def uninstall_fused_loss(model: nn.Module) -> None:
    """Undo :func:`install_fused_loss`: remove its two hooks and its attributes (other hooks stay)."""
    for handle in model.__dict__.pop(_HOOKS_ATTR, ()):
        handle.remove()
    for attr in (FUSED_LOSS_ATTR, _REQUEST_ATTR):
        model.__dict__.pop(attr, None)
