"""Loading a Mixtral-shaped Hugging Face checkpoint: ``moekit.convert.hf.load_hf`` against
``transformers.AutoModelForCausalLM.from_pretrained``, on time and peak memory.

The checkpoint is generated on the fly: random weights with Mixtral's hub names and layout
(per-expert ``block_sparse_moe.experts.{j}.w1/w2/w3``, sharded safetensors with an index), sized by
``--size-gb``, written straight to safetensors shard by shard (no model is ever built to write it).
Each load runs in a fresh process that imports its library first, records its baseline RSS, loads,
and reports wall time and peak RSS (the kernel's high-water mark, reset after the imports), then
reads every weight once and reports the RSS again; rounds alternate the order so that page-cache
and machine-load drift hit both loaders alike.

    python benchmarks/load_checkpoint.py                          # ~2.5 GB bfloat16, 2 rounds
    python benchmarks/load_checkpoint.py --size-gb 4 --dtype float32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.utils import proc_status_bytes

SHARD_BYTES = 1 << 30  # at most 1 GiB per shard, like the hub's large checkpoints
LOADERS = ("moekit load_hf", "transformers from_pretrained")


# --------------------------------------------------------------------------- the checkpoint
def mixtral_shape(size_gb: float, dtype: torch.dtype) -> dict[str, int]:
    """Mixtral-8x7B proportions scaled down in width (8 experts top-2, FFN = 3.5 x width, GQA 4:1,
    head dim 128, vocabulary 32000); the number of layers is chosen to reach ``size_gb``."""
    dim, vocab, experts = 1024, 32000, 8
    ffn, heads, kv_heads, head_dim = 3584, 8, 2, 128
    shape = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, head_dim=head_dim, num_local_experts=experts,
                 num_experts_per_tok=2, num_hidden_layers=1)
    per_layer = sum(_numel(s) for _, s in layer_tensors(shape, 0))
    fixed = 2 * vocab * dim + dim  # embeddings, untied head, final norm
    target = size_gb * 1e9 / torch.empty((), dtype=dtype).element_size()
    shape["num_hidden_layers"] = max(1, round((target - fixed) / per_layer))
    return shape


def layer_tensors(c: dict[str, int], i: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of layer ``i`` as Mixtral checkpoints on the hub store them."""
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
           (p + "self_attn.q_proj.weight", (c["num_attention_heads"] * hd, d)),
           (p + "self_attn.k_proj.weight", (c["num_key_value_heads"] * hd, d)),
           (p + "self_attn.v_proj.weight", (c["num_key_value_heads"] * hd, d)),
           (p + "self_attn.o_proj.weight", (d, c["num_attention_heads"] * hd)),
           (p + "block_sparse_moe.gate.weight", (c["num_local_experts"], d))]
    for j in range(c["num_local_experts"]):  # w1 = gate, w3 = up, w2 = down
        e = f"{p}block_sparse_moe.experts.{j}."
        out += [(e + "w1.weight", (f, d)), (e + "w3.weight", (f, d)), (e + "w2.weight", (d, f))]
    return out


def all_tensors(c: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    d, v = c["hidden_size"], c["vocab_size"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        out += layer_tensors(c, i)
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_checkpoint(directory: Path, c: dict[str, int], dtype: torch.dtype, seed: int = 0) -> int:
    """Write config.json, sharded random safetensors with an index, and a tokenizer; returns weight bytes.

    Shards are filled and written one at a time, so memory stays near one shard.
    """
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    from moekit.data.tokenizer import EMBEDDED_TOKENIZER_PATH

    directory.mkdir(parents=True, exist_ok=True)
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in all_tensors(c):
        n = _numel(shape) * size
        if shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=dtype)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * size
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = MixtralConfig(**c, tie_word_embeddings=False, architectures=["MixtralForCausalLM"],
                           max_position_embeddings=4096)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    shutil.copy(EMBEDDED_TOKENIZER_PATH, directory / "tokenizer.json")  # load_hf wants a tokenizer; any will do
    return total


# --------------------------------------------------------------------------- one load, in a child process
def child(loader: str, directory: str, dtype_name: str) -> None:
    """Import the loader, note the RSS, load, print time and memory as one JSON line."""
    dtype = getattr(torch, dtype_name)
    if loader == LOADERS[0]:
        from moekit.convert.hf import load_hf

        def load():
            return load_hf(directory, dtype=dtype)[0]
    else:
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401 - import cost outside the timing
        from transformers import AutoModelForCausalLM

        def load():
            return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    _reset_peak_rss()
    base, base_anon = _current_rss(), proc_status_bytes("RssAnon")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    rss_after = _current_rss()
    # NOTE: a loader may hand back tensors that still map the file lazily; reading every weight once
    # (as the first forward passes would) shows the memory a usable model really holds.
    params = list(model.parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in params:
            p.sum()
    touch_seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "touch_seconds": touch_seconds, "base_bytes": base,
                      "peak_bytes": peak, "rss_after_bytes": rss_after, "peak_touched_bytes": _peak_rss(),
                      "rss_touched_bytes": _current_rss(), "anon_touched_bytes": proc_status_bytes("RssAnon"),
                      "base_anon_bytes": base_anon, "parameters": sum(p.numel() for p in params),
                      "dtypes": sorted({str(p.dtype) for p in params})}))




def _peak_rss() -> int:
    """Peak resident set size of this process: ``VmHWM`` on Linux, else ``ru_maxrss``.

    NOTE: on Linux ``ru_maxrss`` also counts the parent's RSS at fork (exec records the pre-exec
    memory's high-water mark in the process's rusage), which inflated the children's figures here;
    ``VmHWM`` belongs to the new image alone and can be reset (below).
    """
    return proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> None:
    """Reset the RSS high-water mark (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``), so that the
    peak measures the load and not an import spike. Best effort elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _current_rss() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_child(loader: str, directory: Path, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--dir", str(directory), "--dtype", dtype_name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def report(results: dict[str, list[dict]], weight_bytes: int) -> str:
    gib = 1 << 30
    keys = ("seconds", "touch_seconds", "base_bytes", "peak_bytes", "rss_touched_bytes", "anon_touched_bytes",
            "base_anon_bytes")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    ref = med[LOADERS[1]]
    lines = ["| loader | load (s) | then read every weight (s) | peak RSS (GiB) | peak over baseline (GiB) "
             "| RSS after reading every weight (GiB) | of which private (anon) over baseline / weights "
             "| load time vs transformers | peak over baseline vs transformers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        grew, ref_grew = m["peak_bytes"] - m["base_bytes"], ref["peak_bytes"] - ref["base_bytes"]
        private = m["anon_touched_bytes"] - m["base_anon_bytes"]
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['touch_seconds']:.2f} | {m['peak_bytes'] / gib:.2f} | "
                     f"{grew / gib:.2f} | {m['rss_touched_bytes'] / gib:.2f} | {private / weight_bytes:.2f}x | "
                     f"{m['seconds'] / ref['seconds']:.2f}x | {grew / ref_grew:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.5, help="approximate size of the weights in GB (default 2.5)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the stored weights, and the dtype both loaders are asked for (default bfloat16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each loads once with each loader, order "
                                                               "alternating (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint (its path is printed)")
    parser.add_argument("--dir", default=None, help="write the checkpoint here (or reuse the one already there) "
                                                    "instead of a temporary directory; never deleted")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: child process mode
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.dtype)
        return

    import transformers

    dtype = getattr(torch, args.dtype)
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moekit-load-bench-"))
    try:
        if (directory / "config.json").exists():
            shape = json.loads((directory / "config.json").read_text())
            weight_bytes = json.loads((directory / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            print(f"reusing {directory}")
        else:
            shape = mixtral_shape(args.size_gb, dtype)
            t0 = time.perf_counter()
            weight_bytes = write_checkpoint(directory, shape, dtype)
            print(f"wrote {directory} in {time.perf_counter() - t0:.1f} s")
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs; "
              f"Mixtral-shaped checkpoint: {shape['num_hidden_layers']} layers, width {shape['hidden_size']}, "
              f"{shape['num_local_experts']} experts of {shape['intermediate_size']}, vocab {shape['vocab_size']}; "
              f"weights {weight_bytes / 1e9:.2f} GB ({weight_bytes / (1 << 30):.2f} GiB) {args.dtype}")
        results: dict[str, list[dict]] = {name: [] for name in LOADERS}
        for r in range(args.rounds):
            for name in LOADERS if r % 2 == 0 else LOADERS[::-1]:
                res = run_child(name, directory, args.dtype)
                results[name].append(res)
                print(f"round {r + 1}: {name}: {res['seconds']:.2f} s, peak RSS {res['peak_bytes'] / 1e9:.2f} GB, "
                      f"{res['parameters']:,} parameters {res['dtypes']}", flush=True)
        counts = {res["parameters"] for runs in results.values() for res in runs}
        if len(counts) != 1:
            print(f"WARNING: the loaders disagree on the parameter count: {sorted(counts)}")
        print(f"\nmedians over {args.rounds} rounds (fresh process per load; baseline = RSS after imports)\n")
        print(report(results, weight_bytes))
    finally:
        if args.keep or args.dir:
            print(f"checkpoint kept at {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
