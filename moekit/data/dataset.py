"""From text on disk to training batches: read a user's corpus, tokenize it once, sample from a memmap.

The pipeline is streaming end to end, so a corpus larger than memory works:

1. :func:`iter_texts` reads ``.txt`` / ``.jsonl`` files (or a folder of them) document by document
   and fails early with one :class:`DataError` line naming the file and what to do.
2. :func:`tokenize_to_file` encodes batches of documents, appends an end-of-text token after each
   (as GPT-2 does), and writes one flat ``uint16`` token file atomically, plus a small JSON sidecar
   describing it, so an unchanged corpus is never tokenized twice.
3. :class:`TokenDataset` memory-maps that file; :meth:`TokenDataset.get_batch` draws random windows
   as a pure function of ``(seed, step)``, so a resumed run sees exactly the batches it would have
   seen, and :meth:`TokenDataset.iter_eval_batches` walks it in order for validation.

:func:`prepare_data` ties it together for the trainer, for the embedded corpus or a user path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from moekit.data.corpus import ARCHIVE_PATH, SPLITS, list_plays, load_plays
from moekit.data.errors import DataError
from moekit.data.tokenizer import find_eos_id, tokenizer_hash
from moekit.utils import atomic_write, atomic_write_text

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")
#: A ``.txt`` file is one document; one larger than this is read (and ends documents) in pieces
#: of about this size, cut at a blank line where possible, so memory stays bounded.
TXT_PIECE_BYTES = 16 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
# Encoding memory: a Hugging Face Encoding costs ~450 bytes per token (ids, token strings, masks),
# so a 4 MB document encoded whole peaks near 600 MB. We encode documents in segments of about
# _SEGMENT_CHARS, in batches of about _ENCODE_BATCH_CHARS (enough work for the threads).
_SEGMENT_CHARS = 1 << 14
_ENCODE_BATCH_CHARS = 1 << 18
# Where a document may be cut without changing its tokens under byte-level BPE: the GPT-2
# pre-tokenizer regex ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) never lets a
# pre-token run past a lone newline between two non-space characters, nor into a space that starts
# a word (Radford et al. 2019, GPT-2 encoder.py). Cut after such a newline, or before such a space;
# ASCII-only classes keep Python's and Rust's ideas of whitespace from mattering.
_SAFE_BREAK = re.compile(r"(?<=[!-~])(?:\n(?=[!-~])|(?= [A-Za-z]))")
_META_FORMAT = 1

# Validation hold-out for a user corpus: the last ~1% of tokens, at least MIN_VAL_TOKENS when the
# corpus allows (never more than a tenth of it), starting at a document boundary when one is near.
VAL_FRACTION = 0.01
MIN_VAL_TOKENS = 4096
MIN_TOKENS_FOR_VAL = 1000


# --------------------------------------------------------------------------------------------
# Reading text
# --------------------------------------------------------------------------------------------


def list_data_files(path: str | os.PathLike) -> list[Path]:
    """The ``.txt`` / ``.jsonl`` files at ``path``: the file itself, or a folder's files recursively.

    Files are sorted by their path relative to the folder, so the order (and hence the token file)
    is the same on every machine; hidden files and folders (``.git``) are skipped.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path not found: {root} (give a .txt file, a .jsonl file or a folder of them)")
    if root.is_file():
        if root.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(f"{root}: unsupported file type {root.suffix or '(none)'!r}: give a .txt or .jsonl file")
        return [root]
    files = [
        f
        for f in root.rglob("*")
        if f.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
        and f.is_file()
    ]
    if not files:
        raise DataError(f"{root} holds no .txt or .jsonl files (searched recursively): add some or give a file")
    return sorted(files, key=lambda f: f.relative_to(root).parts)


def iter_texts(path: str | os.PathLike, task: str | None = None) -> Iterator[str]:
    """Yield the documents at ``path``: a ``.txt`` file, a ``.jsonl`` file, or a folder of them.

    A ``.txt`` file is one document (pieces of about ``TXT_PIECE_BYTES`` when larger); a ``.jsonl``
    file holds one JSON object per line with a ``text`` string (blank lines are skipped) and
    optionally a ``task`` string. Text must be UTF-8 (a leading byte-order mark is dropped). The path
    is checked now; each file's content as it is read, raising :class:`DataError` for a file with no
    text, bytes that are not UTF-8, or a ``.jsonl`` line that is not a JSON object with a ``text``
    string. ``task``: only the ``.jsonl`` records of that task (:mod:`moekit.data.tasks`); ``None``
    yields every document, whatever its task.
    """
    files = list_data_files(path)  # eager: a bad path fails at the call, not at the first next()

    def generate() -> Iterator[str]:
        for f in files:
            if f.suffix.lower() == ".jsonl":
                yield from (text for _, label, text in _iter_jsonl(f) if task is None or label == task)
            elif task is None:  # a .txt file carries no task
                yield from _iter_txt(f)

    return generate()


def iter_task_labels(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, task)`` for each document at ``path``, ``where`` naming the file (and line); ``task`` is
    the record's ``"task"`` field as is (unchecked), or None (a ``.txt`` file, a record without one).
    ``.txt`` files are not read: they never carry a task."""
    for f in list_data_files(path):
        if f.suffix.lower() == ".jsonl":
            yield from ((f"{f}, line {lineno}", label) for lineno, label, _ in _iter_jsonl(f))
        else:
            yield str(f), None


def _decode(data: bytes, file: Path, offset: int) -> str:
    """Strict UTF-8 decode of ``data``, which starts at byte ``offset`` of ``file``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = offset + e.start
        raise DataError(
            f"{file}: not UTF-8 at byte offset {where} (byte 0x{data[e.start]:02x}): "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _cut_point(buf: bytes) -> int:
    """Where to end a piece of a large ``.txt``: a blank line, else a line end, else a character start.

    Only cuts in the second half of ``buf`` count, so the carried-over rest stays small. Newline
    bytes never occur inside a multi-byte UTF-8 character, so cutting after one is always safe.
    """
    half = len(buf) // 2
    for sep in (b"\n\n", b"\n"):
        i = buf.rfind(sep, half)
        if i >= 0:
            return i + len(sep)
    i = len(buf) - 1
    while i > half and (buf[i] & 0xC0) == 0x80:  # back off over UTF-8 continuation bytes
        i -= 1
    return i if i > half else len(buf)


def _iter_txt(file: Path) -> Iterator[str]:
    found_text = False
    offset = 0  # file offset of carry[0]
    carry = b""
    with open(file, "rb") as fh:
        while True:
            block = fh.read(TXT_PIECE_BYTES)
            buf = carry + block
            if not buf:
                break
            at_end = len(block) < TXT_PIECE_BYTES
            cut = len(buf) if at_end else _cut_point(buf)
            piece, carry = buf[:cut], buf[cut:]
            skip = len(_UTF8_BOM) if offset == 0 and piece.startswith(_UTF8_BOM) else 0
            text = _decode(piece[skip:], file, offset + skip)
            offset += cut
            if text.strip():
                found_text = True
                yield text
            if at_end and not carry:
                break
    if not found_text:
        raise DataError(f"{file} is empty (no text): remove it or add text")


def _iter_jsonl(file: Path) -> Iterator[tuple[int, Any, str]]:
    """``(line number, "task" field or None, text)`` of each record with non-empty text."""
    found_text = False
    offset = 0
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            skip = len(_UTF8_BOM) if lineno == 1 and raw.startswith(_UTF8_BOM) else 0
            line = _decode(raw[skip:], file, offset + skip)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{file}, line {lineno}: not valid JSON ({e.msg}): each line must be one object like "
                    '{"text": "..."}'
                ) from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(
                    f'{file}, line {lineno}: no "text" field: each line must be a JSON object with a "text" string'
                )
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f'{file}, line {lineno}: "text" is a {type(text).__name__}, not a string: fix the line')
            if text.strip():
                found_text = True
                yield lineno, record.get("task"), text  # checked where tasks are used (moekit.data.tasks)
    if not found_text:
        raise DataError(f'{file} has no text (no line with a non-empty "text"): remove it or add records')


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What a token cache was built from: each file's absolute path, size and modification time.

    Cheap (no file is read) and changes whenever a file is added, removed, edited or touched.
    """
    files = list_data_files(path)
    entries = []
    for f in files:
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"path": str(Path(path).resolve()), "files": entries}


# --------------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFileInfo:
    """A token file on disk: where, how many tokens, their dtype, and whether the cache was reused."""

    path: Path
    n_tokens: int
    dtype: str
    reused: bool


def sidecar_path(token_path: str | os.PathLike) -> Path:
    """The JSON file describing ``token_path`` (``train.bin`` → ``train.bin.json``)."""
    p = Path(token_path)
    return p.with_name(p.name + ".json")


def read_token_meta(token_path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``token_path`` if it exists, parses, and matches the token file's size; else None."""
    path, side = Path(token_path), sidecar_path(token_path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        if meta.get("format") != _META_FORMAT:
            return None
        if path.stat().st_size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None  # torn or foreign file: do not trust it
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab ≤ 65536, ids 0..65535), else ``uint32``: half the disk of int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _segments(text: str, size: int = _SEGMENT_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``size`` characters whose tokens, joined, equal the whole's.

    Cuts fall at :data:`_SAFE_BREAK` points, exact for byte-level BPE (for other pre-tokenizers a
    cut may shift a token or two). With no safe point in ``4 * size`` characters (one endless line)
    it cuts anyway, so memory stays bounded.
    """
    start = 0
    while len(text) - start > size:
        m = _SAFE_BREAK.search(text, start + size, start + 4 * size)
        cut = m.end() if m else start + 4 * size
        yield text[start:cut]
        start = cut
    yield text[start:]


def _batches(texts: Iterable[str], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Segments of the non-empty texts, with "ends a document" flags, in lists of ~``max_chars``."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for text in texts:
        if not text:
            continue
        segments = _segments(text)
        segment = next(segments)
        for following in segments:
            batch.append((segment, False))
            size += len(segment)
            segment = following
            if size >= max_chars:
                yield batch
                batch, size = [], 0
        batch.append((segment, True))
        size += len(segment)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_to_file(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    out_path: str | os.PathLike,
    eos_id: int,
    *,
    fingerprint: dict[str, Any] | None = None,
    desc: str = "tokenizing",
) -> TokenFileInfo:
    """Encode ``texts`` (one document each, ``eos_id`` after each) into a flat token file.

    The file holds raw ``uint16`` ids (``uint32`` for vocabularies over 65536) and is written
    atomically: a temporary file in the same folder, fsync, rename. The sidecar ``<out>.json``
    records dtype, token/document/byte counts, ``eos_id``, the tokenizer's hash and ``fingerprint``.
    When ``fingerprint`` is given and the existing sidecar matches it, the tokenizer and ``eos_id``,
    the file is reused and ``texts`` is not read at all; without a fingerprint it is always rebuilt.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id {eos_id} is outside the tokenizer's vocabulary (size {vocab_size})")
    dtype = token_dtype(vocab_size)
    tok_hash = tokenizer_hash(tokenizer)

    old = read_token_meta(out)
    if (
        fingerprint is not None
        and old is not None
        and old.get("source") == fingerprint
        and old.get("tokenizer_sha256") == tok_hash
        and old.get("eos_id") == eos_id
        and old.get("dtype") == dtype.name
    ):
        return TokenFileInfo(out, int(old["n_tokens"]), dtype.name, reused=True)

    # A stale sidecar must never describe the new token file, even if we crash halfway.
    sidecar_path(out).unlink(missing_ok=True)
    counts = {"n_tokens": 0, "n_docs": 0, "n_bytes": 0}
    eos = np.array([eos_id], dtype=dtype).tobytes()
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets we do not need.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh, tqdm(desc=desc, unit="tok", unit_scale=True, disable=None, delay=2.0) as bar:
            for batch in _batches(texts, _ENCODE_BATCH_CHARS):
                n_before = counts["n_tokens"]
                encodings = encode_batch([segment for segment, _ in batch], add_special_tokens=False)
                for (segment, ends_doc), enc in zip(batch, encodings):
                    fh.write(np.asarray(enc.ids, dtype=dtype).tobytes())
                    counts["n_tokens"] += len(enc.ids)
                    counts["n_bytes"] += len(segment.encode("utf-8"))
                    if ends_doc:
                        fh.write(eos)
                        counts["n_tokens"] += 1
                        counts["n_docs"] += 1
                bar.update(counts["n_tokens"] - n_before)

    atomic_write(out, write)
    if counts["n_tokens"] == 0:
        out.unlink(missing_ok=True)
        raise DataError(f"no text to tokenize for {out.name}: the input yielded no non-empty document")
    meta = {
        "format": _META_FORMAT,
        "dtype": dtype.name,
        **counts,
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "tokenizer_sha256": tok_hash,
        "source": fingerprint,
    }
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1) + "\n")
    return TokenFileInfo(out, counts["n_tokens"], dtype.name, reused=False)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class TokenDataset:
    """A memory-mapped token file (or a ``[start, end)`` slice of one) for language-model batches.

    Nothing is loaded up front: the OS pages in only the windows a batch touches, so the file may
    be far larger than memory. ``dtype`` defaults to the one recorded in the sidecar.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        start: int = 0,
        end: int | None = None,
        dtype: str | np.dtype | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"token file not found: {self.path} (build it with tokenize_to_file or prepare_data)")
        self.meta = read_token_meta(self.path)
        if dtype is None:
            if self.meta is None:
                raise DataError(f"{self.path} has no valid sidecar {sidecar_path(self.path).name}: pass dtype=")
            dtype = self.meta["dtype"]
        dtype = np.dtype(dtype)
        if self.path.stat().st_size == 0:
            tokens: np.ndarray = np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
        else:
            tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.tokens = tokens[start:end]
        self.start = start

    @property
    def num_tokens(self) -> int:
        """How many tokens this dataset (slice) holds."""
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        end = self.start + self.num_tokens
        return f"TokenDataset({str(self.path)!r}, tokens [{self.start}, {end}), dtype={self.tokens.dtype.name})"

    def _require(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"{self.path} has {self.num_tokens} tokens in this split, fewer than seq_len + 1 = {seq_len + 1}: "
                "use a shorter sequence length or more data"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``tokens[s : s+T]`` and targets ``tokens[s+1 : s+T+1]`` for each start ``s``."""
        idx = starts[:, None] + np.arange(seq_len + 1)
        chunk = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch ``(x, y)``, LongTensors ``[batch_size, seq_len]``, with ``y`` = ``x`` shifted by one.

        Window starts are uniform over the data and depend only on ``(seed, step)`` (a NumPy
        generator seeded with both), never on earlier calls: resuming at step N replays exactly
        the batches of an uninterrupted run. Under data parallelism every rank draws the same global
        batch and trains on its rows of it (moekit.parallel), so the curve does not depend on the world size.
        """
        if step < 0 or seed < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0, seed >= 0 and batch_size >= 1, got {step=}, {seed=}, {batch_size=}")
        self._require(seq_len)
        rng = np.random.default_rng([int(seed), int(step)])
        starts = rng.integers(0, self.num_tokens - seq_len, size=batch_size)  # last start: n - seq_len - 1
        return self._windows(starts, seq_len)

    def num_eval_windows(self, seq_len: int) -> int:
        """How many windows :meth:`iter_eval_batches` yields in all (each predicts ``seq_len`` tokens)."""
        return max(self.num_tokens - 1, 0) // seq_len

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Walk the data in order: window ``i`` has inputs ``tokens[i*T : i*T+T]``, targets shifted by one.

        Windows do not overlap, so every token (after the first) is predicted exactly once, up to a
        tail shorter than ``seq_len``. The last batch may hold fewer than ``batch_size`` windows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._require(seq_len)  # checked now, not at the first next()
        n_windows = self.num_eval_windows(seq_len)
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)

        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for first in range(0, n_windows, batch_size):
                windows = np.arange(first, min(first + batch_size, n_windows))
                yield self._windows(windows * seq_len, seq_len)

        return generate()


# --------------------------------------------------------------------------------------------
# The trainer's entry point
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _archive_sha256() -> str:
    return hashlib.sha256(ARCHIVE_PATH.read_bytes()).hexdigest()


def _embedded_texts(split: str) -> Iterator[str]:
    """The works of ``split``, one document each; a generator, so a reused cache never decompresses."""
    yield from load_plays(split).values()


def _val_start(tokens: np.ndarray, eos_id: int) -> int | None:
    """Where the held-out tail of a user corpus begins, or None when the corpus is too small to split.

    The tail is ~``VAL_FRACTION`` of the tokens (at least ``MIN_VAL_TOKENS`` when that is under a
    tenth of the corpus). It starts right after an end-of-text token when one lies within one more
    tail length, so validation holds whole documents; otherwise the cut falls mid-document.
    """
    n = int(tokens.shape[0])
    if n < MIN_TOKENS_FOR_VAL:
        return None
    target = max(int(np.ceil(n * VAL_FRACTION)), min(MIN_VAL_TOKENS, n // 10))
    cut = n - target
    lo = max(cut - target, 1)
    hits = np.flatnonzero(np.asarray(tokens[lo:cut]) == eos_id)
    return lo + int(hits[-1]) + 1 if hits.size else cut


def _cache_name(root: Path) -> str:
    resolved = root.resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", resolved.name)[:40] or "data"
    return f"{stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def prepare_data(
    data_path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    *,
    eos_id: int | None = None,
) -> tuple[TokenDataset, TokenDataset | None]:
    """Token datasets ``(train, val)`` for training, tokenized once into ``cache_dir`` and reused.

    ``data_path=None`` uses the embedded Shakespeare corpus with its held-out plays as ``val``.
    A user path (``.txt``, ``.jsonl`` or a folder) trains on all of it except the last ~1% of tokens,
    held out as ``val`` (``None`` when the corpus is under ``MIN_TOKENS_FOR_VAL`` tokens). Cache files
    are named by source and tokenizer hash and rebuilt when the files or the tokenizer change.
    ``eos_id`` defaults to the tokenizer's end-of-text token. Records' ``"task"`` fields are ignored
    here: :func:`moekit.data.tasks.prepare_tasks` splits a corpus by task.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    eos = find_eos_id(tokenizer) if eos_id is None else eos_id
    tok_key = tokenizer_hash(tokenizer)[:12]

    if data_path is None:
        datasets = []
        for split in SPLITS:
            out = cache / f"shakespeare-{split}-{tok_key}.bin"
            fingerprint = {
                "embedded": "shakespeare",
                "split": split,
                "archive_sha256": _archive_sha256(),
                "works": list_plays(split),
            }
            desc = f"tokenizing shakespeare {split}"
            tokenize_to_file(_embedded_texts(split), tokenizer, out, eos, fingerprint=fingerprint, desc=desc)
            datasets.append(TokenDataset(out))
        return datasets[0], datasets[1]

    root = Path(data_path)
    fingerprint = source_fingerprint(root)  # validates the path before anything is written
    out = cache / f"{_cache_name(root)}-{tok_key}.bin"
    tokenize_to_file(iter_texts(root), tokenizer, out, eos, fingerprint=fingerprint, desc=f"tokenizing {root}")
    full = TokenDataset(out)
    cut = _val_start(full.tokens, eos)
    if cut is None:
        return full, None
    return TokenDataset(out, end=cut), TokenDataset(out, start=cut)
