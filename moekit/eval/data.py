"""The text ``moekit eval`` reads: held-out plays (parsed into speeches), the out-of-domain novel, a user's files.

Only held-out text is ever used: the plays of :data:`moekit.data.corpus.VAL_PLAYS`, which training never
sees (``prepare_data`` trains on the other works). Language-modelling documents are pieces of about
:data:`PIECE_CHARS` characters cut at blank lines, so that a standard error over documents has enough
documents behind it (four whole plays would give four).

A play in the corpus is a sequence of paragraphs separated by blank lines: a speech starts with its
speaker tag on a line of its own (``LADY MACBETH.``), stage directions are in brackets (``[Exit.]``),
and headings (``ACT I.``, ``SCENE II. A heath.``) stand alone.
"""

from __future__ import annotations

import functools
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path

from moekit.data.corpus import VAL_PLAYS, load_plays
from moekit.data.dataset import iter_texts
from moekit.data.errors import DataError

AUSTEN_DIR = Path(__file__).resolve().parents[1] / "data" / "austen"
AUSTEN_PATH = AUSTEN_DIR / "persuasion.txt.xz"
#: Target size of a language-modelling document (a piece of a longer text, cut at a blank line).
PIECE_CHARS = 2000

# A speaker tag: capitals (and "." "," "'" "&" "-" spaces) ending in a full stop, alone on its line.
_SPEAKER = re.compile(r"[A-Z][A-Z0-9 .,'&-]*[A-Z]\.")
_HEADING = re.compile(r"(ACT|SCENE|EPILOGUE|PROLOGUE|THE END|SONG|DRAMATIS|PERSONS)\b", re.IGNORECASE)
_INLINE_DIRECTION = re.compile(r" *\[[^\]]*\] *")  # "[Aside.]" inside a line, with the spaces around it


@dataclass(frozen=True)
class Speech:
    """One speech of a play: who speaks and the lines spoken (stage directions removed)."""

    play: str
    speaker: str  # as tagged, without the full stop: "LADY MACBETH"
    lines: tuple[str, ...]


def parse_play(name: str, text: str) -> list[Speech]:
    """The speeches of a play in order. Paragraphs after a speech that carry no tag of their own (the
    speech resumes after a stage direction) belong to it; headings end it; the cast list before the first
    scene is skipped."""
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []
    started = False

    def close() -> None:
        nonlocal speaker, lines
        if speaker is not None and lines:
            speeches.append(Speech(name, speaker, tuple(lines)))
        speaker, lines = None, []

    for para in re.split(r"\n[ \t]*\n", text):
        rows = [r.rstrip() for r in para.strip("\n").split("\n")]
        first = rows[0].strip() if rows else ""
        if not first:
            continue
        if _HEADING.match(first):
            close()
            started = started or first.upper().startswith(("ACT", "SCENE "))
            continue
        if not started:
            continue
        if first.startswith("["):  # a stage direction paragraph: the speech may go on after it
            continue
        if _SPEAKER.fullmatch(first):
            close()
            speaker, rows = first[:-1], rows[1:]
        if speaker is None:
            continue
        for row in rows:
            row = _INLINE_DIRECTION.sub(" ", row).strip()
            if row and not row.startswith("["):
                lines.append(row)
    close()
    return speeches


@functools.lru_cache(maxsize=1)
def held_out_speeches() -> tuple[Speech, ...]:
    """Every speech of the held-out plays, plays in sorted order."""
    return tuple(s for name, text in load_plays("val").items() for s in parse_play(name, text))


def held_out_text() -> dict[str, str]:
    """``{play: text}`` of the held-out plays (never trained on)."""
    plays = load_plays("val")
    assert set(plays) == set(VAL_PLAYS)
    return plays


@functools.lru_cache(maxsize=1)
def austen_text() -> str:
    """Jane Austen's *Persuasion* (1818), the out-of-domain text shipped with moekit (see NOTICE)."""
    with lzma.open(AUSTEN_PATH, "rb") as f:
        return f.read().decode("utf-8")


def pieces(text: str, target: int = PIECE_CHARS) -> list[str]:
    """``text`` cut at blank lines into pieces of about ``target`` characters (a paragraph longer than
    that is a piece of its own); pieces are stripped, so none starts or ends with blank lines."""
    out, cur, size = [], [], 0
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        cur.append(para)
        size += len(para) + 2
        if size >= target:
            out.append("\n\n".join(cur).strip("\n"))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur).strip("\n"))
    return out


def user_documents(path: str | os.PathLike) -> list[str]:
    """The documents of ``--data`` (a ``.txt`` / ``.jsonl`` file or a folder of them), in pieces.

    Reading goes through :func:`moekit.data.dataset.iter_texts`, so the errors are training's own
    (:class:`DataError`: a missing path, no text, bytes that are not UTF-8, a bad JSON line).
    """
    docs = [p for text in iter_texts(path) for p in pieces(text)]
    if not docs:
        raise DataError(f"{path} holds no text to evaluate on")
    return docs
