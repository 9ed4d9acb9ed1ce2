"""Peak-memory estimator of one training step: full fine-tuning, LoRA and SCALE at a given HF model shape.

    python -m scale_kernels.memory --model llama-3.2-1b --batch-size 4 --seq-len 2048
    python -m scale_kernels.memory --model path/to/config.json --methods scale --gradient-checkpointing on

Parameters, gradients and AdamW state are counted exactly: the model is built on the ``meta`` device (no memory)
with the method applied (``upscale_model``, peft LoRA) and the :class:`~scale_kernels.precision.PrecisionPolicy`
gives each parameter its dtype. Activations (what autograd saves for backward) follow a per-layer formula of
the widths, written out in docs/memory.md, for HF's Llama-layout decoder layer (SDPA attention with GQA kept, SiLU
MLP) under ``torch.autocast``. The step's peak is::

    peak = weights + optimizer + max(compute copies + activations + loss transient, gradients)

Assumptions (what the formula does not model): no allocator fragmentation or cuBLAS/SDPA workspaces; AdamW
without temporaries (``fused=True``); gradients set to None between steps; batches without padding (no
attention mask); gradient checkpointing = HF's non-reentrant per-decoder-layer checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .precision import PrecisionPolicy

METHODS = ("full_ft", "lora", "scale", "handwritten")
FP32 = 4
LABEL_BYTES = 8  # int64 ids / shifted labels per token
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Shapes from the issue (random weights; vocab of Llama 3).
PRESETS = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
}  # fmt: skip
# +25% width (1B: 512 = 8 heads of 64 = 2 KV heads x group 4; 8B: 1024 = 8 heads of 128 = 2 KV heads x group 4)
UPSCALE_PRESETS = {
    "llama-3.2-1b": dict(extra_hidden=512, extra_kv_heads=2, extra_intermediate=2048),
    "llama-3.1-8b": dict(extra_hidden=1024, extra_kv_heads=2, extra_intermediate=3584),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step (steady state: optimizer state allocated), by component."""

    method: str
    weights: int
    compute_copies: int
    gradients: int
    optimizer: int
    activations: int
    loss_transient: int
    peak: int
    trainable_params: int
    frozen_params: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _config_object(config: dict):
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **config)


def build_meta_model(config: dict, method: str, *, upscale: dict | None = None, lora_r: int = 16):
    """The model a method trains, on the ``meta`` device (shapes and ``requires_grad`` only, no memory)."""
    from transformers import AutoModelForCausalLM

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config_object(config))
    if method in ("scale", "handwritten"):
        from .models import upscale_model

        if not upscale:
            raise ValueError("method 'scale' needs upscale=dict(extra_hidden=..., ...) (upscale_model's sizes)")
        upscale_model(model, **upscale, init="zeros")
    elif method == "lora":
        from .models.lora import apply_lora

        model = apply_lora(model, lora_r, 2 * lora_r, list(LORA_TARGETS))
    return model


def _matmul_weight(name: str, fused_loss: bool) -> bool:
    """Whether a trainable parameter is read by a matmul (so autocast keeps a compute-dtype copy of it)."""
    leaf = name.rsplit(".", 1)[-1]
    if "embed_tokens" in name or "norm" in name.rsplit(".", 2)[-2] or leaf in ("bias", "bias_up"):
        return "lm_head" in name  # a tied embedding is read by the head's matmul
    if fused_loss and name.startswith("lm_head."):
        return False  # cast inside the fused op per step, not kept (counted in the loss transient)
    return True


@dataclass(frozen=True)
class _Widths:
    D: int  # hidden (upscaled)
    e: int  # extra hidden (0 unless SCALE)
    Q: int  # query width
    KV: int  # key/value width
    I: int  # noqa: E741  FFN width
    H: int  # query heads
    V: int  # vocab
    hd: int  # head dim
    L: int  # layers


def _widths(model: nn.Module, extra_hidden: int) -> _Widths:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return _Widths(
        c.hidden_size, extra_hidden, c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size,
        c.num_attention_heads, c.vocab_size, hd, c.num_hidden_layers,
    )  # fmt: skip


def _norm_saved(method: str, w: _Widths, s: int, norm_kernel: bool) -> int:
    """Bytes per token an RMSNorm saves (s = stream dtype bytes)."""
    if method == "full_ft":  # HF norm, trainable weight: fp32 input, rsqrt, normalised (input dtype)
        return FP32 * w.D + FP32 + s * w.D
    if method == "lora":  # frozen weight: the normalised tensor is not needed
        return FP32 * w.D + FP32
    if norm_kernel:  # one launch: x and two fp32 rstd
        return s * w.D + 2 * FP32
    # split norm in PyTorch: frozen slice as LoRA's, trainable slice keeps its normalised part too
    return FP32 * w.D + 2 * FP32 + s * w.e


def _input_saves(consumers: int, width: int, s: int, c: int, copies: bool) -> int:
    """Bytes per token the ``consumers`` matmuls reading one activation of ``width`` save: one copy each when
    they cast it (autocast / peft's adapter cast), else the shared tensor once."""
    return consumers * c * width if copies else s * width


def _layer_saved(method: str, w: _Widths, s: int, c: int, lora: dict, norm_kernel: bool, first: bool) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing)."""
    attn = c * (2 * w.Q + 2 * w.KV) + FP32 * w.H  # SDPA: q, k, v, out (= o_proj input), fp32 logsumexp
    mlp = 4 * c * w.I  # gate out (SiLU input), SiLU out, up out, product (= down_proj input)
    norms = 2 * _norm_saved(method, w, s, norm_kernel)
    if method == "lora":
        if first:  # nothing upstream of the first adapter requires grad: the first norm saves nothing
            norms = _norm_saved(method, w, s, norm_kernel)
        copies = lora["cast"]
        # the frozen base matmuls save no input; each adapter's lora_A saves its input (peft's cast to an fp32
        # adapter plus autocast make it a copy per adapter) and lora_B saves A's output. o_proj's input is SDPA's
        # saved out unless copied; down_proj's is the product (copied or not: c bytes, already in ``mlp``).
        inputs = _input_saves(3, w.D, s, c, copies) + _input_saves(2, w.D, s, c, copies)
        inputs += c * w.Q if copies else 0
        return norms + inputs + attn + mlp + len(LORA_TARGETS) * c * lora["r"]
    copies = method == "full_ft" and s != c  # fp32 stream cast per linear by autocast
    inputs = _input_saves(3, w.D, s, c, copies) + _input_saves(2, w.D, s, c, copies)
    return norms + inputs + attn + mlp


def estimate_training_memory(
    config: dict,
    method: str,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    upscale: dict | None = None,
    lora_r: int = 16,
    policy: PrecisionPolicy | None = None,
    fused_loss: bool | None = None,
    norm_kernel: bool | None = None,
) -> MemoryEstimate:
    """Predicted memory of one AdamW training step of ``method`` on a model of HF ``config`` (a dict with
    ``model_type``; see ``PRESETS``) at ``batch_size x seq_len`` tokens.

    ``method``: ``full_ft``, ``lora`` (r=``lora_r`` on every projection), ``scale`` (``upscale_model(**upscale)``,
    the package's fused head and norm kernel by default) or ``handwritten`` (the same upscaled model computed in
    plain PyTorch: split norm in PyTorch, materialised logits). ``policy``: the precision recipe (default
    :class:`PrecisionPolicy`: frozen bf16, fp32 masters, bf16 autocast). ``fused_loss`` / ``norm_kernel``
    override the method's default (True for ``scale``, False otherwise).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    policy = policy or PrecisionPolicy()
    scale = method == "scale"
    fused_loss = scale if fused_loss is None else fused_loss
    norm_kernel = scale if norm_kernel is None else norm_kernel
    model = build_meta_model(config, method, upscale=upscale, lora_r=lora_r)
    c = policy.autocast_dtype.itemsize
    counts = {"trainable": 0, "frozen": 0}
    weights = gradients = optimizer = copies = 0
    for name, p in model.named_parameters():  # a tied parameter once, under its first name
        per = policy.bytes_per_parameter(p.requires_grad)
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        weights, gradients, optimizer = (
            weights + per["weight"] * p.numel(),
            gradients + per["gradient"] * p.numel(),
            optimizer + per["optimizer"] * p.numel(),
        )
        if p.requires_grad and policy.trainable_dtype != policy.autocast_dtype and _matmul_weight(name, fused_loss):
            copies += c * p.numel()
    extra = (upscale or {}).get("extra_hidden", 0) if method in ("scale", "handwritten") else 0
    w = _widths(model, extra)
    if method == "lora" and copies:  # the first layer's q/k/v lora_A copies are not kept: no gradient reaches x
        copies -= 3 * lora_r * w.D * c
    embed_trainable = method != "lora"
    s = (policy.trainable_dtype if method == "full_ft" else policy.frozen_dtype).itemsize  # stream dtype
    tokens = batch_size * seq_len
    lora = {"r": lora_r, "cast": policy.trainable_dtype != policy.frozen_dtype}
    layers = [_layer_saved(method, w, s, c, lora, norm_kernel, first=i == 0) for i in range(w.L)]
    rope = 2 * seq_len * w.hd * s  # cos / sin, shared by every layer
    ends = (LABEL_BYTES if embed_trainable else 0) + _norm_saved(method, w, s, norm_kernel)
    chunk = 0
    if fused_loss:  # dx (compute dtype) and fp32 dW_up are kept from forward to backward
        loss_saved = tokens * c * w.D + FP32 * w.V * w.e
        from .ops.fused_head_cross_entropy import default_chunk_size

        chunk = default_chunk_size(tokens, w.D, w.V)
        loss_transient = chunk * w.V * c + c * w.V * w.e  # the chunk's logits + the cast W_up
        head_input = 0
    else:  # fp32 log-probs + labels saved; bf16 logits alive, nll and log_softmax gradients (fp32) in backward
        loss_saved = tokens * (FP32 * w.V + LABEL_BYTES) + FP32
        loss_transient = tokens * w.V * (c + 2 * FP32)
        head_input = {"full_ft": c if s != c else s, "lora": 0}.get(method, s) * w.D
    per_token_ends = ends + head_input
    if gradient_checkpointing:  # layer inputs kept; one layer recomputed at a time in backward
        layer_total = w.L * s * w.D * tokens
        recompute = max(layers) * tokens
    else:
        layer_total, recompute = sum(layers) * tokens, 0
    activations = layer_total + per_token_ends * tokens + rope + loss_saved
    peak = weights + optimizer + max(copies + activations + max(loss_transient, recompute), gradients)
    details = {
        "layer_bytes_per_token": layers[-1],
        "first_layer_bytes_per_token": layers[0],
        "recompute_bytes": recompute,
        "loss_saved_bytes": loss_saved,
        "fused_loss": fused_loss,
        "norm_kernel": norm_kernel,
        "chunk_tokens": chunk,
        "tokens": tokens,
        "widths": asdict(w),
    }
    return MemoryEstimate(
        method, weights, copies, gradients, optimizer, activations, loss_transient, peak,
        counts["trainable"], counts["frozen"], details,
    )  # fmt: skip


@contextlib.contextmanager
def count_saved_tensors(model: nn.Module | None = None):
    """Count the bytes autograd saves for backward inside the block (each storage once; ``model``'s parameters
    excluded). Yields a dict whose ``"bytes"`` entry is filled as tensors are saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    seen: set[int] = set()
    result = {"bytes": 0, "tensors": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            result["bytes"] += t.untyped_storage().nbytes()
            result["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _table(estimates: list[MemoryEstimate]) -> str:
    cols = ("weights", "compute_copies", "gradients", "optimizer", "activations", "loss_transient", "peak")
    lines = ["| method | " + " | ".join(cols) + " | trainable params |", "|---" * (len(cols) + 2) + "|"]
    for est in estimates:
        cells = [_gib(getattr(est, col)) for col in cols]
        lines.append(f"| {est.method} | " + " | ".join(cells) + f" | {est.trainable_params:,} |")
    return "\n".join(lines)


def _load_config(spec: str) -> dict:
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--model must be one of {sorted(PRESETS)} or a config.json path; {spec!r} is neither")
    return json.loads(path.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scale_kernels.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3.2-1b", help=f"preset {sorted(PRESETS)} or an HF config.json")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["full_ft", "lora", "scale"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off")
    parser.add_argument("--extra-hidden", type=int, default=None, help="SCALE width (default: the preset's)")
    parser.add_argument("--extra-kv-heads", type=int, default=None)
    parser.add_argument("--extra-intermediate", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--frozen-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--trainable-dtype", choices=("bfloat16", "float16", "float32"), default="float32")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="report whether each peak fits (default 80)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = _load_config(args.model)
    upscale = dict(UPSCALE_PRESETS.get(args.model, UPSCALE_PRESETS["llama-3.2-1b"]))
    for key in ("extra_hidden", "extra_kv_heads", "extra_intermediate"):
        if getattr(args, key) is not None:
            upscale[key] = getattr(args, key)
    policy = PrecisionPolicy(getattr(torch, args.frozen_dtype), getattr(torch, args.trainable_dtype))
    estimates = [
        estimate_training_memory(
            config, method, batch_size=args.batch_size, seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing == "on", upscale=upscale, lora_r=args.lora_r,
            policy=policy,
        )
        for method in args.methods
    ]  # fmt: skip
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=1))
        return 0
    print(
        f"{args.model}: batch {args.batch_size} x {args.seq_len}, checkpointing {args.gradient_checkpointing}, "
        f"frozen {args.frozen_dtype}, trainable {args.trainable_dtype} (+AdamW state), upscale {upscale} (GiB)"
    )
    print(_table(estimates))
    for est in estimates:
        fits = "fits" if est.peak <= args.gpu_gib * 2**30 else "does NOT fit"
        print(f"{est.method}: {fits} in {args.gpu_gib:g} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
