"""Quality of weight-only quantization: bits per byte on the held-out plays, float vs int8 vs int4.

Usage: .venv/bin/python benchmarks/quant_quality.py CHECKPOINT [--batches 40] [--group-size 32]
CHECKPOINT: a trained moekit checkpoint or run directory on the embedded corpus (e.g. a run of
`moekit train --preset small-moe --max-steps 400 --out runs/small-moe`).

The same validation windows as training's evaluation (``moekit.train.loop.evaluate``: sequential
windows of the held-out plays), the same bits-per-byte conversion; the quantized models are the float
model passed through ``moekit.quant.quantize_model`` (what ``moekit quantize`` saves). Targets
(issue 8): int8 within 0.5% of float, int4 within 3%.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.data.dataset import prepare_data
from moekit.quant import quantize_model, quantized_weights
from moekit.train.config import TrainConfig
from moekit.train.loop import _eval_bytes_per_token, evaluate
from moekit.utils import tune_cpu_allocator


def held_bytes(model) -> int:
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(w.nbytes() for w in quantized_weights(model).values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="trained moekit checkpoint or run directory (embedded corpus)")
    parser.add_argument("--batches", type=int, default=40, help="validation batches of 16 x seq-len tokens (default 40)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per validation window (default 256)")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    args = parser.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    model, tokenizer = moekit.load(args.checkpoint)
    cfg = TrainConfig(batch_size=16, seq_len=args.seq_len, eval_batches=args.batches)
    _, val_ds = prepare_data(None, tokenizer, Path(tempfile.gettempdir()) / "moekit-quant-quality-cache")
    bytes_per_token = _eval_bytes_per_token(val_ds, tokenizer, cfg)
    tokens = args.batches * cfg.batch_size * cfg.seq_len
    print(f"{args.checkpoint}: {model.cfg.param_counts()[0]:,} parameters; {tokens:,} held-out tokens "
          f"({bytes_per_token:.3f} bytes/token)\n")
    rows = []
    variants = [("float32", None), ("int8 (per channel)", (8, None)), (f"int4 (group {args.group_size})", (4, args.group_size))]
    for name, q in variants:
        m = model if q is None else quantize_model(copy.deepcopy(model), *q)
        t = time.perf_counter()
        with torch.inference_mode():
            loss = evaluate(m, val_ds, cfg)
        rows.append((name, loss, loss / math.log(2) / bytes_per_token, held_bytes(m), time.perf_counter() - t))
    base = rows[0][2]
    print("| weights | val loss (nats/token) | bits per byte | vs float | weight memory | eval time |")
    print("|---|---|---|---|---|---|")
    for name, loss, bpb, nbytes, secs in rows:
        print(f"| {name} | {loss:.4f} | {bpb:.4f} | {100 * (bpb / base - 1):+.2f}% | {nbytes / 2**20:.1f} MiB | {secs:.1f} s |")


if __name__ == "__main__":
    main()
