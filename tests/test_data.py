"""Tests for moekit.data: embedded corpus, tokenizer, user-data loaders, token caches and batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data import (
    EOS_TOKEN,
    PAD_TOKEN,
    VAL_PLAYS,
    DataError,
    TokenDataset,
    bytes_per_token,
    decode,
    encode,
    iter_texts,
    list_plays,
    load_shakespeare,
    load_tokenizer,
    prepare_data,
    read_token_meta,
    tokenize_to_file,
    tokenizer_hash,
    train_tokenizer,
)
from moekit.data import dataset as dataset_module
from moekit.data.tokenizer import EMBEDDED_TOKENIZER_PATH

ROUND_TRIP_TEXTS = [
    "To be, or not to be, that is the question:",
    " leading space and trailing space ",
    "naïve café, Straße, Ærø — “quotes” ‘too’",
    "日本語のテキスト、中文，한국어",
    "emoji 🤖🎭👍🏽 and ZWJ 👩‍👩‍👧",
    "tabs\tand\r\nCRLF\rCR\n\n\nblank lines   \n",
    "control \x00\x01\x7f chars",
    f"literal {EOS_TOKEN} and {PAD_TOKEN} markers",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_tok():
    """A different (tiny) tokenizer, trained in well under a second."""
    return train_tokenizer([load_shakespeare("val")[:20000]], vocab_size=300)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------- corpus


def test_corpus_splits_are_disjoint_and_complete():
    train, val = list_plays("train"), list_plays("val")
    assert val == sorted(VAL_PLAYS) == ["julius_caesar", "macbeth", "tempest", "twelfth_night"]
    assert len(train) == 38 and not set(train) & set(val)
    assert "hamlet" in train and "sonnets" in train


def test_corpus_text_and_held_out_plays():
    train, val = load_shakespeare("train"), load_shakespeare("val")
    assert len(train) > 4_000_000 and len(val) > 400_000
    assert "Double, double, toil and trouble" in val  # Macbeth
    assert "Double, double, toil and trouble" not in train
    assert "To be, or not to be" in train
    assert "Gutenberg" not in train + val  # boilerplate stripped
    assert load_shakespeare("train") is train  # decompressed once, cached


def test_corpus_bad_split():
    with pytest.raises(ValueError, match="'train', 'val'"):
        load_shakespeare("test")
    with pytest.raises(ValueError, match="valid splits"):
        list_plays("validation")


# ----------------------------------------------------------------------------------- tokenizer


def test_embedded_tokenizer(tok):
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id(EOS_TOKEN) == 0 and tok.token_to_id(PAD_TOKEN) == 1
    assert 2.5 < bytes_per_token(tok, load_shakespeare("val")) < 4.0


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tok, small_tok, text):
    for t in (tok, small_tok):
        assert decode(t, encode(t, text)) == text


def test_train_tokenizer_is_deterministic():
    texts = [load_shakespeare("val")[:30000], "café 日本 🤖"]
    a, b = train_tokenizer(texts, vocab_size=400), train_tokenizer(iter(texts), vocab_size=400)
    assert a.to_str() == b.to_str() and tokenizer_hash(a) == tokenizer_hash(b)
    assert a.get_vocab_size() == 400 and a.token_to_id(EOS_TOKEN) == 0 and a.token_to_id(PAD_TOKEN) == 1
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(texts, vocab_size=100)


def test_load_tokenizer_paths(tmp_path, tok):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "tokenizer.json", EMBEDDED_TOKENIZER_PATH):
        assert tokenizer_hash(load_tokenizer(path)) == tokenizer_hash(tok)
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(e)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path / "bad.json")
    assert "bad.json" in one_line(e) and "not a valid tokenizer" in str(e.value)


# ----------------------------------------------------------------------------------- reading user text


def test_iter_texts_txt_jsonl_and_dir(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfFirst file.\nSecond line, caf\xc3\xa9.\n")
    rows = [{"text": "row one", "id": 1}, {"text": ""}, {"text": "row two ✓"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.TXT").write_text("nested", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("ignored", encoding="utf-8")

    assert list(iter_texts(tmp_path / "a.txt")) == ["First file.\nSecond line, café.\n"]
    assert list(iter_texts(tmp_path / "b.jsonl")) == ["row one", "row two ✓"]
    assert list(iter_texts(tmp_path)) == ["First file.\nSecond line, café.\n", "row one", "row two ✓", "nested"]


def test_large_txt_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "TXT_PIECE_BYTES", 64)
    text = "".join(f"línea {i} — ünïcödé\n" + ("\n" if i % 3 == 0 else "") for i in range(50)) + "ä" * 100
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    pieces = list(iter_texts(tmp_path / "big.txt"))
    assert len(pieces) > 5 and "".join(pieces) == text


def bad_input_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    """(path, a substring the one-line message must contain) for each bad input."""
    cases = []

    def add(name: str, content: bytes | None, expected: str) -> None:
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        cases.append((path, expected))

    add("empty.txt", b"", "is empty")
    add("blank.txt", b" \n\t\n", "is empty")
    add("latin1.txt", b"hello\nwor\xe9ld\n", "byte offset 9")
    add("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "byte offset 28")
    add("notjson.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', "line 3: not valid JSON")
    add("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'line 2: no "text" field')
    add("list.jsonl", b'["text"]\n', 'line 1: no "text" field')
    add("number.jsonl", b'{"text": 5}\n', '"text" is a int')
    add("emptytext.jsonl", b'{"text": ""}\n\n', "has no text")
    add("empty_dir", None, "holds no .txt or .jsonl files")
    add("data.csv", b"a,b\n", "unsupported file type")
    cases.append((tmp_path / "missing.txt", "data path not found"))
    return cases


def test_bad_inputs_raise_one_line_data_error(tmp_path):
    for path, expected in bad_input_cases(tmp_path):
        with pytest.raises(DataError) as e:
            list(iter_texts(path))
        msg = one_line(e)
        assert str(path) in msg and expected in msg, msg
        assert isinstance(e.value, ValueError)


def test_bad_file_inside_a_directory_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"z/bad\.txt: not UTF-8 at byte offset 0"):
        list(iter_texts(tmp_path))


def test_missing_path_fails_at_call_time(tmp_path):
    with pytest.raises(DataError):
        iter_texts(tmp_path / "nope")  # no next() needed


# ----------------------------------------------------------------------------------- token files


def test_tokenize_to_file_contents(tmp_path, tok):
    texts = ["Hello there.", "", "Second doc ✓"]
    info = tokenize_to_file(texts, tok, tmp_path / "t.bin", eos_id=0)
    expected = encode(tok, texts[0]) + [0] + encode(tok, texts[2]) + [0]
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == expected
    meta = read_token_meta(tmp_path / "t.bin")
    assert meta["n_tokens"] == info.n_tokens == len(expected) and meta["n_docs"] == 2
    assert meta["dtype"] == info.dtype == "uint16" and meta["tokenizer_sha256"] == tokenizer_hash(tok)
    assert meta["n_bytes"] == len("Hello there.Second doc ✓".encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.json"]  # no temp files left
    assert dataset_module.token_dtype(4096) == np.uint16 and dataset_module.token_dtype(65536) == np.uint16
    assert dataset_module.token_dtype(65537) == np.uint32


def test_long_documents_tokenize_as_a_whole(tmp_path, tok):
    """Documents are encoded in segments (bounded memory) yet give exactly the whole text's tokens."""
    long_doc = load_shakespeare("val")[:150_000] + " naïve 日本語 🤖\n" * 2000
    info = tokenize_to_file(iter([long_doc, "tail"]), tok, tmp_path / "long.bin", eos_id=0)
    expected = encode(tok, long_doc) + [0] + encode(tok, "tail") + [0]
    assert np.fromfile(info.path, dtype=np.uint16).tolist() == expected
    no_breaks = "x" * 100_000  # no safe cut point: cut anyway, text kept intact
    assert "".join(dataset_module._segments(no_breaks)) == no_breaks


def test_token_cache_reused_and_rebuilt(tmp_path, tok, small_tok):
    data = tmp_path / "corpus.txt"
    data.write_text("Once upon a time. " * 100, encoding="utf-8")
    cache = tmp_path / "cache"
    train, val = prepare_data(data, tok, cache)
    path = train.path
    assert val is None  # ~600 tokens: too small to hold anything out
    first_mtime = path.stat().st_mtime_ns

    def must_not_read():
        raise AssertionError("cache should have been reused")
        yield ""

    fp = dataset_module.source_fingerprint(data)
    assert tokenize_to_file(must_not_read(), tok, path, 0, fingerprint=fp).reused
    assert prepare_data(data, tok, cache)[0].path.stat().st_mtime_ns == first_mtime

    data.write_text("A different story. " * 300, encoding="utf-8")
    os.utime(data, ns=(first_mtime + 10**9, first_mtime + 10**9))
    assert not tokenize_to_file(iter_texts(data), tok, path, 0, fingerprint=dataset_module.source_fingerprint(data)).reused
    rebuilt = TokenDataset(path)
    assert decode(tok, rebuilt.tokens[:4].tolist()).startswith("A different")

    other, _ = prepare_data(data, small_tok, cache)  # another tokenizer: its own cache file
    assert other.path != path and read_token_meta(other.path)["tokenizer_sha256"] == tokenizer_hash(small_tok)


# ----------------------------------------------------------------------------------- batches


@pytest.fixture
def counting_dataset(tmp_path) -> TokenDataset:
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "count.bin")
    return TokenDataset(tmp_path / "count.bin", dtype=np.uint16)


def test_get_batch_is_a_pure_function_of_seed_and_step(counting_dataset):
    ds = counting_dataset
    x, y = ds.get_batch(step=7, batch_size=8, seq_len=32, seed=1234)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(32))  # contiguous windows of the file
    assert int(y.max()) <= 999
    ds.get_batch(step=0, batch_size=8, seq_len=32, seed=1234)  # calls in between change nothing
    x2, y2 = ds.get_batch(step=7, batch_size=8, seq_len=32, seed=1234)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, ds.get_batch(step=8, batch_size=8, seq_len=32, seed=1234)[0])
    assert not torch.equal(x, ds.get_batch(step=7, batch_size=8, seq_len=32, seed=1235)[0])


def test_get_batch_reaches_the_last_token(counting_dataset):
    x, y = counting_dataset.get_batch(step=0, batch_size=64, seq_len=999, seed=0)
    assert torch.equal(x[0], torch.arange(999)) and torch.equal(y[0], torch.arange(1, 1000))


def test_too_few_tokens(counting_dataset):
    with pytest.raises(DataError, match="1000 tokens.*seq_len \\+ 1 = 1001") as e:
        counting_dataset.get_batch(step=0, batch_size=1, seq_len=1000, seed=0)
    assert "count.bin" in one_line(e)
    with pytest.raises(DataError):
        counting_dataset.iter_eval_batches(batch_size=1, seq_len=1000)


def test_eval_batches_walk_the_file_in_order(counting_dataset):
    batches = list(counting_dataset.iter_eval_batches(batch_size=4, seq_len=100))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # 999 // 100 = 9 windows
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(900)) and torch.equal(y.flatten(), torch.arange(1, 901))
    assert len(list(counting_dataset.iter_eval_batches(4, 100, max_batches=2))) == 2
    assert counting_dataset.num_eval_windows(100) == 9


def test_dataset_slice(counting_dataset):
    part = TokenDataset(counting_dataset.path, start=900, dtype="uint16")
    assert part.num_tokens == 100 and int(part.tokens[0]) == 900


# ----------------------------------------------------------------------------------- prepare_data


def test_prepare_data_embedded(tmp_path_factory, tok):
    cache = tmp_path_factory.mktemp("cache")
    train, val = prepare_data(None, tok, cache)
    assert train.num_tokens > 1_000_000 and 100_000 < val.num_tokens < 300_000
    val_text = decode(tok, val.tokens[:2000].tolist())
    assert val_text.startswith("JULIUS CAESAR")
    assert int(train.tokens[-1]) == 0 and int(val.tokens[-1]) == 0  # EOS after each work
    again = prepare_data(None, tok, cache)
    assert [d.path.stat().st_mtime_ns for d in again] == [d.path.stat().st_mtime_ns for d in (train, val)]
    x, y = train.get_batch(step=0, batch_size=2, seq_len=64, seed=0)
    assert x.shape == (2, 64) and int(x.max()) < 4096


def test_prepare_data_user_dir_holds_out_whole_documents(tmp_path, tok):
    docs = tmp_path / "docs"
    docs.mkdir()
    lines = [json.dumps({"text": f"Record {i}: the quick brown fox jumps over the lazy dog."}) for i in range(3000)]
    (docs / "records.jsonl").write_text("\n".join(lines), encoding="utf-8")
    train, val = prepare_data(docs, tok, tmp_path / "cache")
    full = TokenDataset(train.path)
    assert train.num_tokens + val.num_tokens == full.num_tokens
    assert int(train.tokens[-1]) == 0  # the cut falls right after an EOS: whole documents
    assert 4096 <= val.num_tokens <= 2 * 4096 + 20
    assert decode(tok, val.tokens[:3].tolist()).startswith("Record")
