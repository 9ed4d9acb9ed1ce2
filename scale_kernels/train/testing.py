"""A tiny random Llama (or GPT-2) + byte-level BPE tokenizer saved as a HF folder: for smoke tests and CI (offline)."""

from __future__ import annotations

from pathlib import Path

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "In the beginning was the Word, and the Word was with God. Blessed are the meek, for they shall inherit "
    "the earth. To be or not to be, that is the question. "
)


def make_tiny_model_dir(
    directory: str | Path,
    *,
    vocab_size: int = 320,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
    family: str = "llama",
) -> Path:
    """Write a random ``LlamaForCausalLM`` (untied head) or, with ``family="gpt2"``, a ``GPT2LMHeadModel``
    (tied head, no ``model.layers``: an architecture SCALE does not upscale) and a matching tokenizer into
    ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if family not in ("llama", "gpt2"):
        raise ValueError(f"family must be 'llama' or 'gpt2', got {family!r}")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(directory)
    special = dict(eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=len(fast), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **special
        )
        GPT2LMHeadModel(config).save_pretrained(directory)
        return directory
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **special,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
