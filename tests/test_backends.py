"""Backend selection: automatic choice, forcing by argument / context / env var, clear errors."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import make_operands, triton_usable

import scale_kernels as sk
from scale_kernels import backends, dispatch_table, tune


def _f32():
    return make_operands(lead=(3,), d_in=4, e_in=2, d_out=5, e_out=3).to(torch.float32)


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    sk.upscaled_linear(*_f32().args())
    assert sk.last_backend() == "torch"


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
def test_force_by_context_env_and_argument(monkeypatch):
    ops = _f32()
    with sk.use_backend("triton"):
        sk.upscaled_linear(*ops.args())
        assert sk.last_backend() == "triton"
        sk.upscaled_linear(*ops.args(), backend="torch")  # the argument wins over the context
        assert sk.last_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    sk.upscaled_linear(*ops.args())
    assert sk.last_backend() == "triton"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        with sk.use_backend("cublas"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'cublas'"):
        sk.upscaled_linear(*_f32().args(), backend="cublas")


def test_unbuilt_cuda_backend_is_a_clear_error():
    reason = sk.available_backends("cpu")["cuda"]
    assert reason is not None
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        sk.upscaled_linear(*_f32().args(), backend="cuda")


@pytest.mark.skipif(not triton_usable(), reason="triton backend unavailable")
def test_triton_rejects_fp64_clearly():
    ops = make_operands(lead=(3,), d_in=4, e_in=2, d_out=5, e_out=3)
    with pytest.raises(ValueError, match="float32/float16/bfloat16, got torch.float64"):
        sk.upscaled_linear(*ops.args(), backend="triton")


def test_available_backends_reports_every_backend():
    report = sk.available_backends("cpu", torch.float32)
    assert set(report) == {"torch", "triton", "cuda"} and report["torch"] is None


# ----------------------------------------------------------------------------------------------------------
# per-shape dispatch from measured tables (a fake GPU: the decision logic needs no CUDA)

FAKE_GPU = "Fake GPU 80GB"
CUDA = torch.device("cuda", 0)
SHAPE = (64, 16, 64, 16)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Decisions for CUDA signatures on a fake GPU whose usable backends the test sets (default: all)."""
    usable = set(backends.BACKEND_NAMES)
    monkeypatch.setattr(backends, "_device_name", lambda device: FAKE_GPU)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, d, t: None if name in usable else "not here")
    monkeypatch.setenv(dispatch_table.ENV_VAR, str(tmp_path))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.reload_dispatch_tables()
    yield usable
    backends.reload_dispatch_tables()


def _write_table(folder, entries, **header):
    """entries: (tokens, {backend: ms}) for SHAPE, bf16, adapt (W12, no route), train."""
    table = {**dispatch_table.new_table(FAKE_GPU, "do_bench"), **header}
    key = dispatch_table.EntryKey("bfloat16", *SHAPE, True, False, "train")
    table["entries"] = [dispatch_table.entry(key, t, ms, {}) for t, ms in entries]
    dispatch_table.write(table, folder / "table.json")
    backends.reload_dispatch_tables()


def _sig(tokens: int, shape=SHAPE, has_route=False) -> backends.CallSignature:
    return backends.CallSignature(CUDA, torch.bfloat16, backends.token_bucket(tokens), *shape, True, has_route, True)


def test_table_picks_the_fastest_usable_backend(fake_gpu, tmp_path):
    _write_table(tmp_path, [(4096, {"torch": 1.0, "triton": 0.8, "cuda": 0.7})])
    decision = backends.decide(None, _sig(4096))
    assert (decision.backend, decision.source) == ("cuda", "table")
    assert decision.measured and decision.measured[0].tokens == 4096 and "1.43x" in decision.reason
    fake_gpu.discard("cuda")  # the extension is not built here: never chosen, whatever the table says
    backends.reload_dispatch_tables()
    assert backends.decide(None, _sig(4096)).backend == "triton"


@pytest.mark.parametrize(
    "times",
    [
        {"torch": 1.0, "triton": 1.5},  # slower
        {"torch": 1.0, "triton": 0.99},  # faster by less than MIN_SPEEDUP: within timing noise
        {"triton": 0.5},  # no baseline time: nothing to compare against
    ],
    ids=["slower", "marginal", "no_baseline"],
)
def test_a_fused_backend_not_clearly_faster_than_the_baseline_is_never_chosen(fake_gpu, tmp_path, times):
    _write_table(tmp_path, [(4096, times)])
    decision = backends.decide(None, _sig(4096))
    assert (decision.backend, decision.source) == ("torch", "table")


def test_nearest_token_counts_decide_and_far_ones_do_not(fake_gpu, tmp_path):
    _write_table(
        tmp_path,
        [
            (16, {"torch": 1.0, "triton": 0.5}),
            (64, {"torch": 1.0, "triton": 2.0}),
            (4096, {"torch": 1.0, "triton": 0.5}),
        ],
    )
    assert backends.decide(None, _sig(9)).backend == "triton"  # bucket 16: measured there
    assert backends.decide(None, _sig(3)).backend == "triton"  # bucket 4: 16 is 2 log2 steps away
    # bucket 32: 16 and 64 are equally near; triton loses at 64, so the composed path runs
    assert [m.tokens for m in backends.decide(None, _sig(32)).measured] == [16, 64]
    assert backends.decide(None, _sig(32)).backend == "torch"
    assert backends.decide(None, _sig(2048)).backend == "triton"
    far = backends.decide(None, _sig(1 << 20))  # 8 log2 steps from 4096: not covered
    assert (far.backend, far.source) == ("torch", "heuristic") and not far.measured


def test_other_shape_mode_or_versions_fall_back_to_the_heuristic(fake_gpu, tmp_path):
    _write_table(tmp_path, [(4096, {"torch": 1.0, "triton": 0.5})])
    assert backends.decide(None, _sig(4096, shape=(64, 16, 64, 8))).source == "heuristic"
    assert backends.decide(None, _sig(4096, has_route=True)).source == "heuristic"
    _write_table(tmp_path, [(4096, {"torch": 1.0, "triton": 0.5})], torch="1.0")
    decision = backends.decide(None, _sig(4096))
    assert (decision.backend, decision.source) == ("torch", "heuristic")
    assert "ignored" in decision.reason and "python -m scale_kernels.tune" in decision.reason


def test_without_any_table_cuda_calls_get_the_composed_path(fake_gpu):
    decision = backends.decide(None, _sig(4096))
    assert (decision.backend, decision.source) == ("torch", "heuristic")
    assert "no dispatch table" in decision.reason and str(decision).startswith("backend 'torch' (heuristic)")


def test_compile_time_choice_ignores_sizes_and_needs_a_win_everywhere(fake_gpu, tmp_path):
    """Under torch.compile sizes may be symbolic: the choice uses every entry of the call's dtype and flags."""
    _write_table(tmp_path, [(16, {"torch": 1.0, "triton": 0.5}), (4096, {"torch": 1.0, "triton": 0.9})])
    assert backends.resolve_backend(None, CUDA, torch.bfloat16, True, False, True) == "triton"
    _write_table(tmp_path, [(16, {"torch": 1.0, "triton": 0.5}), (4096, {"torch": 1.0, "triton": 1.1})])
    assert backends.resolve_backend(None, CUDA, torch.bfloat16, True, False, True) == "torch"


def test_malformed_tables_are_reported_and_skipped(fake_gpu, tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    tables, notes = dispatch_table.tables_for(FAKE_GPU)
    assert tables == () and len(notes) == 2
    decision = backends.decide(None, _sig(4096))
    assert decision.source == "heuristic" and "broken.json" in decision.reason
    good = dispatch_table.new_table(FAKE_GPU, "do_bench")
    with pytest.raises(ValueError, match="version"):
        dispatch_table.validate({**good, "version": 99})
    bad_entry = {**good, "entries": [{"dtype": "bfloat16", "tokens": 4}]}
    with pytest.raises(ValueError, match="entry 0 is malformed"):
        dispatch_table.validate(bad_entry)


def test_forcing_beats_the_table_argument_first(fake_gpu, tmp_path, monkeypatch):
    _write_table(tmp_path, [(4096, {"torch": 1.0, "triton": 0.5})])
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert backends.decide(None, _sig(4096))[:2] == ("cuda", "env")
    with sk.use_backend("torch"):
        assert backends.decide(None, _sig(4096))[:2] == ("torch", "use_backend")
        assert backends.decide("auto", _sig(4096))[:2] == ("triton", "table")
        assert backends.decide("cuda", _sig(4096))[:2] == ("cuda", "argument")
    fake_gpu.discard("cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call: not here"):
        backends.decide(None, _sig(4096))


def test_token_bucket():
    assert [backends.token_bucket(m) for m in (0, 1, 2, 3, 16, 17, 4096, 5000)] == [0, 1, 2, 4, 16, 32, 4096, 8192]


def test_explain_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    ops = _f32()
    decision = sk.explain_dispatch(*ops.args())
    assert (decision.backend, decision.source) == ("torch", "heuristic") and "cpu tensors" in decision.reason
    assert decision.signature.train and decision.signature.tokens == 4 and decision.signature.d_in == 4
    with torch.no_grad():
        assert not sk.explain_dispatch(*ops.args()).signature.train
    assert sk.explain_dispatch(*ops.args(), backend="torch").source == "argument"


# ----------------------------------------------------------------------------------------------------------
# state is per thread / task (context variables)


def test_forced_backend_and_last_backend_are_per_thread(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    inside = threading.Barrier(2)
    seen = {}

    def forcing_thread():
        with sk.use_backend("cuda"):
            inside.wait()  # the main thread looks while this block is open
            inside.wait()
        seen["thread_last_at_start"] = sk.last_backend()
        sk.upscaled_linear(*_f32().args(), backend="torch")
        seen["thread_last"] = sk.last_backend()

    backends.record_backend("triton")  # stands for an earlier call in the main thread
    worker = threading.Thread(target=forcing_thread)
    worker.start()
    inside.wait()
    seen["main_requested"] = backends.requested_backend()
    inside.wait()
    worker.join()
    assert seen == {"main_requested": ("auto", "auto"), "thread_last_at_start": None, "thread_last": "torch"}
    assert sk.last_backend() == "triton"


# ----------------------------------------------------------------------------------------------------------
# python -m scale_kernels.tune (the plumbing, on CPU)


def test_tune_writes_a_table_the_dispatcher_reads(tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = ["--device", "cpu", "--shape", "8,4,6,2", "--tokens", "3", "--modes", "route", "--backends", "torch"]
    assert tune.main([*argv, "--out", str(out)]) == 0
    table = dispatch_table.validate(json.loads(out.read_text()))
    assert table["complete"] and table["device_name"] == "cpu" and len(table["entries"]) == 2
    assert {e["pass"] for e in table["entries"]} == {"forward", "train"}
    assert all(e["route"] and e["w12"] and e["ms"]["torch"] > 0 for e in table["entries"])
    assert "2/2" in capsys.readouterr().err
    partial = tune.tune([(8, 4, 6, 2)], [3], device="cpu", dtype=torch.float32, out=out, time_budget_s=0, log=print)
    assert not json.loads(partial.read_text())["complete"]
    with pytest.raises(SystemExit):
        tune.main(["--shape", "8,4,6"])


def test_shapes_of_a_model():
    lin = sk.ScaleLinear(6, 7, extra_in=4, extra_out=3, mode="adapt")
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), sk.ScaleLinear(6, 7, 4, 3), sk.ScaleLinear(10, 2, 0, 5))
    assert tune.shapes_of(model) == [(6, 4, 7, 3), (10, 0, 2, 5)]
