"""The regime search behind the main job (issue 18): where is FFN capacity the bottleneck?

For each configuration, three models on the same data and seed (``moekit compare --ceiling``):

- **dense**: the MoE's active parameters per token (its dense twin);
- **dense-total**: a dense model with the MoE's total parameters (the ceiling);
- **moe**: the MoE itself.

Scored by the **ceiling's token fraction** (tokens dense-total needs to reach dense's final validation
loss / dense's tokens: at most 0.5 means capacity is what limits the small model, so a sparse model
has something to win), the MoE's token fraction against dense, and the MoE's **recovery**
((dense - MoE) / (dense - dense-total) in final loss). These do not depend on timing, so the
configurations train two at a time with one thread each; the step costs (seconds per step against
the dense twin, 2 threads, nothing else running) are timed afterwards, one model at a time.

    python benchmarks/capacity_regime.py                    # every configuration (about an hour)
    python benchmarks/capacity_regime.py --only v300-a128   # one row
    python benchmarks/capacity_regime.py --only v300-a128 --seeds 3 --time
    python benchmarks/capacity_regime.py --margins runs/switch3   # each model vs dense at every evaluation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from sparsity_study import step_seconds  # the same timed step as that study's (this folder is on sys.path)

from moekit.config import PRESETS, ModelConfig
from moekit.train.compare import CEILING, dense_ceiling, dense_twin
from moekit.utils import tune_cpu_allocator

# Common to every row: the main job's body and schedule (micro-moe: width 64, 2 layers, sigmoid_bias
# router with scaling 2, lr 3e-3 constant, 16 x 128 tokens per step).
COMMON = ["--preset", "micro-moe", "--lr", "3e-3", "--schedule", "constant", "--eval-batches", "20"]
# name -> (flags, steps, eval every). "v300": a 300-token BPE vocabulary trained on the plays (near
# byte level: the output layer costs 64 x 300 instead of 64 x 4,096 per token); "a128": 128 active FFN
# units per token (16 experts of 64, top-2), "a256": 256 (16 experts of 128, top-2, micro-moe's own).
STUDY: dict[str, tuple[list[str], int, int]] = {
    "v4096-a256": ([], 1500, 75),  # the previous main job
    "v300-a256": (["--vocab-size", "300"], 3000, 150),
    "v300-a128": (["--vocab-size", "300", "--expert-ffn-dim", "64"], 3000, 150),
    "v300-a128-e32": (["--vocab-size", "300", "--expert-ffn-dim", "64", "--num-experts", "32"], 3000, 150),
    "v300-a128-6k": (["--vocab-size", "300", "--expert-ffn-dim", "64"], 6000, 300),
    "v300-a64": (["--vocab-size", "300", "--expert-ffn-dim", "32"], 3000, 150),
    "v300-a128-L4": (["--vocab-size", "300", "--expert-ffn-dim", "64", "--n-layers", "4"], 3000, 150),
}


def run_compare(name: str, out: Path, seeds: int) -> subprocess.Popen:
    flags, steps, every = STUDY[name]
    cmd = [sys.executable, "-m", "moekit", "compare", *COMMON, *flags, "--ceiling", "--max-steps", str(steps),
           "--eval-every", str(every), "--seeds", str(seeds), "--threads", "1", "--quiet", "--out", str(out / name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def model_configs(name: str) -> dict[str, ModelConfig]:
    """dense, dense-total and moe of a row, as compare builds them."""
    flags = STUDY[name][0]
    kw = dict(PRESETS["micro-moe"])
    pairs = dict(zip(flags[::2], flags[1::2]))
    mapping = {"--vocab-size": "vocab_size", "--expert-ffn-dim": "expert_ffn_dim", "--num-experts": "num_experts",
               "--n-layers": "n_layers"}
    for flag, value in pairs.items():
        kw[mapping[flag]] = int(value)
    moe = ModelConfig(**kw)
    return {"dense": dense_twin(moe), CEILING: dense_ceiling(moe), "moe": moe}


def fmt(v, pattern="{:.2f}"):
    return "not reached" if v is None else pattern.format(v)


def row(name: str, out: Path, cost: dict[str, float] | None) -> str:
    summary = json.loads((out / name / "summary.json").read_text())
    models = {m["name"]: m for m in summary["models"]}
    moe = next(m for n, m in models.items() if n.startswith("moe-"))
    top = models[CEILING]

    def mean(s):
        return None if s is None else s["mean"]

    flags, steps, _ = STUDY[name]
    cost_text = "-" if cost is None else f"{cost['moe'] / cost['dense']:.2f}x / {cost[CEILING] / cost['dense']:.2f}x"
    return (f"| {name} | {' '.join(flags) or '(micro-moe)'} | {steps} | {human(moe['params_total'])} / "
            f"{human(moe['params_active'])} | {summary['dense_final_val_loss']['mean']:.4f} | "
            f"{top['final_val_loss']['mean']:.4f} | {moe['final_val_loss']['mean']:.4f} | "
            f"{fmt(mean(top['token_fraction']))} | {fmt(mean(moe['token_fraction']))} | {fmt(mean(moe['recovery']))} | "
            f"{fmt(mean(moe['token_fraction_vs_ceiling']))} | {cost_text} |")


def human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def margins(compare_dir: Path) -> str:
    """Per model and seed of a compare directory: its validation loss minus its seed's dense model's at
    every evaluation after the first 10% of the run, and the worst (largest) of them; <= 0 everywhere
    means at or below dense throughout (issue 18's Switch target)."""
    summary = json.loads((compare_dir / "summary.json").read_text())
    rows = ["| model | seed | worst margin after 10% (nats) | at step | evaluations above dense | final margin |",
            "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        if r["name"] == "dense":
            continue
        dense = {e["step"]: e["val_loss"] for e in _evals(compare_dir / f"dense-s{r['seed']}")}
        ev = [e for e in _evals(Path(r["run"])) if e["step"] in dense]
        last = max(e["step"] for e in ev)
        after = [(e["val_loss"] - dense[e["step"]], e["step"]) for e in ev if e["step"] > 0.1 * last]
        worst = max(after)
        rows.append(f"| {r['name']} | {r['seed']} | {worst[0]:+.4f} | {worst[1]} | "
                    f"{sum(m > 0 for m, _ in after)} of {len(after)} | {after[-1][0]:+.4f} |")
    return "\n".join(rows)


def _evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="runs/capacity-regime", help="where the runs go (default runs/capacity-regime)")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(STUDY), help="only these configurations")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    p.add_argument("--parallel", type=int, default=2, help="configurations at once, one thread each (default 2)")
    p.add_argument("--time", action="store_true", help="also time each model's step (2 threads, afterwards)")
    p.add_argument("--margins", metavar="COMPARE_DIR", default=None,
                   help="only print each model's margin over dense at every evaluation of a finished compare")
    args = p.parse_args()
    if args.margins:
        print(margins(Path(args.margins)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(STUDY)
    todo = [n for n in names if not (out / n / "summary.json").exists()]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            print(f"training {name} (dense, {CEILING}, moe) ...", flush=True)
            running.append((name, run_compare(name, out, args.seeds)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode:
                    sys.exit(f"{name} failed; see {out / (name + '.log')}")
    costs: dict[str, dict[str, float] | None] = {n: None for n in names}
    if args.time:
        tune_cpu_allocator()
        torch.set_num_threads(2)
        for n in names:
            costs[n] = {k: step_seconds(c, steps=30) for k, c in model_configs(n).items()}
    rows = ["| config | flags | steps | MoE params total / active | dense | dense-total | MoE | "
            "dense-total token fraction | MoE token fraction | recovery | MoE token fraction vs dense-total | "
            "step cost MoE / dense-total |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows += [row(n, out, costs[n]) for n in names]
    table = "\n".join(rows)
    (out / "study.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
