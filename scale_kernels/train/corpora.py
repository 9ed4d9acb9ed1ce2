"""Bundled real corpora: English fortunes, the English and the Spanish New Testament.

All come from Debian packages (``fortunes``: BSD-licensed quotes; ``sword-text-web``: the public-domain
World English Bible; ``sword-text-sparv``: the public-domain Spanish Reina-Valera 1909; the two Bibles are
read with the PyPI package ``pysword``). Nothing is downloaded here: when a piece is missing,
:class:`DataSetupError` says the exact command that installs it. ``scale-cpt setup --install`` runs those
commands for you (apt-get needs root).

Builtin names (``builtin:NAME`` data sources): ``fortunes`` (one document per quote), ``bible`` (English
NT, one document per chapter, verses on lines), ``bible-es`` (Spanish NT, same layout; the same 260
chapters in the same order, so held-out chapter k of one is the translation of held-out chapter k of the
other). Each Bible is read once (about 10 s) and cached as JSON under :func:`cache_dir`
(``$SCALE_KERNELS_CACHE``, default ``~/.cache/scale_kernels``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import partial
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SWORD_DIR = Path("/usr/share/sword")
# builtin name -> SWORD module (both are the New Testament, KJV versification: 260 chapters)
BIBLE_MODULES = {"bible": "engWEB2015eb", "bible-es": "spaRV1909eb"}
# Prose files of the `fortunes` package (the ASCII-art and non-English files are left out).
FORTUNE_FILES = (
    "fortunes",
    "literature",
    "wisdom",
    "people",
    "humorists",
    "science",
    "politics",
    "work",
    "education",
    "love",
    "men-women",
    "platitudes",
    "miscellaneous",
    "law",
    "medicine",
    "food",
    "pets",
    "sports",
    "news",
    "drugs",
    "paradoxum",
    "goedel",
    "magic",
    "kids",
    "songs-poems",
    "computers",
    "definitions",
    "riddles",
)
APT_PACKAGES = ("fortunes", "sword-text-web", "sword-text-sparv")
APT_COMMAND = f"sudo apt-get update && sudo apt-get install -y {' '.join(APT_PACKAGES)}"
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


def bible_available(module: str) -> bool:
    return _bible_conf_present(module) and importlib.util.find_spec("pysword") is not None


def _bible_conf_present(module: str) -> bool:
    folder = SWORD_DIR / "mods.d"
    return folder.is_dir() and any(p.name.lower() == f"{module.lower()}.conf" for p in folder.iterdir())


def missing_corpora() -> list[str]:
    """Install commands for every missing corpus piece (empty when all are there)."""
    missing = []
    if not fortunes_available() or not all(_bible_conf_present(m) for m in BIBLE_MODULES.values()):
        missing.append(APT_COMMAND)
    if importlib.util.find_spec("pysword") is None:
        missing.append(PIP_DATA_COMMAND)
    return missing


def fortunes_documents() -> list[str]:
    """Every fortune (one document each) of the prose files of the ``fortunes`` package."""
    if not fortunes_available():
        raise DataSetupError(f"the English fortunes corpus is not installed ({FORTUNES_DIR}); run: {APT_COMMAND}")
    docs: list[str] = []
    for name in FORTUNE_FILES:
        path = FORTUNES_DIR / name
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            docs.extend(entry.strip() for entry in text.split("\n%\n") if entry.strip())
    return docs


def bible_documents(name: str = "bible") -> list[str]:
    """The New Testament of builtin Bible ``name`` (see ``BIBLE_MODULES``), one document per chapter
    (verses on lines); cached."""
    module = BIBLE_MODULES[name]
    cached = cache_dir() / "corpora" / f"{module}_nt.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    if not bible_available(module):
        raise DataSetupError(
            f"the {name} corpus is not available (needs the {module} module in {SWORD_DIR} and the pysword "
            f"package); run: {APT_COMMAND} && {PIP_DATA_COMMAND}"
        )
    docs = _read_bible_chapters(module)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    os.replace(tmp, cached)
    return docs


def _read_bible_chapters(module: str) -> list[str]:
    from pysword.modules import SwordModules

    modules = SwordModules(str(SWORD_DIR))
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    docs = []
    for book in bible.get_structure().get_books()["nt"]:
        for chapter in range(1, book.num_chapters + 1):
            verses = bible.get_iter(books=[book.name], chapters=[chapter], clean=True)
            lines = [" ".join(v.split()) for v in verses if v.strip() and len(v) <= _MAX_VERSE_CHARS]
            if lines:
                docs.append("\n".join(lines))
    return docs


BUILTIN_CORPORA = {"fortunes": fortunes_documents, **{name: partial(bible_documents, name) for name in BIBLE_MODULES}}
