"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc-per-node=2`` (gloo, CPU).

Trains a tiny upscaled Llama (helpers_upscale) for a few SGD steps with DDP and then with FSDP2
(``fully_shard``); each rank trains on its half of the global batch. Rank 0 saves, with ``torch.save`` to
``argv[1]``: per strategy, the first-step expansion gradients and the final expansion parameters (full
tensors), and from every rank: whether each frozen parameter is bit-identical to its initial value and has
``grad is None``, and the tensor types the op received during forward.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from helpers_upscale import base_model, upscaled
from torch.nn.parallel import DistributedDataParallel

import scale_kernels as sk

STEPS = 3
LR = 0.1
GLOBAL_BATCH = 4
SEQ = 6
VOCAB = 100


def build_model() -> torch.nn.Module:
    """The same tiny upscaled model on every rank (and in the single-process reference)."""
    return upscaled(base_model("llama"), mode="adapt").train()


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def train(model: torch.nn.Module, batches, named_params) -> dict:
    """SGD over the trainable parameters; returns the first-step gradients (as full tensors)."""
    opt = torch.optim.SGD([p for _, p in named_params if p.requires_grad], lr=LR)
    first = {}
    for step, ids in enumerate(batches):
        model(ids, labels=ids).loss.backward()
        if step == 0:
            first = {n: full(p.grad) for n, p in named_params if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return first


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to a plain tensor; plain tensors as they are."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _record_op_inputs(model: torch.nn.Module, seen: set[str]) -> None:
    def hook(module, args):
        for t in (args[0], module.weight, module.weight_21):
            seen.add(f"{type(t).__name__}{tuple(t.shape)}" if type(t).__name__ == "DTensor" else type(t).__name__)

    for m in model.modules():
        if isinstance(m, sk.ScaleLinear):
            m.register_forward_pre_hook(hook)


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def run_strategy(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build_model()
    frozen_init = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen: set[str] = set()
    _record_op_inputs(model, seen)
    if name == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        wrapped = _fsdp2(model)
    shard = GLOBAL_BATCH // world
    batches = [global_batch(s)[rank * shard : (rank + 1) * shard] for s in range(STEPS)]
    named = list(model.named_parameters())
    first_grads = train(wrapped, batches, named)
    params = {n: full(p) for n, p in named}
    frozen_ok = {n: torch.equal(params[n], frozen_init[n]) for n in frozen_init}
    frozen_no_grad = all(p.grad is None for n, p in named if n in frozen_init)
    per_rank = {"frozen_ok": frozen_ok, "frozen_no_grad": frozen_no_grad, "op_inputs": sorted(seen)}
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, per_rank)
    trainable = {n: params[n] for n, p in named if p.requires_grad}
    return {"first_grads": first_grads, "params": trainable, "ranks": gathered}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    for strategy in ("ddp", "fsdp2"):
        if strategy == "fsdp2" and not _has_fully_shard():
            results[strategy] = None
            continue
        results[strategy] = run_strategy(strategy, rank, world)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main(sys.argv[1])
