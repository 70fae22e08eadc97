"""Train the embedded tokenizer ``moekit/data/shakespeare/tokenizer.json`` (byte-level BPE, 4096).

It learns from the train split of the embedded corpus only (the validation plays stay unseen),
one document per work, and is deterministic: run it twice, get the same file.

    python scripts/build_tokenizer.py            # after scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moekit.data.corpus import load_plays, load_shakespeare
from moekit.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EMBEDDED_TOKENIZER_PATH,
    bytes_per_token,
    tokenizer_hash,
    train_tokenizer,
)
from moekit.utils import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out", type=Path, default=EMBEDDED_TOKENIZER_PATH)
    args = parser.parse_args(argv)

    tok = train_tokenizer(load_plays("train").values(), vocab_size=args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, tok.to_str(pretty=True))
    os.chmod(args.out, 0o644)  # the temporary file was private (0600); this one ships in the package
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}, sha256 {tokenizer_hash(tok)[:16]}")
    for split in ("train", "val"):
        print(f"  {split}: {bytes_per_token(tok, load_shakespeare(split)):.3f} bytes/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
