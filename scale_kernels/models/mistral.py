"""Mistral (``MistralForCausalLM``): same module tree as Llama, no biases.

* ``MistralConfig.head_dim`` is a real field (it may differ from ``hidden_size // num_attention_heads``);
  it is kept as is.
* ``sliding_window`` only changes the attention mask; KV-cache layers are sized from the tensors they
  receive, so extra KV heads need no cache changes.
"""

from .core import FamilySpec

SPEC = FamilySpec(model_class="MistralForCausalLM", model_type="mistral")
