"""Peak memory of loading a GGUF file and generating a few tokens, against the file's size.

Each measurement runs in a fresh process that imports everything first (torch, moekit, gguf,
tokenizers), resets the kernel's RSS high-water mark, then runs ``moekit.load(path)`` and a greedy
generation of ``--tokens`` tokens, and reports the peak resident set over the post-import baseline
(``VmHWM`` - ``VmRSS`` before the load, Linux), the resident set after, and both as multiples of the
file's size. The peak is what runs a small machine out of memory; llama.cpp maps the file (~1x).

    python benchmarks/gguf_load_memory.py                   # SmolLM2-135M Q4_1 from the test cache
    python benchmarks/gguf_load_memory.py model.gguf --tokens 8 --float

The default file is the one ``tests/conftest.py`` fetches (``$MOEKIT_TEST_CACHE`` or
``~/.cache/moekit-tests``). ``--json`` prints one JSON object (used by ``tests/test_gguf.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moekit.utils import proc_status_bytes  # noqa: E402 - /proc/self/status fields

DEFAULT = Path(os.environ.get("MOEKIT_TEST_CACHE", Path.home() / ".cache" / "moekit-tests")) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def child(path: str, tokens: int, quantized: bool) -> dict:
    """In this (fresh) process: import, reset the high-water mark, load, generate; memory in bytes."""
    import torch

    import moekit
    import moekit.convert.gguf  # noqa: F401 -- imports (gguf, tokenizers) are not the load's memory
    from moekit.infer import generate

    torch.set_num_threads(1)  # the figure must not depend on the machine's thread pools
    # NOTE: a loader builds the model on the meta device first; torch's first use of it loads ~35-70 MB of
    # meta kernels and Python modules, the same for any model: an import, so it happens before the baseline.
    with torch.device("meta"):
        moekit.Transformer(moekit.ModelConfig.from_preset("tiny-dense", n_layers=1))
    # NOTE: ``5`` to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak below is
    # the load's and the generation's, not an import spike's. ru_maxrss cannot be reset, and after a
    # fork + exec it can still hold the parent's high-water mark (a pytest parent is ~0.5 GB).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_status_bytes("VmRSS")
    model, tok = moekit.load(path, quantized=quantized)
    loaded_peak, loaded = proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS")
    text = generate(model, tok, "The capital of France is", max_new_tokens=tokens, temperature=0)
    size = Path(path).stat().st_size
    peak, after = proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS")
    return {"file_bytes": size, "base_bytes": base, "load_peak_bytes": loaded_peak - base,
            "loaded_bytes": loaded - base, "peak_bytes": peak - base, "after_bytes": after - base,
            "peak_over_file": (peak - base) / size, "after_over_file": (after - base) / size,
            "quantized": quantized, "tokens": tokens, "text": text}


def measure(path: str | os.PathLike, tokens: int = 8, quantized: bool = True) -> dict:
    """Run :func:`child` in a fresh interpreter (this file, ``--child``) and return its figures."""
    cmd = [sys.executable, __file__, str(path), "--tokens", str(tokens), "--child"] + ([] if quantized else ["--float"])
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=str(DEFAULT), help="a .gguf file (default: the tests' SmolLM2 Q4_1)")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate after loading (default 8)")
    p.add_argument("--float", action="store_true", help="load dequantized (moekit.load(..., quantized=False))")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not Path(args.path).is_file():
        sys.exit(f"{args.path}: no such GGUF file (run the SmolLM2 tests once to fetch it, or pass a path)")
    if args.child:
        print(json.dumps(child(args.path, args.tokens, not args.float)))
        return
    m = measure(args.path, args.tokens, not args.float)
    if args.json:
        print(json.dumps(m))
        return
    mb = 1e6
    print(f"{args.path}: {m['file_bytes'] / mb:.1f} MB, {'kept quantized' if m['quantized'] else 'dequantized'}; "
          f"load + {m['tokens']} tokens in a fresh process")
    print(f"  peak RSS over the post-import baseline: {m['peak_bytes'] / mb:.1f} MB ({m['peak_over_file']:.2f}x the file)"
          f"; after the load alone {m['load_peak_bytes'] / mb:.1f} MB")
    print(f"  resident after: {m['after_bytes'] / mb:.1f} MB ({m['after_over_file']:.2f}x the file)")


if __name__ == "__main__":
    main()
