"""Decode speed: moekit's inference engine against ``transformers``, llama.cpp through llama-cpp-python
and llama.cpp's own ``llama-bench`` / ``llama-batched-bench``, on one Mixtral-shaped model, in one run,
in float32 and with quantized weights (moekit int8 / int4 against llama.cpp Q8_0 / Q4_0).

The model is built from a seed (random weights: speed does not depend on them): 8 layers, width 512,
8 heads / 4 KV heads, 8 experts of width 1024, top-2, vocabulary 8192, untied head, float32. moekit
exports it once per run (``moekit.save`` as a Hugging Face directory and as f32, q8_0 and q4_0 GGUF
files), so every peer runs the same weights on the same prompts (random token ids), greedily, with 2
threads. moekit's quantized rows build the same seeded model in their process and quantize it there
(``moekit.quant.quantize_model``: int8 per output channel, or int4 in groups of 32; the untied
lm_head is int8 in both, as llama.cpp keeps its output tensor at Q8_0 in a q4_0 file). Each peer
runs in its own process, one after the other, after a warm-up (no peer inherits another's heap or
thread pools; see ``train_throughput.py`` for why that matters on this machine).

Measured for each peer (medians over ``--repeats``):
- decode at batch 1 and at batch 8 (aggregate: tokens of all rows per second) after a 16-token
  prompt: tokens after the first / time after the first token (the first token pays the prefill);
- prefill of a 512-token prompt: prompt tokens / time to the first token;
- fraction of the memory-bandwidth limit at batch 1: the bytes of weights one decoded token reads
  (attention, router, the top-k experts, norms, lm_head; not the embedding table, of which a token
  reads one row) x tok/s / the read bandwidth measured in the same run. The bytes are each peer's
  own: summed over the moekit model's tensors as they are after loading (float parameters and
  quantized weights with their scales: int8 1 byte + a bfloat16 scale per row, int4 0.5 byte + a
  bfloat16 scale and zero per 32), over the GGUF file's tensors for llama.cpp (Q8_0 34 bytes per 32
  weights, Q4_0 18 per 32 with the output tensor at Q8_0), float32 for transformers;
- memory after loading, per moekit precision: the bytes the model holds (float parameters plus
  quantized weights) and the growth of the child process's ``RssAnon`` (``/proc/self/status``) from
  before building the model to after building / casting / quantizing it (freed temporaries handed
  back with ``malloc_trim`` first); and the size of each GGUF file;
- moekit only: a continuous batch (requests of random lengths join and leave, ``max_batch=32``),
  as aggregate tok/s and relative to its batch-1 decode.

Rows: moekit's ``Engine`` (what counts) and, for reference, the ``Runner`` it calls in a bare greedy
loop; ``transformers``' ``MixtralForCausalLM.generate`` with its default dynamic cache and with a
static one; llama-cpp-python's ``Llama.generate`` (one sequence: no batch-8 figure); llama.cpp's C++
benchmarks; moekit's Engine with int8 / int4 weights against llama.cpp's C++ benchmarks on the q8_0 /
q4_0 exports. Then the ratios moekit Engine / each peer, at equal precision (moekit int8 / llama.cpp
q8_0, int4 / q4_0), the memory table, the continuous batch, and a check that the greedy tokens agree
(same weights in every float peer).

NOTE: every peer runs OpenMP-style thread pools; on a machine with other load, a pool thread that
loses its core stalls the others and single figures drop by up to 10x. Run it on a quiet machine.

llama-bench and llama-batched-bench are built from the llama.cpp sources inside the
llama-cpp-python source package (the same llama.cpp as the Python peer, compiled for this CPU);
the script looks for them in ``~/.cache/moekit-bench/build/bin`` and builds them there with
``--build-llama`` (~5 minutes on 2 cores). A peer that is not available is skipped with a note.

    python benchmarks/decode.py                          # everything: ~5 minutes on 2 cores (quiet)
    python benchmarks/decode.py --quick                  # smoke test: small token counts
    python benchmarks/decode.py --skip moekit-int4 --skip llama.cpp-q4_0   # leave out a precision
    python benchmarks/decode.py --skip transformers --json decode.json
    python benchmarks/decode.py --build-llama            # build the llama.cpp binaries if missing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit import ModelConfig, Transformer
from moekit.utils import tune_cpu_allocator

CACHE_DIR = Path(os.environ.get("MOEKIT_BENCH_CACHE", "~/.cache/moekit-bench")).expanduser()
LLAMA_BINARIES = ("llama-bench", "llama-batched-bench")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the version in the venv: its sources hold the llama.cpp we build
#: Peers in the order they run, with the row label of the table.
PEERS = {"moekit": "moekit Engine", "moekit-runner": "moekit Runner (no engine)",
         "moekit-bf16": "moekit Engine, bfloat16 weights",
         "moekit-int8": "moekit Engine, int8 weights", "moekit-int4": "moekit Engine, int4 weights (group 32)",
         "moekit-torch": "moekit Engine, PyTorch path (no native kernels)",
         "moekit-int8-torch": "moekit Engine, int8, PyTorch path", "moekit-int4-torch": "moekit Engine, int4, PyTorch path",
         "transformers": "transformers generate", "transformers-static": "transformers generate, static cache",
         "llama-cpp-python": "llama-cpp-python",
         "llama.cpp": "llama.cpp (llama-bench / batched-bench)",
         "llama.cpp-q8_0": "llama.cpp q8_0", "llama.cpp-q4_0": "llama.cpp q4_0"}
GGUF_TYPES = ("f32", "q8_0", "q4_0")  # the GGUF files written per run
#: llama.cpp's C++ benchmark peers and the GGUF tensor type of the file each runs.
LLAMA_PEERS = {"llama.cpp": "f32", "llama.cpp-q8_0": "q8_0", "llama.cpp-q4_0": "q4_0"}


@dataclass(frozen=True)
class Precision:
    """How a moekit Engine peer holds its weights: ``dtype`` of the float tensors, ``quant`` the bits and
    group size given to ``quantize_model`` (None: not quantized); ``gguf`` the GGUF type of the same precision."""

    label: str
    dtype: torch.dtype
    quant: tuple[int, int | None] | None
    gguf: str | None
    native: bool | None = None  # the Engine's native kernels: None where built, False the PyTorch path


MOEKIT_PRECISIONS = {"moekit": Precision("float32", torch.float32, None, "f32"),
                     "moekit-bf16": Precision("bfloat16", torch.bfloat16, None, None),
                     "moekit-int8": Precision("int8", torch.float32, (8, None), "q8_0"),
                     "moekit-int4": Precision("int4, group 32", torch.float32, (4, 32), "q4_0"),
                     "moekit-torch": Precision("float32, PyTorch path", torch.float32, None, None, False),
                     "moekit-int8-torch": Precision("int8, PyTorch path", torch.float32, (8, None), None, False),
                     "moekit-int4-torch": Precision("int4, PyTorch path", torch.float32, (4, 32), None, False)}
#: Equal-precision comparisons: moekit peer -> llama.cpp peer.
SAME_PRECISION = {"moekit": "llama.cpp", "moekit-int8": "llama.cpp-q8_0", "moekit-int4": "llama.cpp-q4_0"}
BATCH = 8  # rows of the batched decode


def model_config(max_seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, num_experts=8,
                       top_k=2, max_seq_len=max_seq_len, tie_embeddings=False)


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    """The benchmark model: the same weights in every process for the same seed."""
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def bytes_per_decoded_token(cfg: ModelConfig) -> int:
    """Weight bytes one batch-1 decode step reads: every active parameter except the embedding table,
    of which a step reads one row (with tied embeddings the table is the head, read in full)."""
    _, active = cfg.param_counts()
    if not cfg.tie_embeddings:
        active -= cfg.vocab_size * cfg.dim
    return active * 4  # float32


def _read_share(name: str, cfg: ModelConfig) -> float:
    """Fraction of a moekit tensor that one batch-1 decode step reads: top-k of E of the routed experts'
    stacks, none of an untied embedding table (one row), all of anything else."""
    if name == "embed.weight" and not cfg.tie_embeddings:
        return 0.0
    return cfg.top_k / cfg.num_experts if ".experts." in name else 1.0


def model_bytes(model: Transformer) -> tuple[int, float]:
    """(bytes the model holds, weight bytes one batch-1 decoded token reads), from the tensors as they are:
    float parameters plus quantized weights (values, scales, zeros)."""
    from moekit.quant import quantized_weights

    cfg = model.cfg
    held, per_token = 0, 0.0
    tensors = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters()]
    tensors += [(n, w.nbytes()) for n, w in quantized_weights(model).items()]
    for name, nbytes in tensors:
        held += nbytes
        per_token += nbytes * _read_share(name, cfg)
    return held, per_token


def gguf_bytes(path: Path, cfg: ModelConfig) -> dict:
    """Size of a GGUF file and the weight bytes one batch-1 decoded token reads from its tensors (their
    stored sizes: Q8_0 34 bytes per 32 weights, Q4_0 18; top-k of the ``*_exps`` stacks, no embedding)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    per_token = 0.0
    for name, nbytes in tensors.items():
        if name == "token_embd.weight" and "output.weight" in tensors:
            continue
        per_token += nbytes * (cfg.top_k / cfg.num_experts if "_exps." in name else 1)
    return {"path": str(path), "file_bytes": path.stat().st_size, "bytes_per_token": per_token}


def rss_anon() -> int | None:
    """This process's anonymous resident memory (``RssAnon`` of /proc/self/status), bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Bytes/s read from a float32 buffer far larger than the caches, best of ``repeats``: by
    ``torch.sum`` and by a matrix-vector product (what a batch-1 decode does with each weight)."""
    torch.set_num_threads(threads)
    x = torch.ones(mib << 18)  # mib MiB of float32
    w, v = x.view(-1, 1024), torch.ones(1024)
    out = {}
    for name, fn in (("sum", lambda: x.sum()), ("gemv", lambda: torch.mv(w, v))):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = x.numel() * 4 / best
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- one peer, in its own process
@dataclass
class Run:
    """One generation call: seconds from the call until every row has its first new token, and until
    the last one; the tokens of row 0."""

    first: float
    end: float
    ids: list[int]


def measure(gen, batched: bool, plan: dict) -> dict:
    """Warm up, then time decode at batch 1 and ``BATCH`` (when ``gen`` takes several prompts) and the
    prefill, ``repeats`` times each, interleaved so that drifting machine load hits all alike.

    ``gen(prompts, n_new)`` generates exactly ``n_new`` tokens greedily for each prompt -> :class:`Run`.
    """
    n, prompts, long = plan["new_tokens"], plan["decode_prompts"], plan["prefill_prompt"]
    batches = [1, BATCH] if batched else [1]
    for b in batches:  # warm-up: first calls allocate caches and buffers, pick kernels
        gen(prompts[:b], 4)
    gen([long], 1)
    out: dict = {"decode_b1": [], f"decode_b{BATCH}": [], "prefill": []}
    for _ in range(plan["repeats"]):
        for b in batches:
            r = gen(prompts[:b], n)
            out[f"decode_b{b}"].append(b * (n - 1) / (r.end - r.first))
            if b == 1:
                out["ids_b1"] = r.ids
        r = gen([long], 1)
        out["prefill"].append(len(long) / r.first)
    return out


def _load_tokenizer(plan: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(plan["tokenizer"])


def peer_moekit(plan: dict, peer: str = "moekit") -> dict:
    """moekit's Engine as a server drives it: requests in, ``step()`` until no work is left; the weights in
    the precision of ``peer`` (cast or quantized in place after building the seeded model)."""
    from moekit.infer import Engine, SamplingParams
    from moekit.quant import quantize_model
    from moekit.utils import release_free_memory

    precision = MOEKIT_PRECISIONS[peer]
    tokenizer = _load_tokenizer(plan)
    release_free_memory()
    rss0 = rss_anon()
    model = build_model(ModelConfig.from_dict(plan["config"]), plan["seed"]).to(precision.dtype)
    if precision.quant is not None:
        quantize_model(model, *precision.quant)
    rss_untrimmed = rss_anon()
    release_free_memory()  # the float32 originals of cast or quantized weights are free now
    rss1 = rss_anon()
    held, per_token = model_bytes(model)
    memory = {"model_bytes": held, "rss_anon_growth": None if rss0 is None else rss1 - rss0,
              "rss_anon_growth_untrimmed": None if rss0 is None else rss_untrimmed - rss0}
    engines: dict[int, Engine] = {}

    def gen(prompts: list[list[int]], n_new: int) -> Run:
        B = len(prompts)
        if B not in engines:  # one engine per batch size, sized as a server would size it
            engines[B] = Engine(model, tokenizer, max_batch=B, max_len=plan["max_len"], native=precision.native)
        engine = engines[B]
        params = SamplingParams(max_new_tokens=n_new, temperature=0, stop_ids=())
        t0 = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        got: dict[str, list[int]] = {i: [] for i in ids}
        first = None
        while engine.has_work():
            for ev in engine.step():
                if ev.token_id is not None:
                    got[ev.request_id].append(ev.token_id)
            if first is None and all(got.values()):
                first = time.perf_counter() - t0
        end = time.perf_counter() - t0
        for i in ids:
            if len(got[i]) != n_new:
                raise RuntimeError(f"engine bug? request {i} produced {len(got[i])} tokens, asked for exactly {n_new} "
                                   f"(stop_ids=(), finish reason {engine.request(i).finish_reason!r})")
            engine.release(i)
        return Run(first, end, got[ids[0]])

    out = measure(gen, True, plan)
    out.update(memory=memory, bytes_per_token=per_token)
    if peer == "moekit" and plan["continuous"] is not None:
        out["continuous"] = continuous_batch(Engine, SamplingParams, model, tokenizer, plan["continuous"])
    return out


def continuous_batch(Engine, SamplingParams, model, tokenizer, spec: dict) -> dict:
    """Requests of random lengths arriving over time (by decode step), joining and leaving a batch of at
    most ``max_batch``: generated tokens per second of the whole run, prefills included."""
    engine = Engine(model, tokenizer, max_batch=spec["max_batch"], max_len=spec["max_len"])
    requests = sorted(spec["requests"], key=lambda r: r["arrival"])
    batch_sizes, step, i = [], 0, 0
    t0 = time.perf_counter()
    while i < len(requests) or engine.has_work():
        if not engine.has_work():  # idle: the next request arrives now
            step = max(step, requests[i]["arrival"])
        while i < len(requests) and requests[i]["arrival"] <= step:
            r = requests[i]
            engine.add_request(r["prompt"], SamplingParams(max_new_tokens=r["new_tokens"], temperature=0, stop_ids=()))
            i += 1
        engine.step()
        step += 1
        if engine.stats.batch_size:
            batch_sizes.append(engine.stats.batch_size)
    seconds = time.perf_counter() - t0
    generated, asked = engine.stats.generated_tokens, sum(r["new_tokens"] for r in requests)
    if generated != asked:
        raise RuntimeError(f"engine bug? the continuous batch generated {generated} tokens, asked for {asked}")
    return {"tok_s": generated / seconds, "seconds": seconds, "generated_tokens": generated,
            "prompt_tokens": engine.stats.prompt_tokens, "steps": engine.stats.steps,
            "mean_decode_batch": statistics.mean(batch_sizes), "max_decode_batch": max(batch_sizes)}


def peer_moekit_runner(plan: dict) -> dict:
    """The forward pass the engine calls (``moekit.infer.runner.Runner``) in a bare greedy loop: no
    requests, events, per-row sampling or detokenizing. The gap to the engine is the engine's cost."""
    from moekit.infer.runner import Runner

    model = build_model(ModelConfig.from_dict(plan["config"]), plan["seed"])
    runners: dict[int, Runner] = {}

    def gen(prompts: list[list[int]], n_new: int) -> Run:
        B = len(prompts)
        if B not in runners:
            runners[B] = Runner(model, B, plan["max_len"])
        runner, slots = runners[B], list(range(B))
        with torch.inference_mode():
            t0 = time.perf_counter()
            last_BV = torch.cat([runner(torch.tensor([p]), [b], [0]) for b, p in enumerate(prompts)])
            tok_B = last_BV.argmax(-1)
            first = time.perf_counter() - t0
            out = [tok_B]
            for i in range(n_new - 1):
                tok_B = runner(tok_B[:, None], slots, [len(p) + i for p in prompts]).argmax(-1)
                out.append(tok_B)
            end = time.perf_counter() - t0
        return Run(first, end, [int(t[0]) for t in out])

    return measure(gen, True, plan)


def peer_transformers(plan: dict, cache: str) -> dict:
    """``MixtralForCausalLM`` loaded from moekit's HF export, greedy ``generate`` of exactly n tokens with
    its ``cache`` ("dynamic": its default; "static": preallocated, without torch.compile on a CPU)."""
    import transformers
    from transformers import MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    model = MixtralForCausalLM.from_pretrained(plan["hf_dir"], dtype=torch.float32,
                                               experts_implementation=plan["hf_experts"]).eval()

    class Clock(BaseStreamer):
        """Time of each ``put``: generate puts the prompt first, then each new token (all rows at once)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def gen(prompts: list[list[int]], n_new: int) -> Run:
        x = torch.tensor(prompts)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, streamer=clock, cache_implementation=cache,
                                 disable_compile=True, pad_token_id=plan["pad_id"])
        end = time.perf_counter() - t0
        return Run(clock.times[1] - t0, end, out[0, x.shape[1]:].tolist())

    out = measure(gen, True, plan)
    out["note"] = f"{cache} cache, experts_implementation={plan['hf_experts']}"
    return out


def peer_llama_cpp_python(plan: dict) -> dict:
    """llama.cpp through llama-cpp-python's ``Llama.generate``: greedy, Python's per-token cost included.
    One sequence at a time (the high-level API has no batch of independent sequences)."""
    import llama_cpp
    from llama_cpp import Llama

    T = plan["threads"]
    llm = Llama(model_path=plan["gguf"], n_threads=T, n_threads_batch=T, n_ctx=plan["max_len"],
                n_batch=len(plan["prefill_prompt"]), verbose=False)

    def gen(prompts: list[list[int]], n_new: int) -> Run:
        llm.reset()  # NOTE: else generate reuses the cached prefix of a repeated prompt and skips its prefill
        ids, first = [], None
        t0 = time.perf_counter()
        for tok in llm.generate(prompts[0], temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter() - t0
            ids.append(tok)
            if len(ids) == n_new:
                break
        return Run(first, time.perf_counter() - t0, ids)

    out = measure(gen, False, plan)
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = [f.split(" = ")[0].split(":")[-1].strip() for f in info.split("|") if f.strip().endswith("= 1")]
    out["note"] = "the wheel's ggml CPU features: " + " ".join(features)
    return out


CHILD_PEERS = {"moekit": peer_moekit, "moekit-runner": peer_moekit_runner,
               "moekit-bf16": lambda plan: peer_moekit(plan, "moekit-bf16"),
               "moekit-int8": lambda plan: peer_moekit(plan, "moekit-int8"),
               "moekit-torch": lambda plan: peer_moekit(plan, "moekit-torch"),
               "moekit-int8-torch": lambda plan: peer_moekit(plan, "moekit-int8-torch"),
               "moekit-int4-torch": lambda plan: peer_moekit(plan, "moekit-int4-torch"),
               "moekit-int4": lambda plan: peer_moekit(plan, "moekit-int4"),
               "transformers": lambda plan: peer_transformers(plan, "dynamic"),
               "transformers-static": lambda plan: peer_transformers(plan, "static"),
               "llama-cpp-python": peer_llama_cpp_python}


def run_child(peer: str, workdir: Path) -> None:
    plan = json.loads((workdir / "plan.json").read_text())
    torch.set_num_threads(plan["threads"])
    tune_cpu_allocator()  # what moekit's CLI does; both torch peers get it (see BENCHMARKS.md)
    print(json.dumps(CHILD_PEERS[peer](plan)))


# --------------------------------------------------------------------------- llama.cpp's own benchmarks
def find_llama_binaries(bin_dir: Path) -> dict[str, Path] | None:
    paths = {name: bin_dir / name for name in LLAMA_BINARIES}
    return paths if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()) else None


def build_llama(cache_dir: Path, threads: int) -> None:
    """Download the llama-cpp-python source package (PyPI), unpack it and build llama-bench and
    llama-batched-bench from its vendored llama.cpp into ``cache_dir/build``, for this CPU."""
    if shutil.which("cmake") is None:
        raise RuntimeError("--build-llama needs cmake and a C++ compiler on PATH")
    src = cache_dir / "src"
    tarball = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not tarball.exists():
        print(f"[build-llama] downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sources to {src}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(src)], check=True)
    tree = src / tarball.name.removesuffix(".tar.gz")
    if not tree.exists():
        print(f"[build-llama] unpacking {tarball.name}", flush=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(src, filter="data")
    build = cache_dir / "build"
    print(f"[build-llama] configuring {build} (GGML_NATIVE=ON, Release)", flush=True)
    subprocess.run(["cmake", "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(build), "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=subprocess.DEVNULL)
    print(f"[build-llama] compiling {', '.join(LLAMA_BINARIES)} (about 5 minutes on 2 cores)", flush=True)
    subprocess.run(["cmake", "--build", str(build), f"-j{threads}", "--target", *LLAMA_BINARIES], check=True)


def peer_llama_cpp(bins: dict[str, Path], plan: dict, gguf_path: str) -> dict:
    """llama-bench (prefill ppP, decode tgN at batch 1; its own repeats and warm-up) and
    llama-batched-bench (decode of ``BATCH`` parallel sequences after a prompt each, aggregate), on the
    GGUF file ``gguf_path``."""
    T, n, P, reps = str(plan["threads"]), plan["new_tokens"], len(plan["prefill_prompt"]), plan["repeats"]
    cmd = [str(bins["llama-bench"]), "-m", gguf_path, "-t", T, "-p", str(P), "-n", str(n), "-r", str(reps),
           "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out: dict = {"prefill": [], "decode_b1": [], f"decode_b{BATCH}": [], "decode_b1_batched_bench": []}
    for r in rows:
        if r["n_gen"] == 0 and r["n_prompt"] == P:
            out["prefill"] = r["samples_ts"]
        elif r["n_gen"] == n and r["n_prompt"] == 0:
            out["decode_b1"] = r["samples_ts"]
    ctx = max(4096, BATCH * (plan["prompt_len"] + n))
    cmd = [str(bins["llama-batched-bench"]), "-m", gguf_path, "-t", T, "-c", str(ctx), "-npp",
           str(plan["prompt_len"]), "-ntg", str(n), "-npl", f"1,{BATCH}", "--output-format", "jsonl"]
    for _ in range(reps):
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in (res.stdout + "\n" + res.stderr).splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                r = json.loads(line)
                key = "decode_b1_batched_bench" if r["pl"] == 1 else f"decode_b{BATCH}"
                out[key].append(r["speed_tg"])
    cpu = rows[0].get("cpu_info", "?") if rows else "?"
    out["note"] = (f"build {rows[0].get('build_commit', '?') if rows else '?'}, {cpu}; batch-1 decode from "
                   f"llama-bench tg{n} (empty context), batch {BATCH} from batched-bench after {plan['prompt_len']}-token "
                   "prompts")
    return out


# --------------------------------------------------------------------------- the run
def make_plan(args, workdir: Path, cfg: ModelConfig) -> dict:
    """Everything a child needs: settings, paths of the exports, the prompts (random ids, no specials)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    lo = 2  # ids 0 and 1 are <|endoftext|> and <|pad|>
    decode_prompts = torch.randint(lo, cfg.vocab_size, (BATCH, args.prompt_len), generator=g).tolist()
    prefill_prompt = torch.randint(lo, cfg.vocab_size, (args.prefill,), generator=g).tolist()
    spec = None
    if "continuous" not in args.skip:
        rng = random.Random(args.seed + 2)
        n_req, (p_lo, p_hi), (n_lo, n_hi) = args.cb_requests, args.cb_prompt, args.cb_new
        spec = {"max_batch": args.cb_batch, "max_len": p_hi + n_hi,
                # arrivals: one request per engine step on average, uniformly spread
                "requests": [{"arrival": rng.randrange(n_req), "new_tokens": rng.randint(n_lo, n_hi),
                              "prompt": [rng.randrange(lo, cfg.vocab_size) for _ in range(rng.randint(p_lo, p_hi))]}
                             for _ in range(n_req)]}
    return {"seed": args.seed, "threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "decode_prompts": decode_prompts, "prefill_prompt": prefill_prompt,
            "config": cfg.to_dict(), "max_len": cfg.max_seq_len, "continuous": spec,
            "tokenizer": str(workdir / "tokenizer.json"), "hf_dir": str(workdir / "hf"),
            "gguf": str(workdir / "m.gguf"), "gguf_files": {t: str(gguf_path(workdir, t)) for t in GGUF_TYPES},
            "pad_id": 1, "hf_experts": args.hf_experts}


def gguf_path(workdir: Path, dtype: str) -> Path:
    return workdir / ("m.gguf" if dtype == "f32" else f"m-{dtype}.gguf")


def export_model(cfg: ModelConfig, seed: int, workdir: Path) -> None:
    """Build the model, train a tokenizer with exactly ``vocab_size`` tokens (its content does not matter
    for speed: prompts are random ids) and write the HF directory and the f32, q8_0 and q4_0 GGUF files
    the peers load (the quantized ones are also measured for their size: a few seconds each)."""
    import moekit
    from moekit.data.corpus import load_shakespeare
    from moekit.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([load_shakespeare("train")[:1_000_000]], vocab_size=cfg.vocab_size)
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise RuntimeError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}: "
                           "train it on more text")
    tokenizer.save(str(workdir / "tokenizer.json"))
    model = build_model(cfg, seed)
    moekit.save(model, tokenizer, workdir / "hf", format="hf")
    for dtype in GGUF_TYPES:
        moekit.save(model, tokenizer, gguf_path(workdir, dtype), format="gguf", dtype=dtype)


def run_peer(peer: str, workdir: Path) -> dict:
    """One peer in a fresh process; its result is the JSON on the last line of its output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(json.loads((workdir / "plan.json").read_text())["threads"]))
    res = subprocess.run([sys.executable, __file__, "--child", peer, "--workdir", str(workdir)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"exit code {res.returncode}:\n" + "\n".join(res.stderr.strip().splitlines()[-25:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(xs) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 1e6


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two greedy outputs."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 new tokens, 128-token prefill, 1 repeat, 16-request continuous batch")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each measurement (default 3; "
                        "--quick 1); medians are reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts (default 0)")
    parser.add_argument("--skip", action="append", default=[], choices=[*PEERS, "continuous"],
                        help="leave out a peer, or moekit's continuous batch (repeatable)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=2, help="threads of every peer (default 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence in the decode "
                        "measurements (default 128; --quick 16)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before the decode (default 16)")
    parser.add_argument("--prefill", type=int, default=None, help="prompt tokens of the prefill measurement "
                        "(default 512; --quick 128)")
    parser.add_argument("--hf-experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                        help="transformers' experts_implementation (default grouped_mm, its own default)")
    parser.add_argument("--llama-bin-dir", default=str(CACHE_DIR / "build" / "bin"),
                        help=f"where llama-bench and llama-batched-bench are (default {CACHE_DIR}/build/bin)")
    parser.add_argument("--build-llama", action="store_true",
                        help=f"build the llama.cpp binaries into {CACHE_DIR}/build when they are missing (~5 min)")
    parser.add_argument("--workdir", default=None, help="write the exported model here and keep it (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: child process mode
    args = parser.parse_args()
    if args.child:
        run_child(args.child, Path(args.workdir))
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.prefill = args.prefill or (128 if args.quick else 512)
    args.cb_requests, args.cb_batch = (16, 32) if args.quick else (64, 32)
    args.cb_prompt, args.cb_new = ((8, 64), (4, 16)) if args.quick else ((8, 64), (16, 96))
    for name in ("repeats", "threads", "prompt_len", "prefill"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (decode speed is timed after the first token), got {args.new_tokens}")

    cfg = model_config(max(1024, args.prefill + 1, args.prompt_len + args.new_tokens))
    total, _ = cfg.param_counts()
    per_token = bytes_per_decoded_token(cfg)
    print(f"torch {torch.__version__}, {args.threads} threads per peer; model: {cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_heads}/{cfg.n_kv_heads} heads, {cfg.num_experts} experts top-{cfg.top_k} (width {cfg.expert_ffn_dim}), "
          f"vocab {cfg.vocab_size}, float32, {total / 1e6:.1f}M parameters, {per_token / 1e6:.1f} MB of weights read "
          f"per decoded token")
    print(f"decode: {args.prompt_len}-token prompts, {args.new_tokens} new tokens, batch 1 and {BATCH}; prefill: "
          f"{args.prefill} tokens; {args.repeats} repeat(s), medians", flush=True)

    peers = [p for p in PEERS if p not in args.skip]
    bins = None
    if set(LLAMA_PEERS) & set(peers):
        bin_dir = Path(args.llama_bin_dir).expanduser()
        bins = find_llama_binaries(bin_dir)
        if bins is None and args.build_llama:
            try:
                build_llama(CACHE_DIR, args.threads)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"NOTE: the llama.cpp build failed: {e}")
            bin_dir = CACHE_DIR / "build" / "bin"
            bins = find_llama_binaries(bin_dir)
        if bins is None:
            print(f"NOTE: skipping llama.cpp's llama-bench/llama-batched-bench: not found in {bin_dir} "
                  "(run with --build-llama to build them, ~5 minutes)")
            peers = [p for p in peers if p not in LLAMA_PEERS]
    if "llama-cpp-python" in peers:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("NOTE: skipping llama-cpp-python: not installed (pip install llama-cpp-python)")
            peers.remove("llama-cpp-python")
    if {"transformers", "transformers-static"} & set(peers):
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("NOTE: skipping transformers: not installed")
            peers = [p for p in peers if not p.startswith("transformers")]

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moekit-decode-")
        workdir = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        export_model(cfg, args.seed, workdir)
        plan = make_plan(args, workdir, cfg)
        (workdir / "plan.json").write_text(json.dumps(plan))
        ggufs = {t: gguf_bytes(gguf_path(workdir, t), cfg) for t in GGUF_TYPES}
        print(f"exported the model (HF directory, {', '.join(GGUF_TYPES)} GGUF) to {workdir} in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

        bandwidth = [read_bandwidth(args.threads)]
        results: dict[str, dict] = {}
        for peer in peers:
            t0 = time.perf_counter()
            print(f"running {peer} ...", end=" ", flush=True)
            try:
                if peer in LLAMA_PEERS:
                    results[peer] = peer_llama_cpp(bins, plan, plan["gguf_files"][LLAMA_PEERS[peer]])
                else:
                    results[peer] = run_peer(peer, workdir)
                print(f"{time.perf_counter() - t0:.0f} s", flush=True)
            except (RuntimeError, subprocess.CalledProcessError, json.JSONDecodeError, OSError) as e:
                detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
                print(f"FAILED after {time.perf_counter() - t0:.0f} s: {detail}", flush=True)
                results[peer] = {"error": str(detail)}
        bandwidth.append(read_bandwidth(args.threads))
    finally:
        if tmp is not None:
            tmp.cleanup()

    report(args, cfg, per_token, bandwidth, results, ggufs)


def peer_bytes_per_token(peer: str, result: dict, per_token: int, ggufs: dict[str, dict]) -> float:
    """Weight bytes one batch-1 decoded token reads in ``peer``: moekit's peers measure their own model,
    llama.cpp's are read from the GGUF file they run, transformers runs the float32 weights."""
    if "bytes_per_token" in result:
        return result["bytes_per_token"]
    if peer in LLAMA_PEERS:
        return ggufs[LLAMA_PEERS[peer]]["bytes_per_token"]
    if peer == "llama-cpp-python":
        return ggufs["f32"]["bytes_per_token"]
    return per_token


def report(args, cfg: ModelConfig, per_token: int, bandwidth: list[dict[str, float]], results: dict[str, dict],
           ggufs: dict[str, dict]) -> None:
    bw = max(max(b.values()) for b in bandwidth)
    print(f"\nread bandwidth, {args.threads} threads, 512 MiB float32 buffer, best of 5 (before / after the peers): "
          + " / ".join(f"sum {b['sum'] / 1e9:.1f}, matrix-vector {b['gemv'] / 1e9:.1f} GB/s" for b in bandwidth)
          + f"; limit used: {bw / 1e9:.1f} GB/s = {bw / per_token:.1f} tok/s at {per_token / 1e6:.1f} MB per token")
    print(f"\n| engine | decode b1 (tok/s) | decode b{BATCH} aggregate (tok/s) | prefill {args.prefill} (tok/s) "
          "| weights read per b1 token (MB) | b1 fraction of bandwidth |")
    print("|---|---|---|---|---|---|")
    figures: dict[str, dict] = {}
    for peer, r in results.items():
        if "error" in r:
            print(f"| {PEERS[peer]} | failed | failed | failed | | |")
            continue
        f = {"decode_b1": _median(r["decode_b1"]), f"decode_b{BATCH}": _median(r.get(f"decode_b{BATCH}")),
             "prefill": _median(r["prefill"])}
        f["bytes_per_token"] = peer_bytes_per_token(peer, r, per_token, ggufs)
        f["bandwidth_fraction"] = f["decode_b1"] * f["bytes_per_token"] / bw if f["decode_b1"] else None
        figures[peer] = f
        print(f"| {PEERS[peer]} | {_fmt(f['decode_b1'])} | {_fmt(f[f'decode_b{BATCH}'])} | {_fmt(f['prefill'], 0)} "
              f"| {_fmt(f['bytes_per_token'] / 1e6)} | {_fmt(f['bandwidth_fraction'], 2)} |")

    me = figures.get("moekit")
    if me is not None and len(figures) > 1:
        print(f"\nmoekit Engine / peer (higher = moekit faster):\n| peer | decode b1 | decode b{BATCH} | prefill |")
        print("|---|---|---|---|")
        for peer, f in figures.items():
            if peer != "moekit":
                ratio = {k: (me[k] / f[k] if me[k] and f[k] else None) for k in ("decode_b1", f"decode_b{BATCH}", "prefill")}
                print(f"| {PEERS[peer]} | " + " | ".join(("n/a" if v is None else f"{v:.2f}x") for v in ratio.values()) + " |")

    keys = ("decode_b1", f"decode_b{BATCH}", "prefill")
    pairs = [(m, ll) for m, ll in SAME_PRECISION.items() if m in figures and ll in figures]
    if pairs:
        print(f"\nmoekit Engine / llama.cpp at equal precision (higher = moekit faster):\n"
              f"| moekit / llama.cpp | decode b1 | decode b{BATCH} | prefill |\n|---|---|---|---|")
        for m, ll in pairs:
            ratio = [figures[m][k] / figures[ll][k] if figures[m][k] and figures[ll][k] else None for k in keys]
            print(f"| {MOEKIT_PRECISIONS[m].label} / {LLAMA_PEERS[ll]} | "
                  + " | ".join(("n/a" if v is None else f"{v:.2f}x") for v in ratio) + " |")

    memory = {p: results[p]["memory"] for p in MOEKIT_PRECISIONS if "memory" in results.get(p, {})}
    print("\nmemory after load (moekit: bytes of its parameters and quantized weights, and the growth of its "
          "process's RssAnon\nwhile building/casting/quantizing the model; llama.cpp: the GGUF file) and weights "
          "read per decoded token:")
    print("| precision | moekit model (MB) | moekit RssAnon growth (MB) | GGUF file (MB) "
          "| read per b1 token, moekit / GGUF (MB) |\n|---|---|---|---|---|")
    for peer, prec in MOEKIT_PRECISIONS.items():
        mem, g = memory.get(peer), ggufs.get(prec.gguf)
        if mem is None and g is None:
            continue
        mem, g = mem or {}, g or {}
        label = prec.label + (f" / {prec.gguf}" if prec.gguf else "")
        print(f"| {label} | {_fmt(_mb(mem.get('model_bytes')))} | {_fmt(_mb(mem.get('rss_anon_growth')))} "
              f"| {_fmt(_mb(g.get('file_bytes')))} | {_fmt(_mb(figures.get(peer, {}).get('bytes_per_token')))} / "
              f"{_fmt(_mb(g.get('bytes_per_token')))} |")

    by_note: dict[str, list[str]] = {}  # the llama.cpp rows share one note
    for p, r in results.items():
        if r.get("note"):
            by_note.setdefault(r["note"], []).append(PEERS[p])
    notes = [f"{', '.join(labels)}: {note}" for note, labels in by_note.items()]
    if memory:
        notes.append("RssAnon growth before handing freed pages back (malloc_trim; the benchmark's allocator "
                     "setting keeps freed float32 originals in the heap): " + ", ".join(
                         f"{MOEKIT_PRECISIONS[p].label} {_fmt(_mb(m['rss_anon_growth_untrimmed']))} MB"
                         for p, m in memory.items()))
    if "llama.cpp" in figures and results["llama.cpp"].get("decode_b1_batched_bench"):
        notes.append(f"llama-batched-bench at batch 1 (after a {args.prompt_len}-token prompt): "
                     f"{_fmt(_median(results['llama.cpp']['decode_b1_batched_bench']))} tok/s")
    mine = results.get("moekit", {})
    if "ids_b1" in mine:
        quantized = [p for p, prec in MOEKIT_PRECISIONS.items() if prec.quant is not None]
        same = [f"{PEERS[p]}: {agreement(mine['ids_b1'], r['ids_b1'])}" for p, r in results.items()
                if p != "moekit" and p not in quantized and "ids_b1" in r]
        if same:
            notes.append(f"greedy batch-1 tokens equal to moekit Engine's, first k of {args.new_tokens} (random weights: "
                         "near-tied logits may flip late): " + "; ".join(same))
        rounded = [f"{PEERS[p]}: {agreement(mine['ids_b1'], results[p]['ids_b1'])}" for p in quantized
                   if "ids_b1" in results.get(p, {})]
        if rounded:
            notes.append(f"quantized weights (rounded: expected to part earlier), first k of {args.new_tokens} greedy "
                         "tokens equal to moekit float32's: " + "; ".join(rounded))
    cb = mine.get("continuous")
    if cb is not None:
        spec = f"{args.cb_requests} requests, prompts {args.cb_prompt[0]}-{args.cb_prompt[1]} tokens, " \
               f"{args.cb_new[0]}-{args.cb_new[1]} new tokens, arriving ~1 per step, max_batch {args.cb_batch}"
        rel = cb["tok_s"] / me["decode_b1"] if me and me["decode_b1"] else None
        print(f"\nmoekit continuous batch ({spec}): {cb['tok_s']:,.1f} generated tok/s over {cb['seconds']:.1f} s "
              f"(prefills included; {cb['prompt_tokens']} prompt tokens), mean decode batch "
              f"{cb['mean_decode_batch']:.1f} (max {cb['max_decode_batch']}) = {_fmt(rel, 2)}x its batch-1 decode")
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))

    if args.json:
        data = {"config": cfg.to_dict(), "threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
                "prompt_len": args.prompt_len, "prefill": args.prefill, "bytes_per_token": per_token,
                "bandwidth": bandwidth, "bandwidth_limit": bw, "figures": figures, "memory": memory,
                "gguf": {t: {k: v for k, v in g.items() if k != "path"} for t, g in ggufs.items()},
                "raw": {p: {k: v for k, v in r.items() if k != "ids_b1"} for p, r in results.items()}}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
