"""Bundled real corpora for the offline demo: English fortunes (old domain) and the World English Bible (new).

Both come from Debian packages (``fortunes``: BSD-licensed quotes; ``sword-text-web``: the public-domain
World English Bible, read with the PyPI package ``pysword``). Nothing is downloaded here: when a piece is
missing, :class:`DataSetupError` says the exact command that installs it. ``scale-cpt setup --install``
runs those commands for you (apt-get needs root).

The Bible is read once (about 10 s) and cached as JSON under :func:`cache_dir` (``$SCALE_KERNELS_CACHE``,
default ``~/.cache/scale_kernels``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SWORD_DIR = Path("/usr/share/sword")
BIBLE_MODULE = "engWEB2015eb"
# Prose files of the `fortunes` package (the ASCII-art and non-English files are left out).
FORTUNE_FILES = (
    "fortunes", "literature", "wisdom", "people", "humorists", "science", "politics", "work", "education",
    "love", "men-women", "platitudes", "miscellaneous", "law", "medicine", "food", "pets", "sports", "news",
    "drugs", "paradoxum", "goedel", "magic", "kids", "songs-poems", "computers", "definitions", "riddles",
)
APT_COMMAND = "sudo apt-get update && sudo apt-get install -y fortunes sword-text-web"
PIP_DATA_COMMAND = "pip install pysword"
_MAX_VERSE_CHARS = 1500  # the module appends a ~20k-character glossary to the last verse: skip such blobs


class DataSetupError(RuntimeError):
    """A corpus or bundled model is not installed; the message says the command that installs it."""


def cache_dir() -> Path:
    """Where converted models and corpora are cached (``$SCALE_KERNELS_CACHE`` or ~/.cache/scale_kernels)."""
    root = os.environ.get("SCALE_KERNELS_CACHE") or Path.home() / ".cache" / "scale_kernels"
    return Path(root)


def fortunes_available() -> bool:
    return (FORTUNES_DIR / "fortunes").is_file()


def bible_available() -> bool:
    return _bible_conf_present() and (
        importlib.util.find_spec("pysword") is not None
    )


def _bible_conf_present() -> bool:
    folder = SWORD_DIR / "mods.d"
    return folder.is_dir() and any(p.name.lower() == f"{BIBLE_MODULE.lower()}.conf" for p in folder.iterdir())


def missing_corpora() -> list[str]:
    """Install commands for every missing corpus piece (empty when all are there)."""
    missing = []
    if not fortunes_available() or not _bible_conf_present():
        missing.append(APT_COMMAND)
    if importlib.util.find_spec("pysword") is None:
        missing.append(PIP_DATA_COMMAND)
    return missing


def fortunes_documents() -> list[str]:
    """Every fortune (one document each) of the prose files of the ``fortunes`` package."""
    if not fortunes_available():
        raise DataSetupError(f"the English fortunes corpus is not installed ({FORTUNES_DIR}); "
                             f"run: {APT_COMMAND}")
    docs: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNES_DIR / name
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            docs.extend(entry.strip() for entry in text.split("\n%\n") if entry.strip())
    return docs


def bible_documents() -> list[str]:
    """The New Testament of the World English Bible, one document per chapter (verses on lines); cached."""
    cached = cache_dir() / "corpora" / f"{BIBLE_MODULE}_nt.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    if not bible_available():
        raise DataSetupError(
            f"the World English Bible is not available (needs the {BIBLE_MODULE} module in {SWORD_DIR} and "
            f"the pysword package); run: {APT_COMMAND} && {PIP_DATA_COMMAND}"
        )
    docs = _read_bible_chapters()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    os.replace(tmp, cached)
    return docs


def _read_bible_chapters() -> list[str]:
    from pysword.modules import SwordModules

    modules = SwordModules(str(SWORD_DIR))
    modules.parse_modules()
    bible = modules.get_bible_from_module(BIBLE_MODULE)
    docs = []
    for book in bible.get_structure().get_books()["nt"]:
        for chapter in range(1, book.num_chapters + 1):
            verses = bible.get_iter(books=[book.name], chapters=[chapter], clean=True)
            lines = [" ".join(v.split()) for v in verses if v.strip() and len(v) <= _MAX_VERSE_CHARS]
            if lines:
                docs.append("\n".join(lines))
    return docs


BUILTIN_CORPORA = {"fortunes": fortunes_documents, "bible": bible_documents}
