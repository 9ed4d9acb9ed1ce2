"""Optional liger-kernel ops for the element-wise parts of an upscaled model (``pip install scale_kernels[liger]``).

Which liger-kernel kernels accept the widened shapes:

* SwiGLU (``liger_kernel.ops.swiglu.LigerSiLUMulFunction``): element-wise over the last dim, so the widened FFN
  (``intermediate + extra_intermediate``) is just a wider row. Applied per model: each decoder layer's
  ``mlp.forward`` becomes ``down_proj(silu_mul(gate_proj(x), up_proj(x)))`` (the projections stay the package's
  ``ScaleLinear``).
* RoPE (``liger_kernel.transformers.rope.liger_rotary_pos_emb``): rotates each head of ``(batch, heads, seq,
  head_dim)`` q and k; head_dim is unchanged by upscaling and the head counts (query and KV, GQA) are read from
  the tensors, so the widened attention fits. HF calls the module-level ``apply_rotary_pos_emb`` of the model's
  family; like Liger's own patchers this rebinds that function for the family, i.e. for every model of that
  family in the process.
* RMSNorm, cross-entropy / fused linear cross-entropy: not used. The split RMSNorm (two statistics, frozen +
  trainable weights) and the upscaled head (frozen, possibly tied W without a gradient) are this package's own
  kernels.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Iterable

from torch import nn

from .core import FAMILIES

LIGER_OPS = ("swiglu", "rope")
_FAMILY_MODULES = {spec.model_type: spec.modeling_module for spec in FAMILIES}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"liger-kernel ops were requested but {name} cannot be imported ({exc}); install them with "
            "pip install 'scale_kernels[liger]' (or pip install liger-kernel)"
        ) from exc


def _swiglu_forward(self: nn.Module, x, *, silu_mul):
    return self.down_proj(silu_mul.apply(self.gate_proj(x), self.up_proj(x)))


def apply_liger_kernels(model: nn.Module, ops: Iterable[str] = LIGER_OPS) -> dict[str, int]:
    """Use liger-kernel's ``ops`` (``"swiglu"``, ``"rope"``) in ``model``; returns how many places each patched.

    Raises ImportError (naming the install command) when liger-kernel is missing, ValueError for an unknown op
    or when nothing could be patched (a patch that silently does nothing is an error).
    """
    ops = [ops] if isinstance(ops, str) else list(ops)
    for op in ops:
        if op not in LIGER_OPS:
            raise ValueError(f"liger ops must be among {LIGER_OPS}, got {op!r}")
    counts = {}
    layers = model.model.layers
    if "swiglu" in ops:
        forward = functools.partial(_swiglu_forward, silu_mul=_import("liger_kernel.ops.swiglu").LigerSiLUMulFunction)
        for layer in layers:
            act = getattr(layer.mlp.config if hasattr(layer.mlp, "config") else model.config, "hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise ValueError(f"liger SwiGLU needs a SiLU MLP, got hidden_act={act!r}")
            layer.mlp.forward = types.MethodType(forward, layer.mlp)
        counts["swiglu"] = len(layers)
    if "rope" in ops:
        rope = _import("liger_kernel.transformers.rope").liger_rotary_pos_emb
        family = model.config.model_type
        if family not in _FAMILY_MODULES:
            raise ValueError(f"liger RoPE: unsupported model_type {family!r}; supported: {sorted(_FAMILY_MODULES)}")
        importlib.import_module(_FAMILY_MODULES[family]).apply_rotary_pos_emb = rope
        counts["rope"] = len(layers)
    if not any(counts.values()):
        raise ValueError("apply_liger_kernels patched nothing")
    return counts
