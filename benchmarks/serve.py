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

The server's own overhead is measured in the same run: the engine alone (no HTTP, in a fresh
process with the server's thread count) runs the same requests, submitted together, and each served
level is reported as a fraction of it (``served / engine``). Streaming and non-streaming answers are
both timed at one client (``--overhead-repeats`` answers each, best of).

    python benchmarks/serve.py                    # about 5 minutes on 2 cores
    python benchmarks/serve.py --clients 1 8      # fewer levels
    python benchmarks/serve.py --clients 1        # the overhead at one client only
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
                                       stream_options={"include_usage": True}, logit_bias={"0": -100})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return t0, (first or end) - t0, tokens, end


PROMPT = "ROMEO {i}: what light through yonder window breaks"

ENGINE_CHILD = """
import json, sys, time
import torch, moekit
from moekit.infer import Engine, SamplingParams
ckpt, clients, n_new, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if threads != "default":
    torch.set_num_threads(int(threads))
model, tok = moekit.load(ckpt)
engine = Engine(model, tok, max_batch=32, max_queue=64)
params = SamplingParams(max_new_tokens=n_new, temperature=0, top_k=0, logit_bias=((0, -100.0),))
engine.generate(["warm up"], SamplingParams(max_new_tokens=4, temperature=0))
best = 0.0
for _ in range(repeats):
    t0 = time.perf_counter()
    out = engine.generate([PROMPT.format(i=i) for i in range(clients)], params)
    best = max(best, sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0))
print(json.dumps(best))
"""


def engine_level(ckpt: Path, clients: int, n_new: int, repeats: int, threads: str) -> float:
    """Tokens/s of the engine alone on ``clients`` requests submitted together (fresh process)."""
    code = f"PROMPT = {PROMPT!r}\n" + ENGINE_CHILD
    out = subprocess.run([sys.executable, "-c", code, str(ckpt), str(clients), str(n_new), str(repeats), threads],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def served_one(base: str, model: str, n_new: int, stream: bool, repeats: int) -> float:
    """Best tokens/s of one client's answer, timed end to end through the openai client."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        if stream:
            tokens = 0
            for chunk in client.completions.create(model=model, prompt=PROMPT.format(i=0), max_tokens=n_new,
                                                   temperature=0, stream=True, logit_bias={"0": -100},
                                                   stream_options={"include_usage": True}):
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            tokens = client.completions.create(model=model, prompt=PROMPT.format(i=0), max_tokens=n_new,
                                               temperature=0, logit_bias={"0": -100}).usage.completion_tokens
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def load_level(base: str, model: str, clients: int, n_new: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    one_request(client, model, "warm up", 4)
    prompts = [PROMPT.format(i=i) for i in range(clients)]
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
    p.add_argument("--no-max-batch-1", action="store_true", help="skip the one-request-at-a-time server")
    p.add_argument("--overhead-repeats", type=int, default=5,
                   help="answers timed (best of) for the engine-alone and one-client overhead figures (default 5)")
    p.add_argument("--threads", default="default", help="torch threads for the server (default: the server's "
                   "own default, the cores less one); the engine alone always runs with torch's default, its best")
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
    if args.no_max_batch_1:
        del peers["moekit serve, one request at a time (--max-batch 1)"]
    threads_flag = [] if args.threads == "default" else ["--threads", args.threads]
    rows = []
    engine = {c: engine_level(ckpt, c, args.new_tokens, args.overhead_repeats, "default") for c in args.clients}
    for c, tok_s in engine.items():
        rows.append(("moekit engine alone (no HTTP, requests submitted together)", c, {"tok_s": tok_s}))
        print(f"{'moekit engine alone':55s} clients {c:3d}: {tok_s:7.1f} tok/s", flush=True)
    overhead = []
    for name, flags in peers.items():
        port = _port()
        base = f"http://127.0.0.1:{port}"
        proc = start([sys.executable, "-m", "moekit", "serve", str(ckpt), "--port", str(port), "--model-name", "bench",
                      "--max-queue", "64", *threads_flag, *flags], base)
        try:
            if "--max-batch" in flags and flags[flags.index("--max-batch") + 1] == "32" and 1 in args.clients:
                for stream in (True, False):
                    tok_s = served_one(base, "bench", args.new_tokens, stream, args.overhead_repeats)
                    overhead.append((stream, tok_s, tok_s / engine[1]))
                    print(f"one client, {'streaming' if stream else 'not streaming'}: {tok_s:.1f} tok/s = "
                          f"{tok_s / engine[1]:.2f}x the engine alone", flush=True)
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
    print("\n| server | clients | tokens/s | x engine alone | TTFT p50 | TTFT p95 |\n|---|---|---|---|---|---|")
    for name, c, r in rows:
        ttft = (f"{r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s") if "ttft_p50" in r else "- | -"
        print(f"| {name} | {c} | {r['tok_s']:.1f} | {r['tok_s'] / engine[c]:.2f} | {ttft} |")
    for stream, tok_s, ratio in overhead:
        print(f"| one client, best of {args.overhead_repeats}, {'streaming' if stream else 'not streaming'} | 1 | "
              f"{tok_s:.1f} | {ratio:.2f} | - | - |")


if __name__ == "__main__":
    main()
