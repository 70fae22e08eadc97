"""The Pathways demonstration (issue 20, docs/pathways.md): one sparse model, three tasks, a small path
through it for each task, measured against the full model and against a dense model of the path's size
trained on that task alone.

Tasks, on text every machine has: the embedded Shakespeare plays (their training split), Jane Austen's
*Persuasion* (shipped for evaluation) and Python source code (the running interpreter's own standard
library, a deterministic selection). Each task's text is cut into a training part and a held-out tail
(the last 5%), written under ``OUT/data``.

1. ``moekit train`` with ``task_routing="task"``: 16 experts of 64 per layer (top-2), each task owning
   four of them (the other four stay unassigned, room for a fourth task), so a task's path is 1/4 of the
   model's expert parameters;
2. ``moekit paths`` (the routing of each task, heatmaps) and ``moekit extract --task NAME`` (each path);
3. for each task, a dense model with the path's parameters (the same body, an FFN as wide as the path's
   four experts together) trained on that task alone, on as many of that task's tokens as the MoE saw;
4. for every model, on each task's held-out tail (the same tokens: one tokenizer for all): bits per
   byte; and expert and total parameters, decode tokens/s through the engine and peak resident memory
   (``moekit.eval.efficiency.measure``).

    python benchmarks/pathways_demo.py                  # about 10 minutes on 2 cores
    python benchmarks/pathways_demo.py --steps 300      # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

TASKS = ("shakespeare", "austen", "python")
HELD_OUT = 0.05


def write_data(out: Path, python_chars: int) -> dict[str, tuple[Path, Path]]:
    """(training file, held-out file) per task, deterministic."""
    from moekit.data.corpus import load_shakespeare
    from moekit.eval.data import austen_text

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code, size = [], 0
    for f in sorted(stdlib.glob("*.py")):  # the top-level modules, in name order
        text = f.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        size += len(text)
        if size >= python_chars:
            break
    texts = {"shakespeare": load_shakespeare("train"), "austen": austen_text(), "python": "\n\n".join(code)}
    files = {}
    for name, text in texts.items():
        cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT)))
        d = out / "data"
        d.mkdir(parents=True, exist_ok=True)
        train, held = d / f"{name}.txt", d / f"{name}.heldout.txt"
        train.write_text(text[:cut], encoding="utf-8")
        held.write_text(text[cut:], encoding="utf-8")
        files[name] = (train, held)
    return files


def moekit(*args: str) -> None:
    cmd = [sys.executable, "-m", "moekit", *args]
    print("$ moekit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def bits_per_byte(path: Path, held: Path, task: str | None, seq_len: int) -> float:
    """Bits per byte of ``held`` under the model at ``path``: the training forward over consecutive
    windows of ``seq_len`` tokens (the task given to a task-routed model)."""
    from moekit.checkpoint import load

    model, tok = load(path)
    text = held.read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False).ids
    n = (len(ids) - 1) // seq_len * seq_len
    x = torch.tensor(ids[:n]).view(-1, seq_len)
    y = torch.tensor(ids[1:n + 1]).view(-1, seq_len)
    kw = {}
    if task is not None and model.cfg.tasks:
        kw["task_ids"] = torch.full((x.shape[0],), model.cfg.tasks.index(task), dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], 16):
            out = model(x[i:i + 16], labels=y[i:i + 16], **{k: v[i:i + 16] for k, v in kw.items()})
            total += float(out.loss) * y[i:i + 16].numel()
    n_bytes = len(tok.decode(ids[1:n + 1]).encode("utf-8"))
    return total / math.log(2) / n_bytes


def costs(path: Path, task: str | None) -> dict:
    from moekit.checkpoint import load
    from moekit.eval.efficiency import measure

    model, tok = load(path)
    fig = measure(model, tok, prompt_tokens=64, decode_tokens=48,
                  task=task if task is not None and model.cfg.tasks else None)
    cfg = model.cfg
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)) if cfg.num_experts else 0
    experts = n_moe * cfg.num_experts * 3 * cfg.dim * cfg.expert_ffn_dim if cfg.num_experts else \
        cfg.n_layers * 3 * cfg.dim * cfg.ffn_dim
    return {"params_total": fig["params_total"], "params_active": fig["params_active"], "ffn_params": experts,
            "decode_tokens_per_s": fig["decode_tokens_per_s"], "peak_rss_bytes": fig["peak_rss_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="runs/pathways", help="where everything goes (default runs/pathways)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of the task-routed MoE (default 2000)")
    p.add_argument("--python-chars", type=int, default=1_500_000, help="characters of Python source (default 1.5M)")
    args = p.parse_args()
    out = Path(args.out)
    files = write_data(out, args.python_chars)
    seq_len, batch = 128, 16
    body = {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 128, "vocab_size": 512}
    moe_cfg = {**body, "num_experts": 16, "top_k": 2, "expert_ffn_dim": 64, "ffn_dim": 256, "router": "sigmoid_bias",
               "routed_scaling_factor": 2.0, "task_routing": "task",
               "task_experts": {t: list(range(4 * i, 4 * i + 4)) for i, t in enumerate(TASKS)}}
    train = {"batch_size": batch, "seq_len": seq_len, "lr": 3e-3, "schedule": "constant", "warmup_steps": 20,
             "eval_every": max(1, args.steps // 10), "eval_batches": 10, "vocab_size": 512}
    data_flags = [f for t in TASKS for f in ("--data", f"{t}={files[t][0]}")]
    moe_dir = out / "moe"
    cfg_file = out / "moe.json"
    cfg_file.write_text(json.dumps({**moe_cfg, **train, "max_steps": args.steps, "save_every": args.steps}))
    if not (moe_dir / "checkpoints").exists():
        moekit("train", "--config", str(cfg_file), *data_flags, "--out", str(moe_dir), "--quiet")
    moekit("paths", str(moe_dir), *data_flags, "--out", str(out / "paths"))
    tokenizer = moe_dir / "tokenizer.json"
    # the MoE's rows per task: each task's share of its batch rows (proportional to its tokens)
    metrics = [json.loads(line) for line in (moe_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = {t: files[t][0].stat().st_size for t in TASKS}
    share = {t: sizes[t] / sum(sizes.values()) for t in TASKS}
    rows = []
    for t in TASKS:
        path_dir = out / f"path-{t}"
        if not path_dir.exists():
            moekit("extract", str(moe_dir), str(path_dir), "--task", t)
        dense_dir = out / f"dense-{t}"
        steps = max(1, round(args.steps * share[t]))  # the task's tokens in the MoE's run
        # the path's four experts of 64, as one FFN; the vocabulary follows the MoE's tokenizer
        dense_cfg = {**{k: v for k, v in body.items() if k != "vocab_size"}, "num_experts": 0, "ffn_dim": 4 * 64}
        dfile = out / f"dense-{t}.json"
        dfile.write_text(json.dumps({**dense_cfg, **{k: v for k, v in train.items() if k != "vocab_size"},
                                     "max_steps": steps, "save_every": steps, "eval_every": max(1, steps // 5)}))
        if not (dense_dir / "checkpoints").exists():
            moekit("train", "--config", str(dfile), "--data", str(files[t][0]), "--tokenizer", str(tokenizer),
                   "--out", str(dense_dir), "--quiet")
        held = files[t][1]
        for name, model_dir, task in (("full MoE", moe_dir, t), (f"path {t}", path_dir, None),
                                      (f"dense {t} alone", dense_dir, None)):
            rows.append({"task": t, "model": name, "bpb": bits_per_byte(model_dir, held, task, seq_len),
                         **costs(model_dir, task)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "pathways.json").write_text(json.dumps({"rows": rows, "steps": args.steps, "share": share,
                                                   "final_metrics": metrics[-1]}, indent=1))
    lines = ["| task | model | held-out bits per byte | FFN / expert parameters | total parameters | active / token | "
             "decode tok/s | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['model']} | {r['bpb']:.4f} | {r['ffn_params']:,} | {r['params_total']:,} | "
                     f"{r['params_active']:,} | {r['decode_tokens_per_s']:,.0f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    table = "\n".join(lines)
    (out / "pathways.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
