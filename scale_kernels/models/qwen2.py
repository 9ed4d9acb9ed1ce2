"""Qwen2 (``Qwen2ForCausalLM``): same module tree as Llama.

* q/k/v always have a bias, o_proj and the MLP none: the expansion q/k/v heads get a trainable
  ``bias_up`` (zero-initialised) next to the frozen original bias.
* ``Qwen2Config`` has no ``head_dim`` field; the attention uses ``getattr(config, "head_dim",
  hidden_size // num_attention_heads)``. Upscaling writes ``head_dim`` into the config explicitly, because
  ``(hidden + extra_hidden) / (heads + extra_heads)`` is in general not the pretrained head_dim.
* Sliding-window layers (``layer_types``) only change the attention mask, not any shape.
"""

from .core import FamilySpec

SPEC = FamilySpec(model_class="Qwen2ForCausalLM", model_type="qwen2")
