"""Text loading, tokenisation, sequence packing and a deterministic, resumable batch stream.

Sources (``TrainConfig.train_data`` / ``eval_old`` / ``eval_new`` entries):

* a text file (UTF-8; invalid bytes are replaced by U+FFFD with a warning naming the file),
* a directory (every ``*.txt`` file below it, sorted),
* ``builtin:NAME`` (``fortunes``, ``bible``, ``bible-es``; see :mod:`.corpora`), optionally with a split:
  ``builtin:NAME/heldout`` keeps every k-th document (k = ``holdout_every``, 20 by default: the same rule
  as the held-out split of ``train_data``), ``builtin:NAME/train`` the others,
* ``hf:NAME[:SPLIT[:COLUMN]]``: a Hugging Face ``datasets`` dataset available offline (cache or local).

Documents are tokenised without special tokens, joined with a *neutral separator* (default ``"\n\n"``, a
paragraph break, tokenised as it appears between two sentences; never the tokenizer's EOS, which for
instruct models is a chat token such as ``<|im_end|>``) and cut into ``(n, seq_len)`` sequences (the
incomplete tail is dropped). :class:`PackedText` keeps, next to the ids, which positions are *boundary*
tokens (a separator token, or the first token of the document after it): evaluation reports perplexity
both over every token and with those targets excluded, so that learning the packing format is not counted
as learning (or forgetting) the domain. Empty files are skipped with a warning; a source with no text, or
too little text for one sequence, raises ``ValueError`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpora import BUILTIN_CORPORA

Tensor = torch.Tensor
SPLITS = ("train", "heldout")
DEFAULT_SEPARATOR = "\n\n"


def source_syntax() -> str:
    """What a data source may be, one form per line (the CLI's ``--help`` shows it)."""
    names = ", ".join(sorted(BUILTIN_CORPORA))
    return "\n".join(
        [
            "PATH                     a UTF-8 text file (one document)",
            "DIR                      every *.txt file below DIR, sorted (one document each)",
            f"builtin:NAME             a bundled corpus ({names}; `scale-cpt setup` installs them)",
            "builtin:NAME/heldout     its held-out documents: every k-th, k = round(1 / eval_fraction) (20)",
            "builtin:NAME/train       the other documents",
            "hf:NAME[:SPLIT[:COLUMN]] a Hugging Face `datasets` dataset available offline (default: train, text)",
        ]
    )


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
    parts += ["train", "text"][len(parts) - 2 :] if len(parts) < 4 else []
    name, split, column = parts[1], parts[2], parts[3]
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{spec!r} needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise ValueError(f"{spec!r}: dataset has no column {column!r} (columns: {ds.column_names})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def load_documents(sources: Iterable[str], holdout_every: int = 20) -> list[str]:
    """All non-empty documents of the given sources (file = one document, builtins = many)."""
    docs: list[str] = []
    for source in sources:
        found = _source_documents(str(source), holdout_every)
        if not found:
            raise ValueError(f"data source {source!r} contains no text")
        docs.extend(found)
    if not docs:
        raise ValueError("no data source given")
    return docs


def _source_documents(source: str, holdout_every: int) -> list[str]:
    if source.startswith("builtin:"):
        name, _, split = source.split(":", 1)[1].partition("/")
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown builtin corpus {name!r}; known: {sorted(BUILTIN_CORPORA)}")
        if split and split not in SPLITS:
            raise ValueError(f"{source!r}: unknown split {split!r}; use builtin:{name}/train or /heldout")
        docs = BUILTIN_CORPORA[name]()
        if not split:
            return docs
        train, held = every_kth_split(docs, holdout_every)
        return held if split == "heldout" else train
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


def holdout_every(eval_fraction: float) -> int:
    """``k`` of the every-k-th held-out split for a held-out fraction (0.05 -> every 20th document)."""
    return max(2, round(1.0 / eval_fraction))


def every_kth_split(docs: Sequence[str], k: int) -> tuple[list[str], list[str]]:
    """``(train, held)``: documents ``k-1, 2k-1, ...`` (every k-th, counting from 1) are held out."""
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    held = [d for i, d in enumerate(docs) if i % k == k - 1]
    return train, held


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: every k-th document (k = round(1/fraction)) goes to eval."""
    if len(docs) < 2:
        raise ValueError(
            f"cannot hold out an eval split from {len(docs)} document(s): give eval_new explicitly or more documents"
        )
    k = holdout_every(eval_fraction)
    if len(docs) < k:  # too few documents for one every k-th: hold out the last one
        return list(docs[:-1]), [docs[-1]]
    return every_kth_split(docs, k)


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The token ids of ``separator`` as the tokenizer writes it *between two sentences*.

    BPE tokenizers merge differently in context (SmolLM2: ``"\n\n"`` alone is one token, but in
    ``". \n\nThe"`` it is two newline tokens), so the separator is cut out of ``"." + separator + "The"``
    when that tokenisation starts with ``"."``'s ids and ends with ``"The"``'s; else it is tokenised alone.
    """
    if not separator:
        raise ValueError("separator must be a non-empty string (documents need a boundary between them)")
    encode = lambda text: tokenizer([text], add_special_tokens=False)["input_ids"][0]
    head, tail, whole = encode("."), encode("The"), encode("." + separator + "The")
    if whole[: len(head)] == head and whole[len(whole) - len(tail) :] == tail and len(whole) > len(head) + len(tail):
        return whole[len(head) : len(whole) - len(tail)]
    return encode(separator)


@dataclass
class PackedText:
    """Packed sequences: ``ids (n, seq_len)`` int64 and ``boundary (n, seq_len)`` bool, True at a separator
    token and at the first token of the document that follows it."""

    ids: Tensor
    boundary: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: Tensor | slice) -> PackedText:
        return PackedText(self.ids[index], self.boundary[index])

    @staticmethod
    def cat(parts: Sequence[PackedText]) -> PackedText:
        return PackedText(torch.cat([p.ids for p in parts]), torch.cat([p.boundary for p in parts]))


def pack_documents(
    docs: Sequence[str], tokenizer, seq_len: int, *, separator: str = DEFAULT_SEPARATOR, name: str = "data"
) -> PackedText:
    """Tokenise ``docs``, join them with ``separator`` and cut into ``(n, seq_len)`` sequences."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    sep = separator_ids(tokenizer, separator)
    ids: list[int] = []
    boundary: list[bool] = []
    for k, tokens in enumerate(tokenizer(list(docs), add_special_tokens=False)["input_ids"]):
        if k and tokens:
            ids.extend(sep)
            boundary.extend([True] * (len(sep) + 1))  # the separator and the document's first token
            boundary.extend([False] * (len(tokens) - 1))
        else:
            boundary.extend([False] * len(tokens))
        ids.extend(tokens)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"{name} has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}: "
            "give more text or a smaller seq_len"
        )
    return PackedText(
        torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len),
        torch.tensor(boundary[: n * seq_len], dtype=torch.bool).view(n, seq_len),
    )


def spread_subset(data: PackedText, count: int) -> PackedText:
    """``count`` sequences evenly spread over ``data`` (all of it when it has fewer)."""
    if len(data) <= count:
        return data
    return data.rows(torch.linspace(0, len(data) - 1, count).round().long())


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
