"""``moekit paths`` output: the headline a person reads in a minute, paths.md, paths.json and one task x
expert heatmap per MoE layer (PNG, matplotlib's Agg canvas: no display, no pyplot state).

The keys of paths.json are documented in docs/pathways.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moekit.utils import atomic_write_text

#: The coverage the headline and the extraction default speak of.
HEADLINE_COVERAGE = "0.95"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def headline(result: dict) -> str:
    """The first paragraph of paths.md: per task, the experts per layer that serve 95% of its routing
    and their share of the expert parameters; between tasks, how differently they use the experts."""
    E, L, K = result["num_experts"], len(result["layers"]), result["top_k"]
    routed = {"none": "plain token routing (no task labels: this is what routing separates on its own)",
              "embedding": "task-aware routing (a task embedding in the router's input)",
              "task": "task-level routing (each task has its own experts)"}[result["task_routing"]]
    parts = []
    for name, t in result["tasks"].items():
        c = t["coverage"][HEADLINE_COVERAGE]
        parts.append(f"{name} ({t['tokens']:,} tokens) {c['mean_count']:.1f} ({_pct(c['fraction'])} of the expert "
                     "parameters)")
    text = (f"{L} MoE layer{'s' if L > 1 else ''} of {E} experts (top-{K}), {routed}. Experts per layer that serve "
            f"95% of each task's routing: " + "; ".join(parts) + ".")
    spec = result["specialisation"]
    if spec["pairs"]:
        means = [float(np.mean(js)) for js in spec["js_divergence"]]
        best = int(np.argmax(means))
        a, b = spec["pairs"][best]
        if len(means) == 1:
            text += (f" {a} and {b} use the experts {means[0]:.2f} bits apart (Jensen-Shannon divergence of their "
                     "expert shares, mean over layers: 0 = alike, 1 = disjoint experts).")
        else:
            text += (f" The tasks use the experts {np.mean(means):.2f} bits apart on average (Jensen-Shannon, mean "
                     f"over layers and pairs: 0 = alike, 1 = disjoint); most apart: {a} and {b}, {means[best]:.2f} bits.")
    return text


def markdown(result: dict, images: list[str]) -> str:
    """paths.md: the headline, then per task and layer the expert counts at each coverage."""
    covs = [str(c) for c in result["coverages"]]
    E = result["num_experts"]
    lines = ["# Paths through the experts", "", headline(result), "",
             f"Checkpoint `{result['checkpoint']}`; {result['expert_params']:,} parameters per expert, "
             f"{result['expert_params_total']:,} in all routed experts of {result['params_total']:,} in all.", "",
             "## How much of the network each task uses", "",
             "Mean experts per layer (of " + str(E) + ") holding each share of a task's (token, expert) assignments, "
             "and those experts' share of the routed-expert parameters.", "",
             "| task | documents | tokens | reached | " + " | ".join(f"{float(c):.0%}" for c in covs) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(covs)]
    for name, t in result["tasks"].items():
        cells = [f"{t['coverage'][c]['mean_count']:.1f} ({_pct(t['coverage'][c]['fraction'])})" for c in covs]
        reached = sum(t["reached"]) / len(t["reached"])
        lines.append(f"| {name} | {t['documents']} | {t['tokens']:,} | {reached:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "## Per layer", "",
              "Experts covering 95% of each task's assignments (most used first).", "",
              "| layer | " + " | ".join(result["tasks"]) + " |", "|---|" + "---|" * len(result["tasks"])]
    for j, layer in enumerate(result["layers"]):
        cells = [", ".join(map(str, t["coverage"][HEADLINE_COVERAGE]["experts"][j])) for t in result["tasks"].values()]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    spec = result["specialisation"]
    if spec["pairs"]:
        lines += ["", "## How differently the tasks route", "",
                  "Jensen-Shannon divergence (bits) between two tasks' expert shares: 0 = the same experts in the same "
                  "proportions, 1 = disjoint experts.", "",
                  "| pair | " + " | ".join(f"layer {i}" for i in result["layers"]) + " |",
                  "|---|" + "---:|" * len(result["layers"])]
        for (a, b), js in zip(spec["pairs"], spec["js_divergence"]):
            lines.append(f"| {a} vs {b} | " + " | ".join(f"{v:.3f}" for v in js) + " |")
    if images:
        lines += ["", "## Heatmaps", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", "Keys of paths.json: docs/pathways.md. Extract a task's path with "
              "`moekit extract CKPT DST --task NAME --paths paths.json`.", ""]
    return "\n".join(lines)


def heatmaps(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per MoE layer: rows tasks, columns experts, colour the task's share of the layer's assignments."""
    from matplotlib.figure import Figure

    names = list(result["tasks"])
    E = result["num_experts"]
    paths = []
    for j, layer in enumerate(result["layers"]):
        share = np.array([result["tasks"][n]["share"][j] for n in names])
        fig = Figure(figsize=(max(5.0, 0.3 * E + 2.5), max(2.2, 0.45 * len(names) + 1.4)), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        if E <= 64:
            ax.set_xticks(range(E))
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}: share of each task's assignments (uniform = {1 / E:.3f})")
        fig.colorbar(image, ax=ax, label="share")
        path = out_dir / f"heatmap_layer{layer}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def write_paths(result: dict, out: str | os.PathLike) -> list[Path]:
    """paths.json, paths.md and the heatmaps in ``out`` (created); returns [json, md, *pngs]."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = heatmaps(result, out_dir)
    atomic_write_text(out_dir / "paths.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "paths.md", markdown(result, [p.name for p in pngs]))
    return [out_dir / "paths.json", out_dir / "paths.md", *pngs]
