"""Memory the inference runner adds on top of the model: weight copies, and the KV cache per token.

For each model (random weights, built from a seed; the shapes of ``benchmarks/decode.py``: 8 layers,
width 512, 8 heads / 4 KV heads; a dense twin with an FFN of 2048, the MoE with 8 experts of 1024 and
one shared expert, and the dense model quantized to int8 and int4 in groups of 32):
- the model's tensor bytes: every live tensor's storage counted once (``gc``, by storage address);
- what building a ``Runner`` adds, the same way (live tensor bytes after less before), less its KV cache
  and rotary tables (which are not weights): the bytes of weight copies the runner keeps beside the
  model's own;
- the growth of this process's ``RssAnon`` (``/proc/self/status``) over building the runner and
  running one 16-token prefill (the cache is allocated empty: only the pages written count), freed
  memory handed back with ``malloc_trim`` before and after.

Then the KV-cache bytes per token of the DeepSeek-V3 preset, from its config (no model is built):
multi-head latent attention caching the latent (``kv_lora_rank + qk_rope_head_dim`` per layer)
against caching every head's decompressed keys and values.

    python benchmarks/runner_memory.py
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings

import torch

from moekit import ModelConfig, Transformer
from moekit.infer.runner import Runner
from moekit.quant import quantize_model
from moekit.utils import release_free_memory


def live_tensor_bytes() -> dict[int, int]:
    """Storage address -> bytes, for every live tensor of this process (each storage once)."""
    gc.collect()
    out = {}
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecated names
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
    for o in objects:
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            s = o.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def rss_anon() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def config(kind: str) -> ModelConfig:
    base = dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024, tie_embeddings=False)
    if kind == "moe":
        return ModelConfig(**base, ffn_dim=1024, num_experts=8, top_k=2, expert_ffn_dim=1024, num_shared_experts=1,
                           shared_expert_ffn_dim=1024)
    return ModelConfig(**base, ffn_dim=2048)


def measure(kind: str) -> dict:
    torch.manual_seed(0)
    model = Transformer(config("moe" if kind == "moe" else "dense")).eval()
    if kind in ("int8", "int4"):
        quantize_model(model, 8 if kind == "int8" else 4, 32)
    release_free_memory()  # the float originals of quantized weights go back to the system first
    before = live_tensor_bytes()
    rss0 = rss_anon()
    runner = Runner(model, slots=1, max_len=1024)
    with torch.inference_mode():
        runner(torch.randint(0, model.cfg.vocab_size, (1, 16)), [0], [0])
    after = live_tensor_bytes()
    release_free_memory()
    rss1 = rss_anon()
    not_weights = {t.untyped_storage().data_ptr() for t in runner.cache.k + runner.cache.v
                   + [runner.cos, runner.sin, runner.freqs]}
    # Totals, not new addresses: fusing may move the model's own weights into a new storage (their old
    # one is freed), which is not a copy.
    added = sum(n for p, n in after.items() if p not in not_weights) - sum(before.values())
    return {"model": sum(before.values()), "added": added,
            "rss": None if rss0 is None else rss1 - rss0}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--kind":  # one model, in a fresh process (see main)
        print(json.dumps(measure(sys.argv[2])))
        return
    print("| model | model tensors (MB) | weight copies the runner adds (MB) | share | RssAnon growth (MB) |")
    print("|---|---|---|---|---|")
    for kind in ("dense", "moe", "int8", "int4"):
        # Each model in its own process: the allocator of a process that freed a model hands its pages
        # to the next one, and RssAnon would not grow.
        out = subprocess.run([sys.executable, __file__, "--kind", kind], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        rss = "n/a" if m["rss"] is None else f"{m['rss'] / 1e6:.1f}"
        print(f"| {kind} | {m['model'] / 1e6:.1f} | {m['added'] / 1e6:.1f} | {100 * m['added'] / m['model']:.0f}% | {rss} |")
    c = ModelConfig.from_preset("deepseek-v3")
    latent = c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    expanded = c.n_layers * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    print(f"\nDeepSeek-V3 KV cache per token (bfloat16, {c.n_layers} layers): latent {latent:,} bytes "
          f"({latent / 1024:.1f} KiB), decompressed per-head K/V {expanded:,} bytes ({expanded / 2**20:.2f} MiB): "
          f"{expanded / latent:.1f}x")
    if hasattr(__import__("moekit.infer.runner", fromlist=["cache_bytes_per_token"]), "cache_bytes_per_token"):
        from moekit.infer.runner import cache_bytes_per_token

        print(f"runner.cache_bytes_per_token(deepseek-v3, bf16) = {cache_bytes_per_token(c, torch.bfloat16):,} bytes")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
