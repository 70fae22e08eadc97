"""Build moekit/data/austen/persuasion.txt.xz, the out-of-domain text of ``moekit eval``, from a registry package.

Source: the Debian package ``r-cran-janeaustenr`` (the CRAN package janeaustenr 1.0.0 by Julia Silge, MIT;
the novels themselves are public domain, from Project Gutenberg). It keeps each novel as an R character
vector (one element per line of the Gutenberg text) in the package's lazy-load database
``data/Rdata.rdb``, indexed by ``data/Rdata.rdx`` (a gzipped R serialization, as ``saveRDS`` writes); each
object in the ``.rdb`` is a zlib-compressed R serialization behind a 4-byte big-endian length. The PyPI
package ``rdata`` parses the serializations.

Run once, by hand (needs ``apt-get`` and ``rdata``; moekit itself needs neither):

    cd /tmp && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb janeaustenr
    python -m venv /tmp/rd && /tmp/rd/bin/pip install rdata
    /tmp/rd/bin/python scripts/build_austen.py /tmp/janeaustenr

The result is deterministic for the same package: lines joined with newlines, xz preset 9.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import struct
import zlib
from pathlib import Path

import rdata

NOVELS = {"persuasion": "persuasion"}  # R object name -> file stem; one novel keeps the package small (~140 KB)
OUT_DIR = Path(__file__).resolve().parents[1] / "moekit" / "data" / "austen"


def _convert(raw: bytes):
    return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def _unserialize(blob: bytes):
    """A zlib-compressed R serialization behind its 4-byte big-endian length, as R's lazy-load files hold it."""
    (length,) = struct.unpack(">I", blob[:4])
    raw = zlib.decompress(blob[4:])
    assert len(raw) == length, f"expected {length} bytes, got {len(raw)}"
    return _convert(raw)


def read_lazy_load(data_dir: Path) -> dict[str, list[str]]:
    """Every object of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` data)."""
    index = _convert(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = _unserialize(rdb[int(offset):int(offset) + int(length)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the extracted .deb (dpkg-deb -x), or the janeaustenr folder")
    args = parser.parse_args()
    found = sorted(args.root.rglob("janeaustenr/data/Rdata.rdx"))
    if not found:
        raise SystemExit(f"{args.root}: no janeaustenr/data/Rdata.rdx below it")
    objects = read_lazy_load(found[0].parent)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, stem in NOVELS.items():
        lines = [str(x) for x in objects[name]]
        text = "\n".join(lines).strip() + "\n"
        out = OUT_DIR / f"{stem}.txt.xz"
        out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
        print(f"{out}: {len(lines):,} lines, {len(text):,} characters, {out.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    main()
