"""``moekit compare``: a dense model against its sparse twin at equal active parameters per token.

The Switch Transformer measurement at small scale (Fedus et al. 2021, sec. 3): train both on the same
data, token budget and schedule, then ask how much sooner (in tokens and in wall-clock seconds) the
MoE reaches the dense model's final validation loss. Optionally sweep routers on the same budget.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.checkpoint import find_checkpoints
from moekit.config import ConfigError, ModelConfig
from moekit.summary import human
from moekit.train.config import TrainConfig
from moekit.train.loop import read_metrics, train
from moekit.utils import atomic_write_text

ALL_ROUTERS = ("topk", "switch", "expert_choice", "sigmoid_bias", "noisy_topk")


def dense_twin(moe: ModelConfig) -> ModelConfig:
    """The dense model with the MoE's depth and width and the same FFN width per token
    (top_k routed experts plus any shared experts)."""
    if moe.num_experts == 0:
        raise ConfigError("compare needs an MoE config (num_experts > 0) to build its dense twin")
    active_ffn = moe.top_k * moe.expert_ffn_dim + moe.shared_expert_ffn_dim
    return dataclasses.replace(moe, num_experts=0, ffn_dim=active_ffn, first_dense_layers=0, moe_every=1,
                               num_shared_experts=0, shared_expert_ffn_dim=0, shared_expert_gate=False)


def router_variant(moe: ModelConfig, router: str) -> ModelConfig:
    """``moe`` with another router at equal active parameters. Switch is top-1, so its experts are
    k times wider (as in the Switch paper, where an expert is the size of the dense FFN)."""
    if router == "switch":
        return dataclasses.replace(moe, router="switch", top_k=1, expert_ffn_dim=moe.top_k * moe.expert_ffn_dim,
                                   capacity_factor=moe.capacity_factor or 1.25,
                                   eval_capacity_factor=moe.eval_capacity_factor or 2.0)
    return dataclasses.replace(moe, router=router)


@dataclass
class Curve:
    name: str
    cfg: ModelConfig
    evals: list[dict[str, Any]]  # step, tokens, elapsed_s, val_loss, val_bpb
    tokens_per_s: float

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1]


def time_to_reach(evals: list[dict[str, Any]], target: float, key: str) -> float | None:
    """First point (interpolated linearly between evaluations) where val_loss <= target, in ``key``
    units (``tokens`` or ``elapsed_s``); None if never reached."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                return float(e[key])
            frac = (prev["val_loss"] - target) / max(prev["val_loss"] - e["val_loss"], 1e-12)
            return prev[key] + frac * (e[key] - prev[key])
        prev = e
    return None


def _run_one(out: Path, name: str, cfg: ModelConfig, tcfg: TrainConfig, progress: bool) -> Curve:
    run = out / name
    done = find_checkpoints(run)
    if done and done[-1][0] >= tcfg.max_steps:  # finished earlier: reuse it
        print(f"{name}: already trained ({done[-1][0]} steps), reusing {run}")
    elif done:
        train(run, cfg, tcfg, resume=True, progress=progress, desc=name)
    else:
        if run.exists():  # started but never checkpointed: start over
            import shutil

            shutil.rmtree(run)
        train(run, cfg, tcfg, progress=progress, desc=name)
    records = read_metrics(run)
    evals = [r for r in records if "val_loss" in r]
    train_recs = [r for r in records if "train_loss" in r]
    last = train_recs[-1]
    return Curve(name, ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"]), evals,
                 last["tokens"] / max(last["elapsed_s"], 1e-9))


def compare(out: str | Path, moe_cfg: ModelConfig, tcfg: TrainConfig, routers: list[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Train the dense twin and the MoE (one per router in ``routers``), then write
    ``OUT/report.md``, ``OUT/val_loss.png`` and ``OUT/summary.json``. Re-running continues or reuses runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tcfg.eval_every == 0:
        tcfg = dataclasses.replace(tcfg, eval_every=max(1, tcfg.max_steps // 10))
    routers = routers or [moe_cfg.router]
    for r in routers:
        if r not in ALL_ROUTERS:
            raise ConfigError(f"unknown router {r!r} for --routers; choose from {list(ALL_ROUTERS)}")
    curves = [_run_one(out, "dense", dense_twin(moe_cfg), tcfg, progress)]
    for r in routers:
        curves.append(_run_one(out, f"moe-{r}", router_variant(moe_cfg, r), tcfg, progress))
    summary = summarize(curves)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_compare(out, curves)
    atomic_write_text(out / "report.md", render_report(summary, tcfg))
    return summary


def summarize(curves: list[Curve]) -> dict[str, Any]:
    dense = curves[0]
    target = dense.final["val_loss"]
    rows = []
    for c in curves:
        total, active = c.cfg.param_counts()
        t_tokens = time_to_reach(c.evals, target, "tokens")
        t_secs = time_to_reach(c.evals, target, "elapsed_s")
        rows.append({
            "name": c.name, "router": c.cfg.router if c.cfg.num_experts else None,
            "params_total": total, "params_active": active,
            "final_val_loss": c.final["val_loss"], "final_val_bpb": c.final["val_bpb"],
            "tokens": c.final["tokens"], "train_seconds": c.final["elapsed_s"], "tokens_per_s": c.tokens_per_s,
            "tokens_to_dense_final": t_tokens, "seconds_to_dense_final": t_secs,
            "token_fraction": None if t_tokens is None else t_tokens / dense.final["tokens"],
            "time_fraction": None if t_secs is None else t_secs / dense.final["elapsed_s"],
        })
    return {"dense_final_val_loss": target, "runs": rows}


def render_report(summary: dict[str, Any], tcfg: TrainConfig) -> str:
    def fmt(v, pattern="{:.3f}"):
        return "not reached" if v is None else pattern.format(v)

    lines = [
        "# Dense vs sparse: the Switch experiment, measured", "",
        f"Budget: {tcfg.max_steps} steps x {tcfg.tokens_per_step:,} tokens = {tcfg.max_steps * tcfg.tokens_per_step:,} "
        f"tokens per model, same data order, schedule (lr {tcfg.lr}, warmup {tcfg.warmup_steps}, cosine) and seed "
        f"{tcfg.seed}. Validation: held-out text, {tcfg.eval_batches} batches every {tcfg.eval_every} steps. "
        "Times are training seconds on this machine (evaluation excluded).", "",
        f"Target: the dense model's final validation loss, **{summary['dense_final_val_loss']:.4f}** nats/token.", "",
        "| model | params total | active/token | final val loss | val bpb | tokens/s | tokens to target | "
        "time to target | time fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['name']} | {human(r['params_total'])} | {human(r['params_active'])} | {r['final_val_loss']:.4f} | "
            f"{r['final_val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | {fmt(r['tokens_to_dense_final'], '{:,.0f}')} | "
            f"{fmt(r['seconds_to_dense_final'], '{:.1f} s')} | {fmt(r['time_fraction'], '{:.2f}')} |")
    lines += ["", "*time fraction*: seconds the model needed to reach the target divided by the dense model's total "
              "training seconds (< 1: the sparse model got there sooner; the Switch Transformer reports 1/7 at scale).",
              ""]
    if any(r["router"] == "expert_choice" for r in summary["runs"]):
        lines += ["NOTE: expert choice routes each batch's tokens per expert across whole sequences, so a token's "
                  "output (and its validation loss) depends on later tokens; its loss is not comparable to a causal "
                  "model's, and it cannot generate text. It is never picked for samples.", ""]
    lines += ["![validation loss](val_loss.png)", ""]
    return "\n".join(lines)


def sample_candidates(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs that can generate text, best validation loss first: MoE runs with a causal router
    (expert choice sees later tokens; see the report's note), else the dense twin."""
    causal = [r for r in summary["runs"] if r["router"] and r["router"] != "expert_choice"]
    return sorted(causal or summary["runs"][:1], key=lambda r: r["final_val_loss"])


def plot_compare(out: Path, curves: list[Curve]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for c in curves:
        style = "k--" if c.cfg.num_experts == 0 else "-"
        a.plot([e["tokens"] for e in c.evals], [e["val_loss"] for e in c.evals], style, marker="o", ms=3, label=c.name)
        b.plot([e["elapsed_s"] for e in c.evals], [e["val_loss"] for e in c.evals], style, marker="o", ms=3, label=c.name)
    target = curves[0].final["val_loss"]
    for ax, xlabel in ((a, "tokens"), (b, "training seconds")):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    a.set_ylabel("validation loss (nats/token)")
    a.legend()
    fig.suptitle("dense vs MoE at equal active parameters per token")
    fig.tight_layout()
    path = out / "val_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
