"""Llama (``LlamaForCausalLM``): the reference layout for the shared core.

* q/k/v/o and MLP projections carry a bias only when ``config.attention_bias`` / ``config.mlp_bias`` is
  set; :class:`~scale_kernels.ScaleLinear` keeps whatever bias the layer has (frozen) and adds ``bias_up``.
* ``LlamaAttention`` reads ``head_dim`` and ``num_key_value_groups`` at init and reshapes q/k/v with
  ``view(..., -1, head_dim)``: appended heads are picked up by the ``-1`` with no patching; the group
  size (and so ``num_key_value_groups``) is unchanged by construction.
* Rotary inverse frequencies depend on ``head_dim`` only, which stays fixed.
* ``tie_word_embeddings=True`` (Llama-3.2-1B) ties ``lm_head.weight`` to the embedding: the frozen part
  stays shared, the head's expansion ``W_head_up`` is its own zero-initialised parameter.
"""

from .core import FamilySpec

SPEC = FamilySpec(model_class="LlamaForCausalLM", model_type="llama")
