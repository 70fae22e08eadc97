"""The study behind the main job's configuration: which MoE, at equal active parameters per token,
reaches its dense twin's final validation loss soonest on the embedded corpus?

Each configuration is trained once (seed 0, same data order as its dense twin) and scored by

- **token fraction**: tokens the MoE needed to reach the dense model's final validation loss, divided
  by the dense model's tokens (what routing buys per token; interpolated between evaluations);
- **step cost**: seconds per training step against the dense twin, measured separately on a quiet
  machine (2 threads, median of timed steps, after warm-up);
- **estimated time fraction** = token fraction x step cost.

The training runs are independent of time, so two of them run at once with one thread each (the
2-core machine does twice the work); the step costs are timed afterwards, one at a time, with nothing
else running. ``make run`` then measures the chosen configuration's real time fraction over 3 seeds.

    python benchmarks/sparsity_study.py                       # the full table (about 30 minutes)
    python benchmarks/sparsity_study.py --only e64k2-sb --steps 300   # one row, shorter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.model import Transformer
from moekit.train.compare import time_to_reach
from moekit.train.optim import build_optimizer
from moekit.utils import tune_cpu_allocator

# The main job's body (width 64, 2 layers): at this size the dense FFN is the bottleneck, so FFN
# capacity is what routing can add (a dense FFN 8x wider reaches the final loss in ~1/3 of the tokens).
BODY = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256, max_seq_len=256)
WIDE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256)  # the old tiny-moe body


def moe(body, E, k, F, router: str = "topk", **kw):
    return {**body, "num_experts": E, "top_k": k, "expert_ffn_dim": F, "router": router, **kw}


# name -> (model settings, train settings); rows without experts are the dense twins (each MoE row is
# measured against the best of its body's dense rows). "x2": gate weights times routed_scaling_factor 2.
SB = dict(router="sigmoid_bias", routed_scaling_factor=2.0)
STUDY = {
    # width 128, 4 layers, 500 steps (1M tokens): the old main job's scale
    "w128-dense": (WIDE, dict(lr=3e-3)),
    "w128-dense-cosine": (WIDE, dict(lr=3e-3, schedule="cosine")),
    "w128-dense-lr1e-2": (WIDE, dict(lr=1e-2)),
    "w128-e8k2": (moe(WIDE, 8, 2, 256), dict(lr=3e-3)),
    "w128-e32k2": (moe(WIDE, 32, 2, 256), dict(lr=3e-3)),
    "w128-e64k4": (moe(WIDE, 64, 4, 128), dict(lr=3e-3)),
    "w128-e32k1-renorm": (moe(WIDE, 32, 1, 512), dict(lr=3e-3)),  # top-1 renormalised: weight 1, no router gradient
    # width 64, 2 layers, 1500 steps (3M tokens)
    "dense": (BODY, dict(lr=3e-3)),
    "dense-lr1.5e-3": (BODY, dict(lr=1.5e-3)),
    "dense-lr1e-2": (BODY, dict(lr=1e-2)),
    "dense-ffn2048-lr1e-2": ({**BODY, "ffn_dim": 2048}, dict(lr=1e-2)),  # not a twin: FFN capacity, 8x the compute
    "e16k2-lr1e-2": (moe(BODY, 16, 2, 128), dict(lr=1e-2)),
    "e64k2-lr1e-2": (moe(BODY, 64, 2, 128), dict(lr=1e-2)),
    "e16k2-sb-lr1e-2": (moe(BODY, 16, 2, 128, "sigmoid_bias"), dict(lr=1e-2)),
    "e16k2-sb-x2-lr1e-2": (moe(BODY, 16, 2, 128, **SB), dict(lr=1e-2)),
    "e16k2-sb-x2": (moe(BODY, 16, 2, 128, **SB), dict(lr=3e-3)),
    "e16k2-sb-x2-lr5e-3": (moe(BODY, 16, 2, 128, **SB), dict(lr=5e-3)),
    "e32k2-sb-x2": (moe(BODY, 32, 2, 128, **SB), dict(lr=3e-3)),
    "e64k2-sb-x2": (moe(BODY, 64, 2, 128, **SB), dict(lr=3e-3)),
    "e64k2-x2": (moe(BODY, 64, 2, 128, routed_scaling_factor=2.0), dict(lr=3e-3)),
    "e16k1-shared": (moe(BODY, 16, 1, 128, "sigmoid_bias", num_shared_experts=1), dict(lr=3e-3)),
}
TRAIN = dict(batch_size=16, seq_len=128, warmup_steps=20, schedule="constant", eval_batches=10)


def steps_for(name: str, args) -> tuple[int, int]:
    if name.startswith("w128"):
        return args.wide_steps, 25
    return args.steps, 75


def dense_rows(name: str) -> list[str]:
    """The dense rows of ``name``'s body (its twin is the best of them: each model at its own best lr)."""
    wide = name.startswith("w128")
    return [n for n, (m, _) in STUDY.items() if not m.get("num_experts") and n.startswith("w128") == wide
            and m["ffn_dim"] == (WIDE if wide else BODY)["ffn_dim"]]


def train_one(name: str, out: Path, args) -> subprocess.Popen:
    model, train = STUDY[name]
    steps, every = steps_for(name, args)
    settings = {**model, **TRAIN, **train, "max_steps": steps, "eval_every": every, "save_every": steps,
                "log_every": every, "threads": 1}
    cfg_file = out / f"{name}.json"
    cfg_file.write_text(json.dumps(settings))
    run = out / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "moekit", "train", "--config", str(cfg_file), "--out", str(run),
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=open(out / f"{name}.log", "w"))


def step_seconds(model: dict | ModelConfig, steps: int = 20, batch: int = 16, seq: int = 128) -> float:
    """Median seconds of a training step (forward, backward, clip, AdamW) after 10 warm-up steps."""
    torch.manual_seed(0)
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(vocab_size=4096, **model)
    m = Transformer(cfg)
    opt = build_optimizer(m, 1e-3, 0.1, (0.9, 0.95))
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))
    times = []
    for i in range(steps + 10):
        t = time.perf_counter()
        out = m(x, labels=y)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 10:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="runs/sparsity-study", help="where the runs go (default runs/sparsity-study)")
    p.add_argument("--steps", type=int, default=1500, help="steps for the width-64 rows (default 1500)")
    p.add_argument("--wide-steps", type=int, default=500, help="steps for the width-128 rows (default 500)")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(STUDY), help="train only these rows (and twins)")
    p.add_argument("--parallel", type=int, default=2, help="training runs at once, one thread each (default 2)")
    p.add_argument("--time-only", action="store_true", help="only time the steps of every row (no training)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(STUDY) if not args.only else list(dict.fromkeys(
        [d for n in args.only for d in dense_rows(n)] + args.only))

    if args.time_only:
        tune_cpu_allocator()
        torch.set_num_threads(2)
        for n in names:
            print(f"{n:22s} {step_seconds(STUDY[n][0]) * 1e3:7.1f} ms/step", flush=True)
        return
    todo = [n for n in names if not (out / n / "metrics.jsonl").exists() or not evals(out / n)
            or evals(out / n)[-1]["step"] < steps_for(n, args)[0]]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            if (out / name).exists():
                import shutil

                shutil.rmtree(out / name)
            print(f"training {name} ...", flush=True)
            running.append((name, train_one(name, out, args)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode:
                    sys.exit(f"{name} failed; see {out / (name + '.log')}")

    tune_cpu_allocator()
    torch.set_num_threads(2)
    print("timing steps (2 threads, nothing else running) ...", flush=True)
    cost = {n: step_seconds(STUDY[n][0]) for n in names}

    rows = ["| config | experts x width, top-k | router | lr | params total / active | final val loss | "
            "token fraction | step cost | est. time fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        model, train = STUDY[n]
        ev = evals(out / n)
        twin = min(dense_rows(n), key=lambda d: evals(out / d)[-1]["val_loss"])
        target = evals(out / twin)[-1]["val_loss"]
        total, active = ModelConfig(vocab_size=4096, **model).param_counts()
        tok = time_to_reach(ev, target, "tokens")
        frac = None if tok is None else tok / evals(out / twin)[-1]["tokens"]
        ratio = cost[n] / cost[twin]
        shape = (f"{model['num_experts']} x {model['expert_ffn_dim']}, top-{model['top_k']}"
                 if model.get("num_experts") else f"dense FFN {model['ffn_dim']}")
        router = model.get("router", "-") + (f" x{model['routed_scaling_factor']:g}"
                                            if model.get("routed_scaling_factor") else "")
        rows.append(f"| {n} | {shape} | {router} | {train['lr']:g} | {total / 1e6:.2f}M / {active / 1e6:.2f}M | "
                    f"{ev[-1]['val_loss']:.4f} | {'not reached' if frac is None else f'{frac:.2f}'} | "
                    f"{ratio:.2f}x | {'-' if frac is None else f'{frac * ratio:.2f}'} |")
    table = "\n".join(rows)
    (out / "study.md").write_text(table + "\n")
    print(table)
    print("\nEach row is measured against the best dense row of its body (its own best learning rate).")


if __name__ == "__main__":
    main()
