"""Benchmarks: FLOP/shape bookkeeping, baseline correctness, timing, ratios, targets, and every script run
end to end in smoke mode on tiny CPU shapes (the numbers of a smoke run are not checked, only their form)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import scale_kernels
from benchmarks import bench_layer, bench_model, report, targets
from benchmarks.cases import MODES, PASSES, LayerCase, dense_flops, equal_flop_gemm_shape, layer_cases
from benchmarks.impls import DENSE, GEMM, HANDWRITTEN, build_workload, usable_backends
from benchmarks.layers import DenseLinear, FusedUpscaledLinear, HandWrittenUpscaledLinear
from benchmarks.results import comparisons, default_out_dir, failure_status, merge_results, new_results, save
from benchmarks.schema import SCHEMA, impl_backend, load_json, package_impl
from benchmarks.timing import SMOKE_TIMER, TimerConfig, Timing, measure, peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
HAS_UPSCALE = getattr(scale_kernels, "upscale_model", None) is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None  # the optional extra "bench" installs both
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed (extra 'bench')")
CPU = torch.device("cpu")
SMOKE_BASELINES = (HANDWRITTEN, DENSE, GEMM)


# ----------------------------------------------------------------------------------------------- cases
def test_flops_match_hand_count():
    # d=8, e=2, T=3: preserve multiplies W (64) + W21 (16) + W22 (4) = 84 entries; adapt adds W12 (16)
    pre, ada = LayerCase(3, 8, 2, "preserve"), LayerCase(3, 8, 2, "adapt")
    assert pre.forward_flops() == 2 * 3 * 84
    assert ada.forward_flops() == 2 * 3 * 100
    # backward = dx (same as forward) + dW21, dW22 (20 entries) [+ dW12 (16)]; dW is never computed
    assert pre.backward_flops() == 2 * 3 * (84 + 20)
    assert ada.flops("train_step") == 2 * 3 * (100 + 100 + 36)
    assert dense_flops(pre, "train_step") == 3 * 2 * 3 * 100
    with pytest.raises(ValueError, match="pass must be one of"):
        pre.flops("step")


def test_equal_flop_gemm_is_within_rounding_of_the_layer():
    case = LayerCase(16384, 4096, 1024, "preserve")
    m, n, k = equal_flop_gemm_shape(case)
    assert (m, n) == (16384, 5120) and k % 8 == 0
    assert abs(2 * m * n * k - case.forward_flops()) <= 2 * m * n * 4  # K off by at most half a step of 8
    adapt = LayerCase(64, 64, 16, "adapt")  # the full 2x2 block: exactly the dense GEMM
    assert equal_flop_gemm_shape(adapt) == (64, 80, 80)


def test_case_grid_and_phases():
    full = layer_cases(smoke=False)
    assert len(full) == 4 * 3  # d=4096 x T in {16384, 4096, 16, 1} x 3 modes, targets' shape first
    assert {(c.d, c.e) for c in full} == {(4096, 1024)} and full[0].tokens == 16384
    assert {c.tokens for c in full if c.phase == "decode"} == {1, 16}
    assert all(c.tokens >= 4096 for c in full if c.phase == "prefill")
    assert layer_cases(smoke=True, tokens=(5,), modes=("route",)) == [LayerCase(5, 32, 8, "route")]
    with pytest.raises(ValueError, match="mode must be one of"):
        LayerCase(4, 8, 2, "wide")


# ------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("mode", MODES)
def test_package_and_handwritten_layers_compute_the_same(mode):
    case = LayerCase(9, 16, 4, mode)
    torch.manual_seed(0)
    hand = HandWrittenUpscaledLinear(case.d, case.e, case.has_w12, dtype=torch.float64)
    torch.manual_seed(0)
    fused = FusedUpscaledLinear(case.d, case.e, case.has_w12, "torch", dtype=torch.float64)
    x = torch.randn(case.tokens, case.d + case.e, dtype=torch.float64, requires_grad=True)
    route = torch.tensor([True, False] * 4 + [True]) if mode == "route" else None
    y_hand, y_fused = hand(x, route), fused(x, route)
    torch.testing.assert_close(y_fused, y_hand, rtol=1e-12, atol=1e-12)
    y_hand.sum().backward()
    y_fused.sum().backward()
    assert hand.weight.grad is None and fused.weight.grad is None  # the frozen W never gets a gradient
    for p_hand, p_fused in zip(hand.parameters(), fused.parameters(), strict=True):
        if p_hand.requires_grad:
            torch.testing.assert_close(p_fused.grad, p_hand.grad, rtol=1e-12, atol=1e-12)


def test_dense_baseline_is_fully_trainable():
    dense = DenseLinear(10)
    assert all(p.requires_grad for p in dense.parameters())
    assert dense(torch.randn(3, 10), route=None).shape == (3, 10)


def test_build_workload_shapes_and_errors():
    case = LayerCase(4, 16, 4, "route")
    gemm = build_workload(GEMM, case, CPU, torch.float32)
    assert gemm.passes == ("forward",) and gemm.x.shape[0] == 4
    fused = build_workload(package_impl("torch"), case, CPU, torch.float32)
    assert fused.passes == PASSES and fused.route.dtype == torch.bool and fused.dy.shape == (4, 20)
    with pytest.raises(ValueError, match="unknown implementation"):
        build_workload("fast", case, CPU, torch.float32)


# ------------------------------------------------------------------------------------------------ timing
def test_timing_quantiles_are_torch_quantile_linear():
    t = Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs) == pytest.approx((3.0, 1.8, 4.2, 5))
    with pytest.raises(ValueError):
        Timing.from_samples([])


def test_measure_runs_warmup_plus_iters_and_resets_grads():
    p = torch.zeros(2, requires_grad=True)
    seen = []

    def fn():
        seen.append(p.grad)
        p.grad = torch.ones(2)

    timing = measure(fn, CPU, TimerConfig(warmup=2, iters=3), grad_to_none=[p])
    assert len(seen) == 5 and all(g is None for g in seen) and timing.runs == 3
    assert measure(lambda: None, CPU, SMOKE_TIMER).runs == 1
    assert peak_memory_mb(lambda: None, CPU) is None  # never a made-up memory number on CPU


# ------------------------------------------------------------------------------------- ratios and targets
def _rec(impl, case, median, **extra):
    return {"case": case, "pass": "train_step", "impl": impl, "status": "ok", "median_ms": median, **extra}


def test_comparisons_ratios():
    case = {"tokens": 1}
    recs = [
        _rec("scale_kernels[triton]", case, 2.0, tflops=30.0, peak_mem_mb=50.0),
        _rec("handwritten", case, 3.0, tflops=20.0, peak_mem_mb=100.0),
        _rec("dense_linear", case, 2.5, tflops=40.0, peak_mem_mb=None),
        _rec("handwritten", {"tokens": 2}, 1.0),  # another case: not compared
        {**_rec("equal_flop_gemm", case, 1.0), "status": "oom"},
    ]  # failed: not compared
    comps = {c["baseline"]: c for c in comparisons(recs)}
    assert set(comps) == {"handwritten", "dense_linear"}
    assert comps["handwritten"]["speedup"] == pytest.approx(1.5)
    assert comps["handwritten"]["mem_ratio"] == pytest.approx(0.5)
    assert comps["dense_linear"]["throughput_ratio"] == pytest.approx(0.75)
    assert comps["dense_linear"]["mem_ratio"] is None


def _layer_payload(device_name, speedup, value_case=None):
    case = value_case or {"tokens": 16384, "d": 4096, "e": 1024, "mode": "adapt"}
    comp = {
        "case": case,
        "pass": "train_step",
        "impl": "scale_kernels[auto]",
        "baseline": "handwritten",
        "speedup": speedup,
        "throughput_ratio": speedup,
        "mem_ratio": None,
    }
    triton_comp = {**comp, "impl": "scale_kernels[triton]", "speedup": 0.1}  # single backends: informative only
    return {
        "kind": "layer",
        "smoke": False,
        "env": {"device": "cuda", "device_name": device_name},
        "settings": {"dtype": "bfloat16"},
        "records": [{"case": case, "pass": "train_step", "impl": "scale_kernels[auto]", "ran_backend": "torch"}],
        "comparisons": [comp, triton_comp],
    }


def test_targets_met_not_met_and_not_evaluated():
    target = next(t for t in targets.TARGETS if t.id == "layer_train_vs_handwritten")
    [met] = targets.evaluate_target(target, _layer_payload("NVIDIA H100 80GB HBM3", 1.21))
    assert met["status"] == "met" and met["on_target_hardware"] and met["impl"] == "scale_kernels[auto]"
    assert met["ran_backend"] == "torch" and met["pass"] == "train_step"
    [miss] = targets.evaluate_target(target, _layer_payload("NVIDIA H200", 1.19))
    assert miss["status"] == "not met" and not miss["on_target_hardware"]
    [absent] = targets.evaluate_target(target, _layer_payload("x", 5.0, {"tokens": 8, "d": 32, "e": 8}))
    assert absent["status"] == "not evaluated" and absent["value"] is None and "reason" in absent
    never_slower = next(t for t in targets.TARGETS if t.id == "layer_never_slower_than_handwritten")
    [row] = targets.evaluate_target(never_slower, _layer_payload("x", 0.97, {"tokens": 8, "d": 32, "e": 8}))
    assert row["status"] == "not met"  # holds for every benchmarked case, not only the targets' shapes
    [smoke] = targets.evaluate_target(target, {**_layer_payload("NVIDIA H100", 1.3), "smoke": True})
    assert smoke["status"] == "not evaluated" and "smoke" in smoke["reason"]
    mem = next(t for t in targets.TARGETS if t.id == "model_memory_vs_full_ft")
    payload = {
        "kind": "model",
        "env": {"device": "cuda", "device_name": "H100"},
        "settings": {"dtype": "bfloat16"},
        "comparisons": [
            {
                "case": {},
                "pass": "train_step",
                "impl": "scale_kernels[auto]",
                "baseline": "full_ft",
                "speedup": 1.0,
                "throughput_ratio": 1.0,
                "mem_ratio": 0.61,
            }
        ],
    }
    assert targets.evaluate_target(mem, payload)[0]["status"] == "not met"  # <= 0.6 needed


def test_target_summary():
    rows = [
        {"id": "a", "status": "met"},
        {"id": "a", "status": "not met"},
        {"id": "b", "status": "met"},
        {"id": "c", "status": "met"},
        {"id": "c", "status": "not evaluated"},
        {"id": "d", "status": "not evaluated"},
    ]
    assert targets.summary(rows) == {"a": "not met", "b": "met", "c": "incomplete", "d": "not evaluated"}


def test_result_helpers():
    assert impl_backend(package_impl("triton")) == "triton" and impl_backend("handwritten") is None
    assert failure_status(torch.cuda.OutOfMemoryError("x")) == "oom"
    assert failure_status(ValueError("bad\nmore")) == "error: ValueError: bad"
    assert default_out_dir({"device": "cpu", "device_name": "CPU: x"}, smoke=True).name == "cpu-smoke"
    reasons = usable_backends(CPU, torch.float32, ["auto", "torch", "triton", "cuda", "nope"])
    assert reasons["torch"] is None and reasons["nope"] == "unknown backend 'nope'"
    assert reasons["auto"] is None and "auto" not in usable_backends(CPU, torch.float32)  # auto: only when asked
    assert all(str(ROOT) not in (r or "") for r in reasons.values())  # no local paths in result files
    gpu = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    assert default_out_dir(gpu, smoke=False).name == "nvidia-h100-80gb-hbm3"


def test_merge_results_for_chunked_runs(tmp_path):
    old = new_results("layer", True, CPU, {"dtype": "float32"})
    new = new_results("layer", True, CPU, {"dtype": "float32"})
    old["records"] = [_rec("handwritten", {"t": 1}, 1.0), _rec("scale_kernels[torch]", {"t": 1}, 2.0)]
    new["records"] = [_rec("handwritten", {"t": 1}, 4.0), _rec("handwritten", {"t": 2}, 3.0)]
    path = save(old, tmp_path / "layer.json", append=True)  # nothing there yet: simply written
    assert load_json(path)["records"] == old["records"]
    merged = load_json(save(new, path, append=True))
    medians = {(r["impl"], r["case"]["t"]): r["median_ms"] for r in merged["records"]}
    assert medians == {("handwritten", 1): 4.0, ("scale_kernels[torch]", 1): 2.0, ("handwritten", 2): 3.0}
    assert len(merged["env"]["runs"]) == 2
    assert [c["speedup"] for c in merged["comparisons"]] == [2.0]  # recomputed from the merged records
    assert load_json(save(new, path))["records"] == new["records"]  # without append: overwritten
    other = {**new, "env": {**new["env"], "device_name": "NVIDIA H100"}}
    with pytest.raises(ValueError, match="cannot merge"):
        merge_results(old, other)


# ------------------------------------------------------------------------------------ scripts, end to end
@pytest.fixture(scope="module")
def layer_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layer") / "layer.json"
    # preserve (no W12) and route (W12 + mask) cover every code path; adapt adds only time
    # (the compiled baseline has its own test below: compiling every case would dominate the test time)
    argv = ["--smoke", "--out", str(out), "--modes", "preserve", "route", "--baselines", *SMOKE_BASELINES]
    assert bench_layer.main(argv) == 0
    return out


def test_bench_layer_smoke_runs_every_case(layer_json):
    payload = load_json(layer_json)
    assert payload["schema"] == SCHEMA and payload["smoke"] and "CPU SMOKE RUN" in payload["label"]
    assert payload["env"]["device_name"] and payload["env"]["torch"] == torch.__version__
    bad = [(r["impl"], r["pass"], r["status"]) for r in payload["records"] if r["status"] != "ok"]
    assert not bad
    impls = {r["impl"] for r in payload["records"]}
    usable = {package_impl(b) for b, why in usable_backends(CPU, torch.float32).items() if why is None}
    assert set(SMOKE_BASELINES) | usable <= impls  # every backend available_backends() allows (triton: interpreter)
    for rec in payload["records"]:
        assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"] and rec["tflops"] > 0
        assert rec["peak_mem_mb"] is None  # CPU
    n_cases = len(layer_cases(smoke=True, modes=("preserve", "route")))
    assert len(payload["comparisons"]) == n_cases * (3 + 3 + 1) * len(
        [i for i in impls if i.startswith("scale_kernels[")]
    )  # the GEMM has a forward only
    assert {t["status"] for t in payload["targets"]} == {"not evaluated"}  # a smoke run is no measurement
    auto = [r for r in payload["records"] if r["impl"] == "scale_kernels[auto]"]
    assert auto and all(r["ran_backend"] == "torch" for r in auto)  # the per-shape choice on CPU


def test_bench_layer_inductor_baseline_one_case(tmp_path):
    out = tmp_path / "layer.json"
    argv = [
        "--smoke",
        "--out",
        str(out),
        "--tokens",
        "4",
        "--modes",
        "route",
        "--passes",
        "train_step",
        "--backends",
        "torch",
        "--baselines",
        "handwritten_compiled",
    ]
    bench_layer.main(argv)
    [rec] = [r for r in load_json(out)["records"] if r["impl"] == "handwritten_compiled"]
    assert rec["status"] == "ok"


@needs_matplotlib
def test_plot_writes_pngs(layer_json, tmp_path):
    from benchmarks import plot

    written = plot.plot_file(layer_json, tmp_path)
    names = {p.name for p in written}
    assert names == {"layer_forward.png", "layer_backward.png", "layer_train_step.png", "layer_speedup.png"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


@pytest.fixture(scope="module")
def model_payload(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model") / "model.json"
    variants = ["full_ft", "upscaled"] + (["lora"] if HAS_PEFT else [])
    argv = ["--smoke", "--out", str(out), "--mode", "route", "--backends", "torch", "--variants", *variants]
    assert bench_model.main(argv) == 0
    return load_json(out)


def test_bench_model_smoke_baselines(model_payload):
    recs = {(r["impl"], r["case"]["gradient_checkpointing"]): r for r in model_payload["records"]}
    impls = ("full_ft", "lora") if HAS_PEFT else ("full_ft",)
    for impl in impls:
        for ckpt in (False, True):
            assert recs[(impl, ckpt)]["status"] == "ok" and recs[(impl, ckpt)]["tokens_per_s"] > 0
    full = recs[("full_ft", False)]
    assert full["trainable_params"] == full["total_params"]
    if not HAS_PEFT:
        pytest.skip("peft not installed (extra 'bench'): the LoRA baseline was not run")
    lora = recs[("lora", False)]
    assert 0 < lora["trainable_params"] < lora["total_params"]


def test_bench_model_smoke_upscaled(model_payload):
    recs = [r for r in model_payload["records"] if r["impl"] in ("handwritten_upscaled", "scale_kernels[torch]")]
    assert len(recs) == 4
    if not HAS_UPSCALE:
        assert all(r["status"].startswith("skipped: scale_kernels.upscale_model") for r in recs)
        pytest.skip("scale_kernels.upscale_model is not available: upscaled variants were skipped (recorded)")
    assert all(r["status"] == "ok" for r in recs), [r["status"] for r in recs]
    full = next(r for r in model_payload["records"] if r["impl"] == "full_ft")
    # only the expansion trains: the frozen parameters are exactly the base model's
    assert all(r["total_params"] - r["trainable_params"] == full["total_params"] for r in recs)
    baselines = ("full_ft", "handwritten_upscaled") + (("lora",) if HAS_PEFT else ())
    assert {(c["impl"], c["baseline"]) for c in model_payload["comparisons"]} == {
        ("scale_kernels[torch]", b) for b in baselines
    }


@pytest.mark.skipif(not HAS_UPSCALE, reason="scale_kernels.upscale_model is not available yet")
def test_handwritten_swap_reproduces_the_package_model():
    from benchmarks import model_variants as mv

    spec = mv.ModelSpec(mv.SMOKE_LLAMA, mv.SMOKE_UPSCALE, "route")
    model = mv.build_upscaled(spec, CPU, torch.float32)
    with torch.no_grad():  # make W12 non-zero so the route path matters
        for m in model.modules():
            if isinstance(m, scale_kernels.ScaleLinear) and m.weight_12 is not None:
                m.weight_12.normal_(std=0.05)
    ids = torch.randint(0, spec.base["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "scale_route": mv.route_mask(2, 8, CPU)}
    with torch.no_grad(), scale_kernels.use_backend("torch"):
        want = model(**batch).logits
    n = mv.swap_to_handwritten(model)
    with torch.no_grad():
        got = model(**batch).logits
    assert n > 0 and mv.restore_forward(model) == n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, same math, different op order
    with pytest.raises(RuntimeError, match="no ScaleLinear"):
        mv.swap_to_handwritten(torch.nn.Linear(2, 2))


@needs_matplotlib
def test_bench_step_refuses_a_backend_that_did_not_run():
    from benchmarks import model_variants as mv

    spec = mv.ModelSpec(mv.SMOKE_LLAMA, mv.SMOKE_UPSCALE)
    model = mv.build_base(spec, CPU, torch.float32)  # no ScaleLinear: the package op never runs
    batch = bench_model.make_batch(spec.base["vocab_size"], 1, 4, CPU)
    case = {"gradient_checkpointing": True, "batch_size": 1, "seq_len": 4, "mode": "preserve"}
    fp32 = mv.precision_policy(torch.float32)
    with scale_kernels.use_backend("torch"):  # an earlier call leaves last_backend() == "torch"
        scale_kernels.upscaled_linear(torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    rec = bench_model.bench_step("scale_kernels[torch]", model, batch, "torch", case, CPU, SMOKE_TIMER, fp32)
    assert rec["status"] == "error: RuntimeError: asked for backend 'torch' but None ran"
    for enabled in (True, False):
        mv.set_gradient_checkpointing(model, enabled)
        flag = (
            "is_activation_checkpointing"
            if hasattr(model, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        assert getattr(model, flag) is enabled and model.training
    ok = bench_model.bench_step("full_ft", model, batch, None, case, CPU, SMOKE_TIMER, fp32)
    assert ok["status"] == "ok" and ok["runs"] == 1 and ok["tokens_per_s"] > 0


@pytest.mark.skipif(not HAS_UPSCALE, reason="scale_kernels.upscale_model is not available yet")
def test_a_wrong_handwritten_swap_is_an_error_not_a_number(monkeypatch):
    from benchmarks import model_variants as mv

    right = mv.handwritten_scale_linear_forward
    monkeypatch.setattr(mv, "handwritten_scale_linear_forward", lambda self, x, route=None: 2 * right(self, x, route))
    spec = mv.ModelSpec(mv.SMOKE_LLAMA, mv.SMOKE_UPSCALE)
    batch = bench_model.make_batch(spec.base["vocab_size"], 1, 4, CPU)
    case = {"gradient_checkpointing": False, "batch_size": 1, "seq_len": 4, "mode": "preserve"}
    recs = {
        r["impl"]: r
        for r in bench_model.bench_upscaled(spec, ["torch"], batch, [case], CPU, torch.float32, SMOKE_TIMER)
    }
    assert recs["handwritten_upscaled"]["status"].endswith("(swap is wrong)")
    assert recs["scale_kernels[torch]"]["status"] == "ok"


def test_measure_uses_do_bench_on_cuda(monkeypatch):
    from benchmarks import timing

    calls = []

    def fake_do_bench(fn, **kwargs):
        calls.append(kwargs)
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(timing, "_do_bench", lambda: fake_do_bench)
    p = torch.zeros(1, requires_grad=True)
    cuda = torch.device("cuda")  # only the device type is looked at: no GPU needed
    assert TimerConfig().method(cuda) == "do_bench" and TimerConfig(use_do_bench=False).method(cuda) == "cuda_events"
    assert measure(lambda: None, cuda, TimerConfig(), grad_to_none=[p]) == Timing(2.0, 1.0, 3.0, None)
    assert calls == [{"warmup": 25, "rep": 100, "grad_to_none": [p], "quantiles": [0.5, 0.2, 0.8]}]


def test_run_all_smoke_writes_json_plots_and_markdown(tmp_path):
    from benchmarks import run_all

    argv = [
        "--smoke",
        "--out",
        str(tmp_path),
        "--backends",
        "torch",
        "--layer-args",
        "--tokens 4 --modes adapt --baselines handwritten equal_flop_gemm",
        "--model-args",
        "--variants full_ft --checkpointing off",
    ]
    assert run_all.main(argv) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"layer.json", "model.json", "results.md", "model.png", "layer_forward.png"} <= names
    md = (tmp_path / "results.md").read_text()
    assert "CPU SMOKE RUN" in md and "layer_forward_vs_gemm" in md and "model_memory_vs_full_ft" in md
    assert json.loads((tmp_path / "model.json").read_text())["kind"] == "model"


def test_microbenchmarks_run_once_with_benchmark_disable():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/test_microbench.py",
        "--benchmark-disable",
        "-k",
        "not 512",  # the decode-sized half keeps this short; without -k every case runs
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_run_all_goes_on_without_matplotlib(monkeypatch, tmp_path, capsys):
    import benchmarks
    from benchmarks import run_all

    monkeypatch.delattr(benchmarks, "plot", raising=False)
    monkeypatch.setitem(sys.modules, "benchmarks.plot", None)  # makes `from . import plot` raise ImportError
    assert run_all._plot(tmp_path / "layer.json") == []
    assert "no plots" in capsys.readouterr().err


def test_bench_model_smoke_auto_backend_predictions_and_targets(tmp_path):
    """Model benchmark: scale_kernels[auto], the memory estimator's prediction per record, the 8B status target."""
    out = tmp_path / "model.json"
    argv = ["--smoke", "--out", str(out), "--variants", "full_ft", "upscaled", "--checkpointing", "on"]
    assert bench_model.main(argv) == 0
    payload = load_json(out)
    recs = {r["impl"]: r for r in payload["records"]}
    assert recs["scale_kernels[auto]"]["status"] == "ok" and recs["scale_kernels[auto]"]["ran_backend"] == "torch"
    assert "[ran torch]" in report.render(payload)  # the model table says which backend auto ran
    assert all(r["predicted_peak_mb"] > 0 for r in recs.values())
    ids = {t["id"]: t for t in payload["targets"]}
    assert ids["model_tokens_vs_full_ft"]["status"] == "not evaluated"  # a smoke run is no measurement
    assert ids["model_8b_trains"]["status"] == "not evaluated"
    # the same comparisons judged as a measurement: the model targets are computed from them
    ids = {t["id"]: t for t in targets.evaluate({**payload, "smoke": False})}
    assert ids["model_tokens_vs_full_ft"]["status"] in ("met", "not met")
    assert ids["model_tokens_vs_full_ft"]["ran_backend"] == "torch"
    assert ids["model_memory_vs_full_ft"]["status"] in ("met", "not met", "not evaluated")


def test_model_8b_status_target():
    def payload(pkg_status):
        case = {"shape": "8b", "gradient_checkpointing": True, "batch_size": 1, "seq_len": 4096}
        records = [
            {"case": case, "pass": "train_step", "impl": "full_ft", "status": "oom"},
            {"case": case, "pass": "train_step", "impl": "scale_kernels[auto]", "status": pkg_status},
        ]
        return {"kind": "model", "records": records, "env": {"device_name": "NVIDIA H100"}, "settings": {}}

    (met,) = targets.evaluate_trains(payload("ok"))
    assert met["status"] == "met" and met["reason"] == "full_ft: oom"
    assert targets.evaluate_trains(payload("oom"))[0]["status"] == "not met"


def test_bench_layer_saves_every_finished_case(tmp_path, monkeypatch):
    """With --out the file is rewritten after every case: a run stopped by a timeout keeps what it finished."""
    out = tmp_path / "layer.json"
    real = bench_layer.bench_case
    seen = []

    def stop_at_second_case(case, *args):
        seen.append(case)
        if len(seen) == 2:
            raise KeyboardInterrupt  # stands for `timeout` killing the run
        return real(case, *args)

    monkeypatch.setattr(bench_layer, "bench_case", stop_at_second_case)
    argv = ["--smoke", "--out", str(out), "--tokens", "4", "--modes", "preserve", "route", "--backends", "auto"]
    with pytest.raises(KeyboardInterrupt):
        bench_layer.main([*argv, "--passes", "forward", "--baselines", "handwritten"])
    payload = load_json(out)
    assert {r["case"]["mode"] for r in payload["records"]} == {"preserve"} and payload["comparisons"]


def test_bench_host_smoke(tmp_path):
    from benchmarks import bench_host

    out = tmp_path / "host.json"
    assert bench_host.main(["--smoke", "--modes", "adapt", "--out", str(out)]) == 0
    payload = load_json(out)
    assert payload["kind"] == "host" and payload["settings"]["rounds"] == 3
    assert payload["settings"]["loadavg_before"] is not None and payload["settings"]["torch_threads"] == 1
    recs = {(r["impl"], r["pass"]): r for r in payload["records"]}
    assert set(recs) == {(i, p) for i in ("scale_kernels[auto]", "handwritten") for p in ("forward", "train_step")}
    assert recs[("scale_kernels[auto]", "forward")]["ran_backend"] == "torch"
    [comp] = [c for c in payload["comparisons"] if c["pass"] == "forward"]
    assert comp["time_ratio"] == pytest.approx(1 / comp["speedup"]) and comp["paired_time_ratio"] > 0
    assert len(recs[("handwritten", "forward")]["samples_ms"]) == 3


def test_gpu_check_smoke_runs_every_step_and_packs(tmp_path):
    """benchmarks/gpu_check.sh --smoke: the steps run on tiny CPU shapes, the report and targets are written,
    and OUT gets the tarball and the log (the compiled and model steps have their own smoke tests above)."""
    out, results = tmp_path / "out", tmp_path / "results"
    env = {
        **os.environ,
        "OUT": str(out),
        "RESULTS_DIR": str(results),
        "PYTHON": sys.executable,
        "GPU_CHECK_STEPS": "tests tune layer host",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (results / "gpu_check_summary.md").read_text()
    for step in ("tests | PASS", "tune | PASS", "layer | PASS", "host | PASS", "cuda | SKIPPED", "model | SKIPPED"):
        assert step in summary
    assert "target layer_forward_vs_gemm: not evaluated" in summary  # a smoke run evaluates no target
    assert {p.name for p in out.iterdir()} == {"gpu_check.tar.gz", "gpu_check.log"}
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).relative_to(results.name).as_posix() for n in tar.getnames() if n != results.name}
    assert {"layer.json", "host.json", "dispatch_table.json", "results.md", "logs/tune.log"} <= names
    table = json.loads((results / "dispatch_table.json").read_text())
    assert table["format"] == "scale_kernels.dispatch_table" and table["complete"]


def test_targets_cli_lists_every_target(tmp_path, capsys):
    save({**_layer_payload("NVIDIA H100 80GB HBM3", 1.0), **_results_header("layer")}, tmp_path / "layer.json")
    assert targets.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("target ")] == [
        f"target {t.id}" for t in (*targets.TARGETS, targets.MODEL_8B_TARGET)
    ]
    assert any("model.json" in line for line in lines)  # model targets: no file, not evaluated


def _results_header(kind: str) -> dict:
    return {"schema": SCHEMA, "kind": kind, "label": "test", "targets": []}
