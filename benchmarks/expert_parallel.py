"""Expert parallelism on this machine: one process against two (plain data parallel, and EP=2).

For a model whose experts hold ~94% of its parameters (width 256, 2 layers, 32 experts of width 512,
top-2), each configuration trains the same global batches with the trainer's own pieces
(moekit.parallel: expert shards, DDP, expert-gradient reduction, global router losses, clipping;
fused AdamW) and reports, per rank:

- tokens/s of the whole job (global batch tokens / step time);
- all-to-all bytes sent to other ranks per step, measured from the collectives' split sizes, against
  docs/distributed.md's formula ``4 * N_rank * k * (EP-1)/EP * D * 4 bytes`` per MoE layer (uniform
  routing) -- and the DDP all-reduce payload per step (a comm hook counts it);
- memory: parameters + gradients + optimizer state held by the rank (exact, from the tensors), and
  the process's peak resident memory (``ru_maxrss``, which includes the ~0.3 GB of torch itself).

    python benchmarks/expert_parallel.py             # both layouts against one process, twice
    python benchmarks/expert_parallel.py --runs 1 --steps 10

Run it alone: it uses both cores, and a concurrent job distorts the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CFG = dict(vocab_size=4096, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=1024, max_seq_len=256,
           num_experts=32, top_k=2, expert_ffn_dim=512)
BATCH, SEQ = 16, 128


def worker(args: argparse.Namespace) -> None:
    from moekit import ModelConfig, Transformer
    from moekit.parallel import (
        Parallel,
        clip_grad_norm_,
        is_expert_param,
        parallelize,
        reduce_expert_grads,
        wrap_data_parallel,
    )
    from moekit.train.optim import build_optimizer

    par = Parallel.from_env(args.ep)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset("tiny-moe", **CFG)
    torch.manual_seed(0)
    model = Transformer(cfg)
    parallelize(model, par)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    train_model = wrap_data_parallel(model, par)
    allreduce = {"bytes": 0}
    if par.distributed:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            allreduce["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        train_model.register_comm_hook(None, counting_hook)  # None: DDP's own (default) group, as in training

    def batch(i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
        return par.local_rows(x[:, :-1], x[:, 1:])

    state_bytes = 0

    def step(i: int) -> None:
        nonlocal state_bytes
        x, y = batch(i)
        out = train_model(x, labels=y)
        (out.loss + out.aux_loss).backward()
        reduce_expert_grads(model, par)
        clip_grad_norm_(model, 1.0, par)
        optimizer.step()
        tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    par.barrier()
    par.traffic.reset()
    allreduce["bytes"] = 0
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    par.barrier()
    dt = time.perf_counter() - t0
    expert_params = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
    result = {
        "rank": par.rank, "world": par.world, "ep": par.ep, "threads": args.threads,
        "tok_s": BATCH * SEQ * args.steps / dt,
        "a2a_bytes_per_step": par.traffic.payload_bytes / args.steps,
        "count_bytes_per_step": par.traffic.count_bytes / args.steps,
        "allreduce_bytes_per_step": allreduce["bytes"] / args.steps,
        "state_bytes": state_bytes, "expert_params": expert_params,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(f"{args.out}.{par.rank}").write_text(json.dumps(result))
    par.close()


def formula_a2a_bytes(world: int, ep: int) -> float:
    """docs/distributed.md: per rank and step, 4 passes (dispatch, combine, and their gradients) of the
    rows that leave the rank: N_rank * k * (EP-1)/EP rows of D float32 values, per MoE layer."""
    n_rank = BATCH * SEQ / world
    return CFG["n_layers"] * 4 * n_rank * CFG["top_k"] * (ep - 1) / ep * CFG["dim"] * 4


def launch(nproc: int, ep: int, threads: int, steps: int, warmup: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        worker_args = [__file__, "--worker", "--ep", str(ep), "--threads", str(threads), "--steps", str(steps),
                       "--warmup", str(warmup), "--out", out]
        if nproc == 1:
            cmd = [sys.executable, *worker_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"worker failed:\n{done.stderr[-3000:]}")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--runs", type=int, default=2, help="repeat the whole comparison (default 2)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    layouts = [("1 process, 2 threads", 1, 1, 2), ("2 processes, data parallel (EP=1)", 2, 1, 1),
               ("2 processes, expert parallel (EP=2)", 2, 2, 1)]
    for run in range(args.runs):
        print(f"\nrun {run + 1}: global batch {BATCH}x{SEQ} tokens, {args.steps} timed steps")
        base = None
        rows = []
        for name, nproc, ep, threads in layouts:
            ranks = launch(nproc, ep, threads, args.steps, args.warmup)
            r0 = ranks[0]
            base = base or r0
            rows.append((name, ranks))
            share = r0["expert_params"] / r0["params"]
            print(f"  {name:<38} {r0['tok_s']:>8,.0f} tok/s ({r0['tok_s'] / base['tok_s']:.2f}x)   "
                  f"state/rank {max(r['state_bytes'] for r in ranks) / 2**20:6.1f} MiB "
                  f"({max(r['state_bytes'] for r in ranks) / base['state_bytes']:.2f}x)   "
                  f"peak RSS/rank {max(r['peak_rss_bytes'] for r in ranks) / 2**20:6.0f} MiB   "
                  f"expert share of the rank's params {share:.0%}")
            if nproc > 1 and ep > 1:
                a2a = [r["a2a_bytes_per_step"] for r in ranks]
                want = formula_a2a_bytes(nproc, ep)
                print(f"  {'':<38} all-to-all/rank/step: measured {', '.join(f'{b / 2**20:.2f}' for b in a2a)} MiB, "
                      f"formula {want / 2**20:.2f} MiB ({sum(a2a) / len(a2a) / want if want else float('nan'):.3f}x); "
                      f"counts {r0['count_bytes_per_step']:.0f} B; DDP all-reduce payload "
                      f"{r0['allreduce_bytes_per_step'] / 2**20:.2f} MiB")
            elif nproc > 1:
                print(f"  {'':<38} no all-to-all; DDP all-reduce payload {r0['allreduce_bytes_per_step'] / 2**20:.2f} MiB/step")
        one = rows[0][1][0]
        ep2 = rows[2][1][0]
        expert_share_bytes = one["state_bytes"] * one["expert_params"] / one["params"]
        print(f"  state per rank EP=2 vs 1 process: {one['state_bytes'] / 2**20:.1f} -> {ep2['state_bytes'] / 2**20:.1f} MiB; "
              f"half the expert share would be {(one['state_bytes'] - expert_share_bytes / 2) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
