"""Distributed training of a tiny upscaled model: DDP and FSDP2 (``fully_shard``) on 2 CPU processes (gloo).

One ``torchrun`` launch (bounded by a timeout) runs tests/distributed_worker.py, which trains with DDP and then
with FSDP2, each rank on half of the global batch. Checked here against single-process training on the full
batch:

* the first-step expansion gradients and the expansion parameters after training match. Tolerance: both
  average the same per-token losses, only the order of the fp32 sums differs (the all-reduce / reduce-scatter
  adds two half-batch gradients), ~1e-7 relative; 1e-5 relative + 1e-7 absolute leaves margin while a
  missing average (a factor 2) or a lost rank's gradient is off by O(1);
* every frozen parameter is bit-identical to its initial value on every rank and never gets a gradient;
* under FSDP2 the op receives plain (all-gathered, unsharded) tensors, never DTensor shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scale_kernels as sk

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 150
HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = pytest.mark.skipif(
    not HAS_GLOO or not hasattr(sk, "upscale_model"),
    reason="needs torch.distributed with gloo and the module layer (scale_kernels.upscale_model)",
)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "SCALE_KERNELS_BACKEND": "torch",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(TESTS / "distributed_worker.py"), str(out)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process training did not finish in {TIMEOUT_S} s:\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single_process():
    """The same training on one process over the full global batch."""
    sys.path.insert(0, str(TESTS))
    import distributed_worker as w

    with sk.use_backend("torch"):
        torch.manual_seed(0)
        model = w.build_model()
        named = list(model.named_parameters())
        first = w.train(model, [w.global_batch(s) for s in range(w.STEPS)], named)
    return {"first_grads": first, "params": {n: p.detach() for n, p in named if p.requires_grad and p.numel()}}


STRATEGIES = ["ddp", "fsdp2"]


def _result(results: dict, strategy: str) -> dict:
    if results[strategy] is None:
        pytest.skip(f"{strategy}: torch.distributed.fsdp.fully_shard is not available in torch {torch.__version__}")
    return results[strategy]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expansion_grads_and_params_match_single_process(distributed_results, single_process, strategy):
    res = _result(distributed_results, strategy)
    for key in ("first_grads", "params"):
        assert res[key].keys() == single_process[key].keys() and len(res[key]) > 0
        for name, ref in single_process[key].items():
            torch.testing.assert_close(res[key][name], ref, rtol=1e-5, atol=1e-7, msg=f"{strategy} {key} {name}")
    # the expansion really trained (W12 starts at 0 and must have moved), so the comparison is not vacuous
    assert any("weight_12" in n and p.abs().max() > 0 for n, p in res["params"].items())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_weights_untouched_and_identical_on_every_rank(distributed_results, strategy):
    res = _result(distributed_results, strategy)
    assert len(res["ranks"]) == 2
    for rank, info in enumerate(res["ranks"]):
        assert info["frozen_ok"] and all(info["frozen_ok"].values()), (rank, info["frozen_ok"])
        assert info["frozen_no_grad"], f"rank {rank}: a frozen parameter got a gradient"
    assert res["ranks"][0]["frozen_ok"].keys() == res["ranks"][1]["frozen_ok"].keys()


def test_fsdp2_op_sees_unsharded_plain_tensors(distributed_results):
    res = _result(distributed_results, "fsdp2")
    for info in res["ranks"]:
        assert info["op_inputs"] and not any(t.startswith("DTensor") for t in info["op_inputs"]), info["op_inputs"]
