"""The CPT trainer on a tiny random Llama (CPU, torch backend): learning, exact resume, crash-safe
checkpoints, frozen weights, preservation at init, per-group learning rates, the gated head, training with
the route rule, the cached base model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import scale_kernels
from scale_kernels.train import run_checkpoints
from scale_kernels.train import trainer as trainer_module
from scale_kernels.train.base_cache import BaseReference
from scale_kernels.train.config import BASELINE_METHODS, SCALE_METHODS, TrainConfig
from scale_kernels.train.evaluate import autocast_context
from scale_kernels.train.model_loading import load_model_and_tokenizer
from scale_kernels.train.testing import SAMPLE_TEXT, make_tiny_model_dir
from scale_kernels.train.trainer import Trainer, build_data

HAS_PEFT = importlib.util.find_spec("peft") is not None
ALL_METHODS = [
    pytest.param(m, marks=pytest.mark.skipif(m == "lora" and not HAS_PEFT, reason="lora needs peft"))
    for m in SCALE_METHODS + BASELINE_METHODS
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    make_tiny_model_dir(root / "model")
    (root / "old.txt").write_text(SAMPLE_TEXT * 8, encoding="utf-8")
    new_text = "Blessed are the meek, for they shall inherit the earth. " * 40
    (root / "new.txt").write_text(new_text, encoding="utf-8")
    return root


def _cfg(files, tmp_path, **kw) -> TrainConfig:
    base = dict(
        model=str(files / "model"),
        method="full",
        train_data=[str(files / "new.txt")],
        eval_new=[str(files / "new.txt")],
        eval_old=[str(files / "old.txt")],
        seq_len=16,
        batch_size=2,
        steps=6,
        eval_sequences=2,
        lr=1e-2,
        output_dir=str(tmp_path / "run"),
        progress=False,
        backend="torch",
    )
    base.update(kw)
    return TrainConfig(**base).validate()


def _run_existing(trainer: Trainer) -> dict:
    if trainer.cfg.backend:
        with scale_kernels.use_backend(trainer.cfg.backend):
            return trainer.run()
    return trainer.run()


def _run(cfg: TrainConfig) -> tuple[Trainer, dict]:
    trainer = Trainer.from_config(cfg)
    return trainer, _run_existing(trainer)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_learns_preserves_at_init_and_keeps_frozen_weights(files, tmp_path, method):
    cfg = _cfg(
        files,
        tmp_path,
        method=method,
        steps=8,
        lr=2e-2 if method != "full" else 5e-3,
        w12_lr_scale=1.0,
        route_train="adapt",
    )  # the rule in training: tests below
    trainer = Trainer.from_config(cfg)
    model = trainer.setup.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    results = _run_existing(trainer)
    # every method keeps the base model's function at step 0 (fp32, tiny logits ~0.4: 1e-5 is ~1e3 ulp)
    assert results["preservation"]["max_abs_logit_diff"] <= 1e-5
    losses = [x["loss"] for x in results["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    # a routed method may route every token to the (frozen) preservation path: its adaptation path learns
    after = results["after"]["views"]["adapt_path"] if cfg.routed else results["after"]
    assert after["new"]["ppl"] < results["before"]["new"]["ppl"]
    assert results["before"]["old"]["kl_base"] == 0.0 and results["before"]["old"]["top1_base"] == 1.0
    assert after["old"]["kl_base"] > 0.0  # measured against the base model, not the trained one
    if method == "full":  # the base reference keeps its own copy of the (now trained) head
        base, _ = load_model_and_tokenizer(cfg.model)
        with torch.no_grad():
            expected = base(trainer.data.old.ids[:2]).logits
        assert torch.allclose(trainer.base.logits("old", slice(0, 2)), expected, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            assert torch.equal(p.detach(), frozen[name]), f"frozen {name} changed"
    assert any(not torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters() if n in trained)
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "results.json").is_file()
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [0, 8]


class _Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_losses_exactly(files, tmp_path, monkeypatch):
    method = "scale-adapt"
    straight = _run(_cfg(files, tmp_path / "a", method=method, eval_every=3))[1]
    cfg = _cfg(files, tmp_path / "b", method=method, eval_every=3, save_every=3)
    original = Trainer.train_step
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 5:  # dies during step 5: the step-3 checkpoint is the last good one
            raise _Interrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", flaky)
    with pytest.raises(_Interrupt):
        _run(cfg)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = _run(cfg)[1]
    assert resumed["resumed"] is True
    assert [x["loss"] for x in resumed["losses"]] == [x["loss"] for x in straight["losses"]]
    assert [e["new"]["nll"] for e in resumed["evals"]] == [e["new"]["nll"] for e in straight["evals"]]


def test_run_killed_mid_save_leaves_last_good_checkpoint(files, tmp_path, monkeypatch):
    cfg = _cfg(files, tmp_path, method="freeze", save_every=2)
    original = run_checkpoints._write_state
    calls = {"n": 0}

    def dying(path, state):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save dies after the tensors were written
            raise _Interrupt
        original(path, state)

    monkeypatch.setattr(run_checkpoints, "_write_state", dying)
    with pytest.raises(_Interrupt):
        _run(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert list(root.glob(".tmp-step-00000004-*")), "the partial save should be left in its temp folder"
    latest = run_checkpoints.latest_checkpoint(root)
    assert latest is not None and latest.name == "step-00000002"
    step, tensors, state = run_checkpoints.load_checkpoint(latest)
    assert step == 2 and state["data"]["position"] == 4 and len(state["losses"]) == 2 and tensors
    monkeypatch.setattr(run_checkpoints, "_write_state", original)
    resumed = _run(cfg)[1]
    assert resumed["resumed"] and len(resumed["losses"]) == 6
    assert not list(root.glob(".tmp-*")) and [p.name for p in run_checkpoints.complete_checkpoints(root)] == [
        "step-00000004",
        "step-00000006",
    ]


def test_resume_refuses_a_different_configuration(files, tmp_path):
    _run(_cfg(files, tmp_path, method="freeze", steps=2, save_every=1))
    with pytest.raises(ValueError, match="different run configuration.*seq_len"):
        _run(_cfg(files, tmp_path, method="freeze", steps=2, save_every=1, seq_len=8))


def test_training_with_the_rule_from_step_0_is_the_base_model_fixed_point(files, tmp_path):
    """At initialisation both paths agree, so the rule routes every token to the preservation path, which
    (gated head) has nothing to train: no parameter moves. Hence the route warmup (docs/training.md)."""
    trainer = Trainer.from_config(_cfg(files, tmp_path, method="scale-route", route_warmup_steps=0, steps=3))
    start = {n: p.detach().clone() for n, p in trainer.setup.model.named_parameters() if p.requires_grad}
    results = _run_existing(trainer)
    assert all(torch.equal(p, start[n]) for n, p in trainer.setup.model.named_parameters() if n in start)
    assert [x["route_adapt_fraction"] for x in results["losses"]] == [0.0, 0.0, 0.0]
    assert results["after"]["new"]["kl_base"] == 0.0 and results["after"]["new"]["route_adapt_fraction"] == 0.0


def test_route_warmup_then_the_rule_picks_the_trained_tokens(files, tmp_path):
    """The adaptation path trains alone during the route warmup; afterwards the rule's share of targets
    is recorded per step, and only those targets have a loss gradient."""
    cfg = _cfg(files, tmp_path, method="scale-route", steps=6, route_warmup_steps=3, route_tau=0.999999)
    trainer, results = _run(cfg)
    fractions = [x.get("route_adapt_fraction") for x in results["losses"]]
    assert fractions[:3] == [None] * 3 and all(f is not None and f > 0 for f in fractions[3:]), fractions
    setup, ids = trainer.setup, trainer.data.new.ids[:2]
    setup.model.zero_grad(set_to_none=True)
    loss, fraction = setup.training_loss(ids, use_rule=True)
    preserve, adapt = (x.detach() for x in setup._path_logits(ids))
    route = setup.policy.route_from_logits(preserve, adapt)
    assert fraction == pytest.approx(float(route[:, :-1].float().mean()))
    picked = torch.where(route[..., None], adapt, preserve)
    assert float(loss.detach()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(picked[:, :-1].reshape(-1, picked.shape[-1]), ids[:, 1:].reshape(-1))),
        rel=1e-6,
    )


def test_per_group_learning_rates_and_warmup(files, tmp_path):
    cfg = _cfg(
        files,
        tmp_path,
        method="scale-route",
        lr=1e-2,
        w12_lr_scale=0.1,
        head_lr_scale=0.5,
        steps=4,
        warmup_steps=2,
        route_train="adapt",
    )
    trainer = Trainer.from_config(cfg)
    model = trainer.setup.model
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {k: g["initial_lr"] for k, g in groups.items()} == pytest.approx(
        {"expansion": 1e-2, "w12": 1e-3, "head_up": 5e-3}
    )
    assert [names[id(p)] for p in groups["head_up"]["params"]] == ["lm_head.weight_12"]
    w12 = {names[id(p)] for p in groups["w12"]["params"]}
    n_layers = len(model.model.layers)
    expected = {
        f"model.layers.{i}.self_attn.{m}.weight_12"
        for i in range(n_layers - 1, n_layers)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    }  # top quarter (1 of 4 layers), attention
    assert w12 == expected
    assert not any(n.endswith("weight_12") for p in groups["expansion"]["params"] for n in [names[id(p)]])
    assert sum(len(g["params"]) for g in groups.values()) == len(trainer.params)
    results = _run_existing(trainer)
    assert [x["lr"] for x in results["losses"]] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2 * 0.55])
    assert results["details"]["param_group_lrs"] == pytest.approx({"expansion": 1e-2, "w12": 1e-3, "head_up": 5e-3})


@pytest.mark.parametrize("gate_head", [True, False])
def test_gated_head_keeps_the_preservation_path_exactly_the_base_model_after_training(files, tmp_path, gate_head):
    cfg = _cfg(files, tmp_path, method="scale-route", gate_head=gate_head, route_train="adapt", steps=4)
    trainer, _ = _run(cfg)
    model, ids = trainer.setup.model.eval(), trainer.data.old.ids
    assert model.lm_head.weight_12.abs().max() > 1e-3  # the head expansion trained
    base, _ = load_model_and_tokenizer(cfg.model)
    with torch.no_grad():
        preserve, expected = model(ids, scale_route=False).logits, base(ids).logits
    gap = float((preserve - expected).abs().max())
    assert gap <= 1e-5 if gate_head else gap > 1e-3, gap


def test_base_cache_gives_the_base_model_logits_and_is_reused(files, tmp_path):
    cfg = _cfg(files, tmp_path)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = build_data(cfg, tokenizer)
    sets = {"old": data.old, "new": data.new}
    ref = BaseReference.build(model, cfg.model, sets, tmp_path / "cache", batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        expected = model(data.old.ids[1:3]).logits
    assert torch.allclose(ref.logits("old", slice(1, 3)), expected, rtol=0, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("base-hidden-*.pt"))) == 1

    class NoForward(torch.nn.Module):  # a second build must read the file, not run the model
        def get_output_embeddings(self):
            return model.get_output_embeddings()

    again = BaseReference.build(
        NoForward(), cfg.model, sets, tmp_path / "cache", batch_size=2, device=torch.device("cpu")
    )
    assert torch.equal(again.logits("old", slice(1, 3)), ref.logits("old", slice(1, 3)))
    other = {"old": data.old.rows(slice(0, 1)), "new": data.new}  # other data: another file
    BaseReference.build(model, cfg.model, other, tmp_path / "cache", batch_size=2, device=torch.device("cpu"))
    assert len(list((tmp_path / "cache").glob("base-hidden-*.pt"))) == 2


def test_preserve_reports_the_gated_rule_view_and_skips_the_final_save(files, tmp_path):
    results = _run(_cfg(files, tmp_path, method="scale-preserve", steps=2, save_final=False))[1]
    view = results["after"]["views"]["gated_rule"]
    assert set(view) == {"old", "new"} and 0.0 <= view["old"]["route_adapt_fraction"] <= 1.0
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.filterwarnings("error:.*gradient_checkpointing:FutureWarning")
def test_bf16_autocast_and_gradient_checkpointing(files, tmp_path):
    results = _run(
        _cfg(files, tmp_path / "a", method="freeze", precision="bf16", steps=2, gradient_checkpointing=True)
    )[1]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in results["losses"])


def test_scale_methods_train_under_bf16_autocast(files, tmp_path):
    """The SCALE op is autocast-aware: a SCALE run under bf16 autocast trains, close to its fp32 twin, and its
    frozen weights stay fp32 and untouched."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(files, tmp_path / precision, method="scale-route", precision=precision, steps=2)
        trainer = Trainer.from_config(cfg)
        frozen = {n: p.detach().clone() for n, p in trainer.setup.model.named_parameters() if not p.requires_grad}
        losses[precision] = [x["loss"] for x in _run_existing(trainer)["losses"]]
        for name, p in trainer.setup.model.named_parameters():
            if name in frozen:
                assert p.grad is None and p.dtype == torch.float32 and torch.equal(p, frozen[name]), name
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_a_precision_the_device_cannot_run_fails_before_loading_the_model(files, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        Trainer.from_config(_cfg(files, tmp_path, method="freeze", precision="fp16", steps=1))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "an old GPU")
    with pytest.raises(ValueError, match="bf16': an old GPU does not support bf16; use fp16 or fp32"):
        autocast_context(torch.device("cuda"), "bf16")
