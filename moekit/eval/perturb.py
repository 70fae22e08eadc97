"""Seeded perturbations of text for the robustness figures: typos, case, whitespace, punctuation.

Each is a pure function of (text, generator) that changes a fraction of the words, spaces or marks and
keeps the rest, so the drop from the clean figure measures sensitivity to surface noise, as HELM's
robustness perturbations do. :func:`perturb` draws one generator per (seed, kind, text index): the
same text is perturbed the same way for every model, and each text independently of the others.

Trailing whitespace is kept as it is: a multiple-choice context ends where the choices begin, and
gluing the last word onto the answer would change the question, not its surface.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import numpy as np

TYPO_RATE = 0.1  # of words of 4+ letters
CASE_RATE = 0.2  # of words
SPACE_RATE = 0.15  # of spaces between words
PUNCT_RATE = 0.5  # of punctuation marks
_WORD = re.compile(r"[A-Za-z]+")
_PUNCT = re.compile(r"[.,;:!?]")


def typos(text: str, rng: np.random.Generator) -> str:
    """Swap two neighbouring letters, drop one or double one, in ``TYPO_RATE`` of the longer words."""
    def typo(m: re.Match) -> str:
        w = m.group()
        if len(w) < 4 or rng.random() >= TYPO_RATE:
            return w
        i = int(rng.integers(1, len(w) - 1))  # never the first letter (capitals stay put)
        kind = int(rng.integers(3))
        if kind == 0:
            return w[:i] + w[i + 1] + w[i] + w[i + 2:]
        if kind == 1:
            return w[:i] + w[i + 1:]
        return w[:i] + w[i] + w[i:]
    return _WORD.sub(typo, text)


def case(text: str, rng: np.random.Generator) -> str:
    """Write ``CASE_RATE`` of the words in upper, lower or title case."""
    styles = (str.upper, str.lower, str.title)
    return _WORD.sub(lambda m: styles[int(rng.integers(3))](m.group()) if rng.random() < CASE_RATE else m.group(), text)


def whitespace(text: str, rng: np.random.Generator) -> str:
    """Double ``SPACE_RATE`` of the spaces between words."""
    return re.sub(r"(?<=\S) (?=\S)", lambda m: "  " if rng.random() < SPACE_RATE else " ", text)


def punctuation(text: str, rng: np.random.Generator) -> str:
    """Drop ``PUNCT_RATE`` of the marks . , ; : ! ?"""
    return _PUNCT.sub(lambda m: "" if rng.random() < PUNCT_RATE else m.group(), text)


PERTURBATIONS: dict[str, Callable[[str, np.random.Generator], str]] = {
    "typos": typos, "case": case, "whitespace": whitespace, "punctuation": punctuation}


def perturb(texts: list[str], kind: str, seed: int) -> list[str]:
    """``texts`` under perturbation ``kind`` (a key of :data:`PERTURBATIONS`), trailing whitespace kept."""
    fn = PERTURBATIONS[kind]
    out = []
    for i, text in enumerate(texts):
        body = text.rstrip()
        rng = np.random.default_rng([int(seed), zlib.crc32(kind.encode()), i])
        changed = fn(body, rng)
        out.append((changed if changed.strip() else body) + text[len(body):])
    return out
