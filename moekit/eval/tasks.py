"""Multiple-choice tasks built from the held-out plays, deterministically for a seed.

Every item is a context and four choices, one of them right; a model answers with the choice of highest
log-likelihood (``acc``) or of highest log-likelihood per UTF-8 byte of the choice (``acc_norm``, as
lm-eval's ``acc_norm``). Distractors come from the same play, so a model cannot win by spotting the
play; the right answer's position is drawn with the same seeded generator.

- ``next-line``: which line comes next in this speech (the speaker and up to three lines before it);
  the distractors are other lines of the same play.
- ``speaker``: who speaks next, given the speech before; a choice is the speaker tag and the first line,
  so the model scores how well each speaker predicts the line. Distractors: other speakers of the play
  with at least :data:`MIN_SPEECHES` speeches, drawn by how often they speak.
- ``blank``: one word of a line, hidden: the choices are the word and three other words of the play
  of about its length, drawn by how often they occur, each followed by the rest of the line.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from moekit.eval.data import Speech

CHOICES = 4
CONTEXT_LINES = 3  # lines of the speech before the one asked about
MIN_LINE_CHARS = 20  # shorter lines ("Ay.", "Exeunt") say too little to tell apart
MIN_SPEECHES = 3  # a distractor speaker speaks at least this often in the play
MIN_WORD = 4  # letters in a blank's word (shorter ones are mostly function words)
_WORD = re.compile(r"(?<![A-Za-z'-])[a-z]{" + str(MIN_WORD) + r",}(?![A-Za-z'-])")

MC_TASKS: tuple[str, ...] = ("next-line", "speaker", "blank")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: score ``(context, choices[i])`` for each i; ``answer`` is right."""

    task: str
    context: str
    choices: tuple[str, ...]
    answer: int
    play: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _rng(seed: int, task: str) -> np.random.Generator:
    """One generator per (seed, task): a task's items do not change when another task is added or limited."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode())])


def _place(rng: np.random.Generator, right: str, wrong: list[str]) -> tuple[tuple[str, ...], int]:
    answer = int(rng.integers(CHOICES))
    choices = list(wrong)
    choices.insert(answer, right)
    return tuple(choices), answer


def _pick(rng: np.random.Generator, pool: list[str], exclude: set[str], k: int) -> list[str] | None:
    """``k`` distinct members of ``pool`` not in ``exclude``, drawn in proportion to how often each occurs in
    ``pool``, or None when there are not enough.

    Why by frequency: the right answer is drawn from the text, so frequent words and speakers are right
    more often; distractors drawn the same way are exchangeable with it, and a model that knows nothing
    (or only how long or common an answer is) scores chance.
    """
    counts = Counter(x for x in pool if x not in exclude)
    options = sorted(counts)
    if len(options) < k:
        return None
    weights = np.array([counts[o] for o in options], dtype=np.float64)
    return [options[i] for i in rng.choice(len(options), size=k, replace=False, p=weights / weights.sum())]


def _order(rng: np.random.Generator, n_candidates: int) -> list[int]:
    """Candidate indices in a seeded order; a task takes the first ones that make an item."""
    return rng.permutation(n_candidates).tolist()


def _by_play(speeches: list[Speech]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, s in enumerate(speeches):
        out.setdefault(s.play, []).append(i)
    return out


def _tag(speaker: str) -> str:
    return f"{speaker}.\n"


def next_line_items(speeches: list[Speech], limit: int, seed: int) -> list[Item]:
    rng = _rng(seed, "next-line")
    lines_of = {play: [ln for i in idx for ln in speeches[i].lines if len(ln) >= MIN_LINE_CHARS]
                for play, idx in _by_play(speeches).items()}
    candidates = [(i, j) for i, s in enumerate(speeches) for j in range(1, len(s.lines)) if len(s.lines[j]) >= MIN_LINE_CHARS]
    items = []
    for c in _order(rng, len(candidates)):
        i, j = candidates[c]
        s = speeches[i]
        wrong = _pick(rng, lines_of[s.play], {s.lines[j]}, CHOICES - 1)
        if wrong is None:
            continue
        context = _tag(s.speaker) + "\n".join(s.lines[max(j - CONTEXT_LINES, 0):j]) + "\n"
        choices, answer = _place(rng, s.lines[j], wrong)
        items.append(Item("next-line", context, choices, answer, s.play))
        if len(items) == limit:
            break
    return items


def speaker_items(speeches: list[Speech], limit: int, seed: int) -> list[Item]:
    rng = _rng(seed, "speaker")
    speakers_of: dict[str, list[str]] = {}  # one entry per speech, so _pick draws speakers by how often they speak
    for play, idx in _by_play(speeches).items():
        counts = Counter(speeches[i].speaker for i in idx)
        speakers_of[play] = [speeches[i].speaker for i in idx if counts[speeches[i].speaker] >= MIN_SPEECHES]
    candidates = [i for i in range(1, len(speeches))
                  if speeches[i].play == speeches[i - 1].play and len(speeches[i].lines[0]) >= MIN_LINE_CHARS]
    items = []
    for c in _order(rng, len(candidates)):
        i = candidates[c]
        s, prev = speeches[i], speeches[i - 1]
        wrong = _pick(rng, speakers_of[s.play], {s.speaker}, CHOICES - 1)
        if wrong is None:
            continue
        context = _tag(prev.speaker) + "\n".join(prev.lines[-CONTEXT_LINES:]) + "\n\n"
        line = s.lines[0]
        choices, answer = _place(rng, _tag(s.speaker) + line, [_tag(w) + line for w in wrong])
        items.append(Item("speaker", context, choices, answer, s.play, {"speaker": s.speaker}))
        if len(items) == limit:
            break
    return items


def blank_items(speeches: list[Speech], limit: int, seed: int) -> list[Item]:
    rng = _rng(seed, "blank")
    words_of = {play: [m.group() for i in idx for ln in speeches[i].lines for m in _WORD.finditer(ln)]
                for play, idx in _by_play(speeches).items()}
    candidates = [(i, j) for i, s in enumerate(speeches) for j, ln in enumerate(s.lines)
                  if len(ln) >= MIN_LINE_CHARS and any(m.start() > 0 for m in _WORD.finditer(ln))]
    items = []
    for c in _order(rng, len(candidates)):
        i, j = candidates[c]
        s, line = speeches[i], speeches[i].lines[j]
        matches = [m for m in _WORD.finditer(line) if m.start() > 0]  # not the line's first word (capitals)
        m = matches[int(rng.integers(len(matches)))]
        word = m.group()
        similar = [w for w in words_of[s.play] if abs(len(w) - len(word)) <= 1]  # length is no clue
        wrong = _pick(rng, similar, {word}, CHOICES - 1)
        if wrong is None:
            continue
        before, after = line[:m.start()], line[m.end():]
        context = _tag(s.speaker) + "\n".join(s.lines[max(j - CONTEXT_LINES + 1, 0):j] + (before,))
        choices, answer = _place(rng, word + after, [w + after for w in wrong])
        items.append(Item("blank", context, choices, answer, s.play, {"word": word}))
        if len(items) == limit:
            break
    return items


BUILDERS = {"next-line": next_line_items, "speaker": speaker_items, "blank": blank_items}


def build_items(task: str, speeches: list[Speech], limit: int, seed: int) -> list[Item]:
    """``limit`` items of ``task`` (fewer only if the text has fewer), the same for the same seed."""
    return BUILDERS[task](list(speeches), limit, seed)
