"""Text loading, tokenisation, sequence packing and a deterministic, resumable batch stream.

Sources (``TrainConfig.train_data`` / ``eval_old`` / ``eval_new`` entries):

* a text file (UTF-8; invalid bytes are replaced by U+FFFD with a warning naming the file),
* a directory (every ``*.txt`` file below it, sorted),
* ``builtin:fortunes`` / ``builtin:bible`` (see :mod:`.corpora`),
* ``hf:NAME[:SPLIT[:COLUMN]]``: a Hugging Face ``datasets`` dataset available offline (cache or local).

Documents are tokenised without special tokens, joined with the EOS token and cut into ``(n, seq_len)``
sequences (the incomplete tail is dropped). Empty files are skipped with a warning; a source with no text,
or too little text for one sequence, raises ``ValueError`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .corpora import BUILTIN_CORPORA

Tensor = torch.Tensor


def read_text_file(path: str | Path) -> str:
    """Read a text file as UTF-8; invalid bytes become U+FFFD (with a warning naming the file)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        warnings.warn(
            f"{path}: not valid UTF-8 (first bad byte at offset {e.start}); "
            f"{text.count(chr(0xFFFD))} invalid byte sequence(s) replaced by U+FFFD",
            stacklevel=2,
        )
        return text


def _hf_documents(spec: str) -> list[str]:
    parts = spec.split(":")
    parts += ["train", "text"][len(parts) - 2:] if len(parts) < 4 else []
    name, split, column = parts[1], parts[2], parts[3]
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{spec!r} needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise ValueError(f"{spec!r}: dataset has no column {column!r} (columns: {ds.column_names})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def load_documents(sources: Iterable[str]) -> list[str]:
    """All non-empty documents of the given sources (file = one document, builtins = many)."""
    docs: list[str] = []
    for source in sources:
        found = _source_documents(str(source))
        if not found:
            raise ValueError(f"data source {source!r} contains no text")
        docs.extend(found)
    if not docs:
        raise ValueError("no data source given")
    return docs


def _source_documents(source: str) -> list[str]:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown builtin corpus {name!r}; known: {sorted(BUILTIN_CORPORA)}")
        return BUILTIN_CORPORA[name]()
    if source.startswith("hf:"):
        return _hf_documents(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"data directory {source!r} holds no *.txt file")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"data source {source!r} is neither a file, a directory, builtin:NAME nor hf:NAME")
    docs = []
    for f in files:
        text = read_text_file(f)
        if text.strip():
            docs.append(text)
        else:
            warnings.warn(f"{f}: empty file skipped", stacklevel=2)
    return docs


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: every k-th document (k = round(1/fraction)) goes to eval."""
    if len(docs) < 2:
        raise ValueError(
            f"cannot hold out an eval split from {len(docs)} document(s): give eval_new explicitly "
            "or more documents"
        )
    k = max(2, round(1.0 / eval_fraction))
    if len(docs) < k:  # too few documents for one every k-th: hold out the last one
        return list(docs[:-1]), [docs[-1]]
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    held = [d for i, d in enumerate(docs) if i % k == k - 1]
    return train, held


def pack_documents(docs: Sequence[str], tokenizer, seq_len: int, *, name: str = "data") -> Tensor:
    """Tokenise ``docs``, join them with EOS and cut into a ``(n, seq_len)`` int64 tensor."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (needed to separate packed documents)")
    ids: list[int] = []
    for tokens in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(tokens)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"{name} has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}: "
            "give more text or a smaller seq_len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread_subset(data: Tensor, count: int) -> Tensor:
    """``count`` sequences evenly spread over ``data`` (all of it when it has fewer)."""
    if data.shape[0] <= count:
        return data
    index = torch.linspace(0, data.shape[0] - 1, count).round().long()
    return data[index]


class BatchStream:
    """Shuffled mini-batches of packed sequences, reproducible from ``(seed, epoch, position)``.

    Each epoch is a fresh permutation drawn from ``seed + epoch``; a global batch of
    ``batch_size * world_size`` sequences is taken and rank ``r`` keeps its slice. The incomplete last
    global batch of an epoch is dropped. :meth:`state_dict` / :meth:`load_state_dict` give exact resume.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if data.dim() != 2:
            raise ValueError(f"data must be (n, seq_len), got {tuple(data.shape)}")
        if data.shape[0] < batch_size * world_size:
            raise ValueError(
                f"train data has {data.shape[0]} sequences, fewer than one global batch of "
                f"{batch_size * world_size} (batch_size x world size): give more text or a smaller batch_size"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.data.shape[0], generator=gen)

    def next_batch(self) -> Tensor:
        """``(batch_size, seq_len)`` sequences for this rank."""
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > self.data.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        index = self._perm[self.position : self.position + global_batch]
        self.position += global_batch
        return self.data[index[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data seed {state['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
