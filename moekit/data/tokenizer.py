"""Byte-level BPE tokenizers: train one offline, load the embedded one, measure bytes per token.

Byte-level BPE (GPT-2, Radford et al. 2019) maps every UTF-8 byte to a printable symbol before
merging, so any text, in any script, encodes without an unknown token and decodes back to exactly
the same string. We build it with Hugging Face ``tokenizers`` and keep its ``tokenizer.json``
format, so checkpoints carry a file other tools read too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.data.corpus import SHAKESPEARE_DIR
from moekit.data.errors import DataError
from moekit.data.special import END_OF_TURN_NAMES, EOS_NAMES, guess_eos_ids

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
#: Special tokens in id order: EOS is id 0, PAD is id 1 (the trainer adds them first, in this order).
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)
EMBEDDED_TOKENIZER_PATH = SHAKESPEARE_DIR / "tokenizer.json"
DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_FILENAME = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer: ``None`` gives the embedded Shakespeare one.

    ``path`` may be a ``tokenizer.json`` file or a directory holding one (a checkpoint directory).
    Raises :class:`DataError` naming the path when it is missing or not a valid tokenizer file.
    """
    file = EMBEDDED_TOKENIZER_PATH if path is None else Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILENAME
    if not file.is_file():
        raise DataError(f"tokenizer not found: {file} does not exist (give a tokenizer.json file or a folder with one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{file} is not a valid tokenizer.json ({first_line}): rebuild or replace it") from e


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE tokenizer configured to round-trip any UTF-8 text exactly.

    No normalizer (text is kept as given), the ByteLevel pre-tokenizer with ``add_prefix_space=False``
    (a leading space would be invented otherwise) and its GPT-2 split regex, and the ByteLevel decoder
    that maps byte symbols back to bytes.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (offline, deterministic for the same input).

    The vocabulary holds the special tokens (``<|endoftext|>`` = 0, ``<|pad|>`` = 1), all 256 byte
    symbols, then learned merges up to ``vocab_size`` entries.

    Why it is deterministic: the trainer (tokenizers ``src/models/bpe/trainer.rs``) takes the most
    frequent pair and breaks ties by the pair's token ids. Seeding the full 256-byte alphabet gives
    every symbol its id up front, in sorted order; otherwise ids of first-seen characters would
    follow the iteration order of a randomly seeded Rust ``HashMap`` and ties could flip between runs.
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + 256 bytes), got {vocab_size}")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not (see above)
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, f"{special} should be id {i}"
    return tok


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON: equal tokenizers, equal hash (keys token caches)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added around it."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``, keeping special tokens, so ``decode(t, encode(t, x)) == x`` for byte-level BPE."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def bytes_per_token(tokenizer: Tokenizer, text: str) -> float:
    """UTF-8 bytes of ``text`` per token: the factor between a per-token loss and bits per byte.

    ``bits_per_byte = loss_nats_per_token / ln(2) / bytes_per_token`` — a tokenizer-independent
    score, so models with different vocabularies compare fairly.
    """
    n_tokens = len(encode(tokenizer, text))
    if n_tokens == 0:
        raise ValueError("bytes_per_token needs a non-empty text")
    return len(text.encode("utf-8")) / n_tokens


def find_eos_id(tokenizer: Tokenizer) -> int:
    """The end-of-text token id that separates training documents, found by name: ``<|endoftext|>`` or a
    common alternative (``</s>``, ``<eos>``, ..., then end-of-turn tokens; :mod:`moekit.data.special`).

    Generation stops on ``special_tokens_of(model, tokenizer).eos_ids`` instead: a checkpoint's own
    metadata knows its end-of-turn token, which a guess by name can miss.
    """
    eos_ids = guess_eos_ids(tokenizer)
    if not eos_ids:
        looked = ", ".join(map(repr, (*EOS_NAMES, *END_OF_TURN_NAMES)))
        raise DataError(f"the tokenizer has no end-of-text token (looked for {looked}): pass eos_id")
    return eos_ids[0]
