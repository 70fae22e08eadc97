"""Serving throughput: `moekit serve` with continuous batching against the same server forced to one
request at a time (``--max-batch 1``), at 1, 8 and 32 concurrent clients.

Model: the Mixtral-shaped benchmark model of ``benchmarks/decode.py`` (8 layers, width 512, 8 experts
of 1024, top-2, vocabulary 8192; random weights, float32), saved once with a BPE tokenizer trained on
the embedded corpus. Each client sends one streaming completion (64 new tokens, greedy, usage in the
last chunk) through the ``openai`` client; reported: aggregate generated tokens per second (all
tokens over the wall time from the first request to the last answer) and time to first token (p50,
p95). llama.cpp's ``llama-server`` is the other peer: it runs when ``--llama-server PATH`` is given (it is
not part of moekit; build it from the llama.cpp sources in the llama-cpp-python source package with
cmake, target ``llama-server``), on the same model exported to GGUF in float32, with ``-np 32``.

    python benchmarks/serve.py                    # about 5 minutes on 2 cores
    python benchmarks/serve.py --clients 1 8      # fewer levels
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


def one_request(client, model: str, prompt: str, n_new: int) -> tuple[float, float, int, float]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=n_new, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return t0, (first or end) - t0, tokens, end


def load_level(base: str, model: str, clients: int, n_new: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    one_request(client, model, "warm up", 4)
    prompts = [f"ROMEO {i}: what light through yonder window breaks" for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(client, model, p, n_new), prompts))
    start_t = min(r[0] for r in results)
    end_t = max(r[3] for r in results)
    ttft = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    return {"tok_s": tokens / (end_t - start_t), "tokens": tokens, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (default 1 8 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per answer (default 64)")
    p.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server (optional peer)")
    p.add_argument("--gguf", default=None,
                   help="the benchmark model as GGUF for --llama-server (default: exported here, float32)")
    args = p.parse_args()

    from decode import build_model, model_config

    import moekit
    from moekit.data import train_tokenizer
    from moekit.data.corpus import load_shakespeare

    work = Path(tempfile.mkdtemp(prefix="moekit-serve-bench-"))
    tok = train_tokenizer(iter([load_shakespeare("train")]), 8192)
    ckpt = moekit.save(build_model(model_config(512), 0), tok, work / "bench")
    peers = {
        "moekit serve (continuous batching, --max-batch 32)": ["--max-batch", "32"],
        "moekit serve, one request at a time (--max-batch 1)": ["--max-batch", "1"],
    }
    rows = []
    for name, flags in peers.items():
        port = _port()
        base = f"http://127.0.0.1:{port}"
        proc = start([sys.executable, "-m", "moekit", "serve", str(ckpt), "--port", str(port), "--model-name", "bench",
                      "--max-queue", "64", *flags], base)
        try:
            for c in args.clients:
                r = load_level(base, "bench", c, args.new_tokens)
                rows.append((name, c, r))
                print(f"{name:55s} clients {c:3d}: {r['tok_s']:7.1f} tok/s  ttft p50 {r['ttft_p50']:.2f} s  "
                      f"p95 {r['ttft_p95']:.2f} s  ({r['tokens']} tokens)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.llama_server and not args.gguf:  # the same model and tokenizer as GGUF (float32, as served above)
        args.gguf = str(moekit.save(moekit.load(ckpt)[0], tok, work / "bench.gguf"))
    if args.llama_server:
        port = _port()
        base = f"http://127.0.0.1:{port}"
        proc = start([args.llama_server, "-m", args.gguf, "--port", str(port), "-np", "32", "-c", str(512 * 32),
                      "-t", str(os.cpu_count())], base)
        try:
            for c in args.clients:
                r = load_level(base, "bench", c, args.new_tokens)
                rows.append(("llama-server -np 32", c, r))
                print(f"{'llama-server -np 32':55s} clients {c:3d}: {r['tok_s']:7.1f} tok/s  "
                      f"ttft p50 {r['ttft_p50']:.2f} s  p95 {r['ttft_p95']:.2f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("\n| server | clients | tokens/s | TTFT p50 | TTFT p95 |\n|---|---|---|---|---|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s |")


if __name__ == "__main__":
    main()
