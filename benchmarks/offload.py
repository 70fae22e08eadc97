"""Expert offloading: decode speed with 100%, 50% and 25% of the experts resident, against the
fully resident model, on the Mixtral-shaped model of ``decode.py`` (8 layers, width 512, 8 experts
of width 1024, top-2, float32: 6.3 MB per expert, 403 MB of experts).

For each setting: greedy decode at batch 1 after a 16-token prompt (tokens after the first / time
after the first, median of ``--repeats``), the expert cache's hit rate and MB read per decoded
token over the same tokens, and the resident expert memory. The weights are random, so routing is
close to uniform: a trained model, whose tokens reuse experts, hits more often.

NOTE: the checkpoint was just written, so its pages are in the OS page cache: "read" here is a copy
from memory, not from disk. For a cold-disk figure, drop the page cache first (root:
``echo 1 > /proc/sys/vm/drop_caches``) and run one setting.

    python benchmarks/offload.py                 # ~1 minute on 2 cores
    python benchmarks/offload.py --quick --json offload.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import build_model, model_config  # noqa: E402

import moekit  # noqa: E402
from moekit.infer import Engine, SamplingParams  # noqa: E402
from moekit.infer.offload import load_offloaded  # noqa: E402
from moekit.utils import tune_cpu_allocator  # noqa: E402


def decode(engine: Engine, prompt: list[int], n_new: int) -> dict:
    """Greedy decode of ``n_new`` tokens; speed and expert-cache figures after the first token."""
    engine.add_request(prompt, SamplingParams(max_new_tokens=n_new, temperature=0, stop_ids=()))
    t0 = before = None
    tokens = 0
    while engine.has_work():
        for ev in engine.step():
            tokens += ev.token_id is not None
        if t0 is None and tokens:
            t0 = time.perf_counter()
            s = engine.stats.offload
            before = (s.hits, s.fetches, s.bytes_read) if s else None
    out = {"tok_s": (tokens - 1) / (time.perf_counter() - t0)}
    s = engine.stats.offload
    if s is not None:
        hits, fetches, read = s.hits - before[0], s.fetches - before[1], s.bytes_read - before[2]
        out.update(hit_rate=hits / max(fetches, 1), mb_per_token=read / 1e6 / (tokens - 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer tokens and repeats")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per run (default 64; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default 0)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    n_new = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    cfg = model_config(max_seq_len=256)
    torch.manual_seed(args.seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = moekit.save(build_model(cfg, args.seed), None, Path(tmp) / "model")
        settings = [("resident (moekit.load)", None)] + [(f"{f}% of experts resident", cfg.num_experts * f // 100)
                                                         for f in (100, 50, 25)]
        for label, n in settings:
            if n is None:
                model, _ = moekit.load(path)
            else:
                model, _, _ = load_offloaded(path, max_resident_experts=n)
            engine = Engine(model, max_batch=1, max_len=cfg.max_seq_len)
            decode(engine, prompt, 4)  # warm-up: buffers, kernels, the first experts
            runs = [decode(engine, prompt, n_new) for _ in range(repeats)]
            row = {"setting": label, "resident_per_layer": n,
                   "tok_s": statistics.median(r["tok_s"] for r in runs)}
            if n is not None:
                row.update(hit_rate=statistics.median(r["hit_rate"] for r in runs),
                           mb_read_per_token=statistics.median(r["mb_per_token"] for r in runs),
                           resident_expert_mb=engine.stats.offload.resident_bytes / 1e6)
            rows.append(row)
            print(f"{label:28s} {row['tok_s']:7.1f} tok/s"
                  + (f"  hit rate {100 * row['hit_rate']:5.1f}%  {row['mb_read_per_token']:6.1f} MB read/token  "
                     f"{row['resident_expert_mb']:6.0f} MB resident experts" if n is not None else ""), flush=True)
            del engine, model
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(),
                                               "new_tokens": n_new, "repeats": repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
