"""The precision policy: frozen weights in bf16 (or fp16), trainable weights as fp32 masters, bf16 compute.

The standard mixed-precision recipe, stated per parameter kind (bytes per parameter, AdamW)::

    kind                         weight   gradient   AdamW m + v   total
    frozen (base model)            2         0           0           2
    trainable (fp32 master)        4         4           8          16

plus, during a step, a 2-byte compute copy of every trainable weight a matmul reads (the autocast cast, saved
for backward). Applied to each method so that benchmarks compare like for like:

* SCALE: the pretrained weights are frozen -> bf16; the expansion (W21, W22, W12, W_head_up, E_up, norm
  weight_up) trains -> fp32 masters.
* LoRA: the base model is frozen -> bf16; the adapters -> fp32 masters.
* full fine-tuning: every weight trains -> fp32 masters for everything (16 bytes per parameter).

Compute runs under ``torch.autocast(dtype=compute_dtype)`` (:meth:`PrecisionPolicy.autocast`; HF ``Trainer``
does the same with ``bf16=True``). The hidden stream of an upscaled model stays in the frozen dtype: the
package's modules cast fp32 masters to it (``ScaleEmbedding``, ``ScaleRMSNorm``, ``upscaled_linear`` under
autocast), and the fused LM head keeps ``W_head_up``'s gradient in fp32. AdamW keeps its state in each
parameter's dtype, so fp32 masters get fp32 ``m`` and ``v`` with no extra code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PrecisionPolicy:
    """``frozen_dtype`` for parameters that do not require grad, ``trainable_dtype`` for those that do,
    ``compute_dtype`` for the autocast region (default: ``frozen_dtype``)."""

    frozen_dtype: torch.dtype = torch.bfloat16
    trainable_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("frozen_dtype", "trainable_dtype", "compute_dtype"):  # compute_dtype None: frozen_dtype
            dtype = getattr(self, name)
            if dtype not in (*LOW_PRECISION, torch.float32) and not (name == "compute_dtype" and dtype is None):
                raise ValueError(f"{name} must be bfloat16, float16 or float32, got {dtype}")

    @property
    def autocast_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.frozen_dtype

    def dtype_of(self, param: nn.Parameter) -> torch.dtype:
        return self.trainable_dtype if param.requires_grad else self.frozen_dtype

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """``torch.autocast(device_type, dtype=autocast_dtype)`` (a no-op context for fp32 compute)."""
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def bytes_per_parameter(self, trainable: bool, optimizer_states: int = 2) -> dict[str, int]:
        """Bytes of one parameter: ``weight``, ``gradient``, ``optimizer`` (AdamW: 2 states in the param's dtype)."""
        size = (self.trainable_dtype if trainable else self.frozen_dtype).itemsize
        return {
            "weight": size,
            "gradient": size if trainable else 0,
            "optimizer": optimizer_states * size if trainable else 0,
        }


def apply_precision_policy(model: nn.Module, policy: PrecisionPolicy | None = None) -> dict[str, int]:
    """Cast every parameter of ``model`` in place by whether it requires grad; returns the parameter counts.

    Call it after freezing/upscaling/adding adapters (it reads ``requires_grad``) and before creating the
    optimizer. Parameters keep their identity (tied weights stay tied); buffers are left alone (HF keeps its
    rotary inverse frequencies in fp32). Raises ValueError if a parameter already has a gradient.
    """
    policy = policy or PrecisionPolicy()
    counts = {"frozen": 0, "trainable": 0}
    for name, param in model.named_parameters():  # a tied parameter once, under its first name
        if param.grad is not None:
            raise ValueError(f"apply_precision_policy: {name} already has a gradient; apply the policy before training")
        dtype = policy.dtype_of(param)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts
