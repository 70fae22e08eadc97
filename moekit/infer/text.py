"""Token ids -> text pieces for streaming, with stop strings.

Incremental detokenization as in Hugging Face text-generation-inference (``decode_token``): decode
only a short window from ``prefix`` (a boundary that decoded cleanly) so each step costs O(window),
not O(text), and decoders that treat a sequence's start specially (SentencePiece's leading space)
still see the context before the new tokens. A piece that ends inside a multi-byte UTF-8 character
(a byte-level BPE token can hold part of one; it decodes to U+FFFD) is held back until complete.

Special tokens (``<|im_end|>``, ``<|endoftext|>``...) are not printed: pieces are decoded with
``skip_special_tokens=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Turns token ids into text pieces as they arrive; stops at the first stop string.

    ``push(token)`` returns the text that may be shown now. Text that could be the start of a stop
    string is held back until it is known not to be one; when a stop string appears, the text before
    it is returned and ``stopped`` becomes True (the stop string itself is never shown).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.prefix = 0  # decode window start
        self.read = 0  # tokens before this have been decoded into self.text
        self.text = ""  # all text decoded so far (before any stop string)
        self.shown = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        done_text = _decode(self.tokenizer, self.ids[self.prefix:self.read])
        new_text = _decode(self.tokenizer, self.ids[self.prefix:])
        if len(new_text) > len(done_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(done_text):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """What is still held back (a partial character as U+FFFD, a partial stop string as text)."""
        if self.stopped:
            return ""
        if self.read < len(self.ids):
            done_text = _decode(self.tokenizer, self.ids[self.prefix:self.read])
            self.text += _decode(self.tokenizer, self.ids[self.prefix:])[len(done_text):]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # A stop string may straddle pieces: search from just before the unshown text.
            start = max(0, self.shown - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.stopped = True
                piece, self.shown = self.text[self.shown:], len(self.text)
                return piece
            if not final:
                end = len(self.text) - _held_back(self.text, self.stop)
                piece = self.text[self.shown:end]
                self.shown = max(self.shown, end)
                return piece
        piece, self.shown = self.text[self.shown:], len(self.text)
        return piece


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
