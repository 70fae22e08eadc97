"""``moekit compare``: a dense model against its sparse twin at equal active parameters per token.

The Switch Transformer measurement at small scale (Fedus et al. 2021, sec. 3): train both on the same
data, token budget and schedule, then ask how much sooner (in tokens and in wall-clock seconds) the
MoE reaches the dense model's final validation loss. Each model is trained once per seed (a seed
sets the init and the data order; the MoE of seed s is measured against the dense model of seed s),
and the report gives the mean and the spread. Optionally sweep routers, or the number of experts at
fixed active parameters (the Switch paper's Fig. 4 at laptop scale).

Layout: ``OUT/<model>-s<seed>/`` one run directory per model and seed, ``OUT/timing.json`` (the CPU
threads and processes each run was timed with), ``OUT/report.md``, ``OUT/summary.json``,
``OUT/val_loss.png`` and, for an expert sweep, ``OUT/scaling.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint import find_checkpoints
from moekit.config import ConfigError, ModelConfig
from moekit.data.tasks import describe_data
from moekit.parallel import Parallel
from moekit.summary import human
from moekit.train.config import TrainConfig
from moekit.train.loop import (
    RESUMABLE_CHANGES,
    RunError,
    new_run_tokenizer,
    read_metrics,
    train,
    with_data_tasks,
)
from moekit.utils import atomic_write_text, data_cache_dir

ALL_ROUTERS = ("topk", "switch", "expert_choice", "sigmoid_bias", "noisy_topk")
# Settings that do not change a run's curve: a run that differs only in these may be reused. Threads
# change its seconds, which the time fraction compares: OUT/timing.json holds them (with the processes).
_NO_EFFECT = {"threads", "save_every", "keep_last", "log_every"}
TIMING_FILE = "timing.json"


def dense_twin(moe: ModelConfig) -> ModelConfig:
    """The dense model with the MoE's depth and width and the same FFN width per token
    (top_k routed experts plus any shared experts)."""
    if moe.num_experts == 0:
        raise ConfigError("compare needs an MoE config (num_experts > 0) to build its dense twin")
    active_ffn = moe.top_k * moe.expert_ffn_dim + moe.shared_expert_ffn_dim
    return dataclasses.replace(moe, num_experts=0, ffn_dim=active_ffn, first_dense_layers=0, moe_every=1,
                               num_shared_experts=0, shared_expert_ffn_dim=0, shared_expert_gate=False)


def dense_ceiling(moe: ModelConfig) -> ModelConfig:
    """The dense model with the MoE's *total* parameters: its depth and width, and in every layer an
    FFN as wide as all of an MoE layer's experts (routed and shared) together. It holds what the MoE
    holds, at ``num_experts / top_k`` times the MoE's compute per token: the ceiling a sparse model can
    approach (issue 18; arXiv 2605.13769). Only the routers' weights (E x D per MoE layer) are missing."""
    if moe.num_experts == 0:
        raise ConfigError("compare needs an MoE config (num_experts > 0) to build its dense ceiling")
    if moe.first_dense_layers or moe.moe_every != 1:
        raise ConfigError("--ceiling needs an MoE in every layer (first_dense_layers=0, moe_every=1): a dense "
                          "model with the same total parameters would need a different width per layer")
    total_ffn = moe.num_experts * moe.expert_ffn_dim + moe.shared_expert_ffn_dim
    return dataclasses.replace(moe, num_experts=0, ffn_dim=total_ffn, first_dense_layers=0, moe_every=1,
                               num_shared_experts=0, shared_expert_ffn_dim=0, shared_expert_gate=False)


def router_variant(moe: ModelConfig, router: str) -> ModelConfig:
    """``moe`` with another router at equal active and total parameters. Switch is top-1, so its experts
    are k times wider (as in the Switch paper, where an expert is the size of the dense FFN) and there
    are k times fewer of them (16 experts of 128 at top-2 become 8 of 256 at top-1). Capacity stays the
    MoE's own (dropless unless it sets one), so routers are compared on routing alone."""
    if router == "switch":
        if moe.num_experts % moe.top_k:
            raise ConfigError(f"the switch variant of {moe.num_experts} experts at top_k={moe.top_k} needs the "
                              f"experts to divide by top_k (it has {moe.top_k} times fewer, {moe.top_k} times wider)")
        gate = moe.switch_gate if moe.router == "switch" else "matched"  # the switch router's own default
        return dataclasses.replace(moe, router="switch", top_k=1, num_experts=moe.num_experts // moe.top_k,
                                   expert_ffn_dim=moe.top_k * moe.expert_ffn_dim, switch_gate=gate,
                                   routed_scaling_factor=moe.routed_scaling_factor if moe.router == "switch" else 1.0)
    if router in ("noisy_topk", "expert_choice"):  # they have no routed_scaling_factor (config refuses one)
        return dataclasses.replace(moe, router=router, routed_scaling_factor=1.0)
    return dataclasses.replace(moe, router=router)


CEILING = "dense-total"  # the name of the dense model with the MoE's total parameters


def model_variants(moe: ModelConfig, routers: list[str] | None = None,
                   experts: list[int] | None = None, ceiling: bool = False) -> list[tuple[str, ModelConfig]]:
    """(name, config) of every model in the comparison, the dense twin first (then, with ``ceiling``,
    the dense model with the MoE's total parameters). ``experts`` sweeps the number of experts at fixed
    active parameters (top_k and expert width stay); ``routers`` sweeps routers; with both, every
    combination."""
    routers = routers or [moe.router]
    for r in routers:
        if r not in ALL_ROUTERS:
            raise ConfigError(f"unknown router {r!r} for --routers; choose from {list(ALL_ROUTERS)}")
    for e in experts or []:
        if e < moe.top_k:
            raise ConfigError(f"--experts {e}: fewer experts than top_k={moe.top_k}")
    out = [("dense", dense_twin(moe))]
    if ceiling:
        if experts:
            raise ConfigError("--ceiling mirrors one MoE; it cannot be combined with an --experts sweep")
        out.append((CEILING, dense_ceiling(moe)))
    for r in routers:
        base = router_variant(moe, r)
        if experts:
            out += [(f"moe-{r}-e{e}", dataclasses.replace(base, num_experts=e)) for e in experts]
        else:
            out.append((f"moe-{r}", base))
    return out


@dataclass
class Curve:
    name: str  # model name, e.g. "moe-topk"
    seed: int
    run: Path
    cfg: ModelConfig
    evals: list[dict[str, Any]]  # step, tokens, elapsed_s, val_loss, val_bpb
    tokens_per_s: float

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1]


def time_to_reach(evals: list[dict[str, Any]], target: float, key: str) -> float | None:
    """When val_loss first reached ``target``, in ``key`` units (``tokens`` or ``elapsed_s``); None if never.

    Between two evaluations the curve is taken as linear: the point is interpolated between the last
    evaluation above the target and the first at or below it (evaluations are every ``eval_every``
    steps, so without it the figure would be rounded up to the next evaluation). If the very first
    evaluation is already at or below the target, its time is returned.
    """
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                return float(e[key])
            frac = (prev["val_loss"] - target) / max(prev["val_loss"] - e["val_loss"], 1e-12)
            return prev[key] + frac * (e[key] - prev[key])
        prev = e
    return None


def _settings_differ(saved: dict[str, Any], cfg: ModelConfig, tcfg: TrainConfig) -> list[str]:
    """The settings in which a saved run differs from the wanted one (ignoring those without effect)."""
    diffs = []
    wanted = cfg.to_dict()
    model = saved.get("model") or {}
    if tcfg.vocab_size is not None or tcfg.tokenizer is not None:
        # The model's vocabulary follows the run's tokenizer (trained or given), compared as a train setting.
        wanted["vocab_size"] = model.get("vocab_size")
    if model != wanted:
        diffs += [f"{k} {model.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if model.get(k) != v]
    train_saved = saved.get("train") or {}
    for k, v in tcfg.to_dict().items():
        if k not in _NO_EFFECT and train_saved.get(k) != v:
            diffs.append(f"{k} {train_saved.get(k)!r} (wanted {v!r})")
    return diffs


def _check_run(run: Path, cfg: ModelConfig, tcfg: TrainConfig, timing: dict[str, int],
               recorded: dict[str, Any]) -> None:
    """Refuse a run in OUT that cannot join this comparison: trained with other settings, or timed
    with other threads or processes (``recorded``: OUT/timing.json), so that nothing trains first."""
    if (run / "config.json").exists():
        saved = json.loads((run / "config.json").read_text())
        diffs = _settings_differ(saved, cfg, tcfg)
        if diffs:
            raise RunError(f"{run} was trained with other settings: {', '.join(diffs[:4])}"
                           f"{' ...' if len(diffs) > 4 else ''}; choose another --out or remove it")
    if not find_checkpoints(run):
        return  # nothing kept: it starts over, timed as now
    saved = recorded.get(run.name)
    if saved is None:
        raise RunError(f"{run} has no record of the CPU threads and processes it was timed with ({TIMING_FILE}), "
                       "so its seconds cannot be compared with the other runs'; use a fresh --out")
    if saved != timing:
        same = f"--threads {saved['threads']}" + (f" under torchrun --nproc-per-node {saved['world_size']}"
                                                   if saved["world_size"] > 1 else " in one process")
        raise RunError(f"{run.name} was timed with {_layout(saved)}, this compare runs {_layout(timing)}: the time "
                       f"fraction compares seconds, so the runs cannot be mixed; use a fresh --out or the same "
                       f"settings ({same})")


def _layout(timing: dict[str, int]) -> str:
    t, w = timing["threads"], timing["world_size"]
    return f"{t} thread{'s' * (t != 1)} x {w} process{'es' * (w != 1)}"


def _read_timing(out: Path) -> dict[str, Any]:
    path = out / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _plan_run(run: Path, tcfg: TrainConfig, timing: dict[str, int]) -> str:
    """"reuse" (finished), "resume" (started) or "new" (:func:`_check_run` has passed it); clears a run
    that never checkpointed, and records the threads and processes that time it in OUT/timing.json."""
    done = find_checkpoints(run)
    recorded = _read_timing(run.parent)
    if recorded.get(run.name) != timing:
        atomic_write_text(run.parent / TIMING_FILE, json.dumps({**recorded, run.name: timing}, indent=2) + "\n")
    if done and done[-1][0] >= tcfg.max_steps:
        print(f"{run.name}: already trained ({done[-1][0]} steps), reusing {run}")
        return "reuse"
    if done:
        return "resume"
    if run.exists():  # started but never checkpointed: start over
        shutil.rmtree(run)
    return "new"


def _run_one(run: Path, name: str, seed: int, cfg: ModelConfig, tcfg: TrainConfig, progress: bool,
             par: Parallel, timing: dict[str, int]) -> Curve | None:
    """Train one model (or reuse/continue it if ``run`` holds the same settings). Rank 0 decides which;
    only rank 0 gets the curve (None elsewhere)."""
    plan = par.main_first(lambda: _plan_run(run, tcfg, timing))
    if plan == "resume":
        train(run, resume=True, overrides={k: getattr(tcfg, k) for k in RESUMABLE_CHANGES & _NO_EFFECT},
              progress=progress, desc=run.name, parallel=par)
    elif plan == "new":
        train(run, cfg, tcfg, progress=progress, desc=run.name, parallel=par)
    if not par.is_main:
        return None
    records = read_metrics(run)
    evals = [r for r in records if "val_loss" in r]
    train_recs = [r for r in records if "train_loss" in r]
    last = train_recs[-1]
    return Curve(name, seed, run, ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"]), evals,
                 last["tokens"] / max(last["elapsed_s"], 1e-9))


def validation_data(tcfg: TrainConfig, order: list[str] | None = None) -> tuple[str, list[str]]:
    """What the runs are validated on, in words, and the data's task names ([] without tasks); refuses a
    ``--data`` corpus with no validation split (every curve is a validation curve), a task too small to
    validate on and bad ``--task-weights``, before anything trains. Tokenizes into the data cache, which
    the runs then read. ``order``: the model config's own task order, if it lists tasks."""
    from moekit.data import prepare_data
    from moekit.data.corpus import list_plays
    from moekit.data.dataset import MIN_TOKENS_FOR_VAL
    from moekit.data.tasks import check_tasks, mixture_weights, prepare_tasks

    tokenizer = new_run_tokenizer(tcfg)
    tasks = prepare_tasks(tcfg.data, tokenizer, data_cache_dir(), order=order)
    if tasks:
        check_tasks(tasks, tcfg.seq_len)
        mixture_weights(tasks, tcfg.task_weights)
        parts = ", ".join(f"{t.name} {t.val.num_tokens:,}" for t in tasks)
        return (f"the held-out tail of each task ({parts} tokens), held out from training; the overall loss is the "
                "token-weighted mean over the tasks", [t.name for t in tasks])
    if tcfg.task_weights is not None:
        raise ConfigError("--task-weights needs tasks in the data: give --data NAME=PATH once per task, or .jsonl "
                          'records with a "task" field')
    if tcfg.data is None:
        return f"the held-out plays of the embedded Shakespeare corpus ({', '.join(list_plays('val'))})", []
    train_ds, val_ds = prepare_data(tcfg.data, tokenizer, data_cache_dir())
    total = train_ds.num_tokens + (val_ds.num_tokens if val_ds is not None else 0)
    if val_ds is None:
        raise ConfigError(f"--data {tcfg.data} holds {total:,} tokens, too few to hold out validation: compare "
                          f"needs at least {MIN_TOKENS_FOR_VAL:,} tokens (it measures validation loss)")
    if val_ds.num_tokens < tcfg.seq_len + 1:
        raise ConfigError(f"--data {tcfg.data} holds {total:,} tokens; its held-out tail of {val_ds.num_tokens:,} is "
                          f"shorter than one validation window (--seq-len {tcfg.seq_len} + 1): give more text or "
                          f"a --seq-len under {val_ds.num_tokens}")
    return f"the last {val_ds.num_tokens:,} tokens of {tcfg.data}, held out from training", []


def compare(out: str | Path, moe_cfg: ModelConfig, tcfg: TrainConfig, routers: list[str] | None = None,
            experts: list[int] | None = None, seeds: int = 1, dense_lr: float | None = None,
            progress: bool = True, parallel: Parallel | None = None, ceiling: bool | int = False,
            evaluate: bool = True, eval_limit: int | None = None) -> dict[str, Any] | None:
    """Train the dense twin and every MoE variant once per seed (``tcfg.seed``, +1, ...), then write
    ``OUT/report.md``, ``OUT/val_loss.png`` (and ``OUT/scaling.png`` for an expert sweep) and
    ``OUT/summary.json``. ``dense_lr`` gives the dense model its own learning rate (each model at its
    own best is the fair comparison). Re-running reuses or continues runs with the same settings.
    ``ceiling`` also trains the dense model with the MoE's total parameters (:func:`dense_ceiling`, with
    ``dense_lr`` too) and reports each MoE's recovery of its gain (:func:`recovery`); an int trains it
    for the first ``ceiling`` seeds only (it costs ``num_experts / top_k`` times the MoE's FFN work per
    step, often more than the other models together), and recovery is then over those seeds.

    ``evaluate``: also run ``moekit eval`` on the first seed's final models (every model of the comparison,
    on the same items) into ``OUT/eval/`` (report.md, report.json, plots); ``summary["eval_headline"]`` is
    its first paragraph. ``eval_limit``: items per task (None: ``moekit eval``'s defaults).

    ``parallel``: under ``torchrun`` every rank calls ``compare``; each run trains on all of them, rank 0
    writes the files and returns the summary (the other ranks return None)."""
    par = parallel or Parallel.single()
    out = Path(out)
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} must be >= 1")
    if eval_limit is not None and eval_limit < 1:
        raise ConfigError(f"--eval-limit {eval_limit} must be >= 1 (or --no-eval to skip the evaluation)")
    ceiling_seeds = seeds if ceiling is True else int(ceiling)
    if ceiling is not False and not 1 <= ceiling_seeds <= seeds:
        raise ConfigError(f"--ceiling-seeds {ceiling_seeds} must be between 1 and --seeds {seeds}")
    if tcfg.eval_every == 0:
        tcfg = dataclasses.replace(tcfg, eval_every=max(1, tcfg.max_steps // 10))
    variants = model_variants(moe_cfg, routers, experts, ceiling_seeds > 0)  # validates before anything is written
    for _, cfg in variants:
        par.check(cfg, tcfg.batch_size)
    runs = []  # (run directory, name, seed, model config, train config)
    for s in range(tcfg.seed, tcfg.seed + seeds):
        for name, cfg in variants:
            if name == CEILING and s >= tcfg.seed + ceiling_seeds:
                continue
            run_cfg = dataclasses.replace(tcfg, seed=s)
            if name in ("dense", CEILING) and dense_lr is not None:
                run_cfg = dataclasses.replace(run_cfg, lr=dense_lr)
            runs.append((out / f"{name}-s{s}", name, s, cfg, run_cfg))
    # Seconds are compared, so every run is timed with the same threads (train applies tcfg.threads) and processes.
    timing = {"threads": tcfg.threads or torch.get_num_threads(), "world_size": par.world}

    def check() -> tuple[str, list[str]]:
        validation, names = validation_data(tcfg, moe_cfg.tasks or None)
        recorded = _read_timing(out)
        for run, _, _, cfg, run_cfg in runs:  # train() gives each model the data's tasks: compare with them
            _check_run(run, with_data_tasks(cfg, names, False), run_cfg, timing, recorded)
        return validation, names

    validation, task_names = par.main_first(check)  # every refusal before anything trains
    created = not out.exists()
    par.main_first(lambda: out.mkdir(parents=True, exist_ok=True))
    curves = []
    try:
        for run, name, s, cfg, run_cfg in runs:
            curves.append(_run_one(run, name, s, cfg, run_cfg, progress, par, timing))
    except BaseException:  # nothing checkpointed yet: leave no folder behind, so the command can be rerun
        if par.is_main and created and not any(find_checkpoints(p) for p in out.iterdir() if p.is_dir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not par.is_main:
        return None
    summary = summarize(curves)
    summary["settings"] = {"train": tcfg.to_dict(), "dense_lr": dense_lr if dense_lr is not None else tcfg.lr,
                           "seeds": list(range(tcfg.seed, tcfg.seed + seeds)), "experts": experts,
                           "validation": validation, "tasks": task_names, **timing}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_compare(out, curves)
    if experts:
        plot_scaling(out, summary)
    if evaluate:
        try:
            summary["eval_headline"] = evaluate_final_models(out, runs, progress, eval_limit)
        except ValueError as e:  # ConfigError, EngineError, DataError: the comparison stands without it
            print(f"note: moekit eval of the final models skipped: {e}", file=sys.stderr)
            summary["eval_skipped"] = str(e)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(summary, tcfg))
    return summary


def evaluate_final_models(out: Path, runs: list[tuple], progress: bool, limit: int | None = None) -> str:
    """``moekit eval`` of the first seed's final model of every variant, into ``OUT/eval/``; its headline."""
    from moekit.eval.report import write_report
    from moekit.eval.run import evaluate

    first = min(seed for _, _, seed, _, _ in runs)
    # expert choice sees later tokens: its scores would not be those of a causal model (see the report);
    # a model routing each task to its own experts cannot score text without a task, as moekit eval does
    paths = [str(run) for run, _, seed, cfg, _ in runs
             if seed == first and (cfg.num_experts == 0 or (cfg.router != "expert_choice" and cfg.task_routing != "task"))]
    report = evaluate(paths, limit=limit, progress=progress)
    write_report(report, out / "eval")
    return report["headline"]


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def recovery(dense_loss: float, moe_loss: float, ceiling_loss: float) -> float | None:
    """How much of the ceiling's gain over the active dense model the MoE recovers:
    (dense - MoE) / (dense - ceiling). 1: as good as the dense model with all its parameters; 0: no
    better than its dense twin; above 1: better than the ceiling. None when the ceiling does not beat
    the dense model (there is no gain to recover)."""
    gain = dense_loss - ceiling_loss
    return None if gain <= 0 else (dense_loss - moe_loss) / gain


def summarize(curves: list[Curve]) -> dict[str, Any]:
    """Per run: final loss, speed and the time/token fraction against the dense run of the same seed
    (and, when the comparison has a ceiling, against the ceiling run, and the recovery). Per model: the
    same over seeds (mean, std, min, max); a fraction is averaged only if every seed reached the target
    (``reached`` says how many did)."""
    dense = {c.seed: c for c in curves if c.name == "dense"}
    ceiling = {c.seed: c for c in curves if c.name == CEILING}
    runs = []
    for c in curves:
        d = dense[c.seed]
        target = d.final["val_loss"]
        total, active = c.cfg.param_counts()
        t_tokens = time_to_reach(c.evals, target, "tokens")
        t_secs = time_to_reach(c.evals, target, "elapsed_s")
        runs.append({
            "name": c.name, "seed": c.seed, "run": str(c.run), "router": c.cfg.router if c.cfg.num_experts else None,
            "task_routing": c.cfg.task_routing if c.cfg.num_experts else None,
            "num_experts": c.cfg.num_experts, "top_k": c.cfg.top_k if c.cfg.num_experts else None,
            "expert_ffn_dim": c.cfg.expert_ffn_dim if c.cfg.num_experts else None,
            "params_total": total, "params_active": active, "target_val_loss": target,
            "final_val_loss": c.final["val_loss"], "final_val_bpb": c.final["val_bpb"],
            "final_val_loss_se": c.final.get("val_loss_se"),
            "final_val_loss_task": c.final.get("val_loss_task"), "final_val_bpb_task": c.final.get("val_bpb_task"),
            "tokens": c.final["tokens"], "train_seconds": c.final["elapsed_s"], "tokens_per_s": c.tokens_per_s,
            "step_cost_vs_dense": d.tokens_per_s / c.tokens_per_s,
            "tokens_to_dense_final": t_tokens, "seconds_to_dense_final": t_secs,
            "token_fraction": None if t_tokens is None else t_tokens / d.final["tokens"],
            "time_fraction": None if t_secs is None else t_secs / d.final["elapsed_s"],
        })
        top = ceiling.get(c.seed)
        if top is not None and c.name not in ("dense", CEILING):
            c_tokens = time_to_reach(c.evals, top.final["val_loss"], "tokens")
            c_secs = time_to_reach(c.evals, top.final["val_loss"], "elapsed_s")
            runs[-1].update({
                "ceiling_val_loss": top.final["val_loss"],
                "recovery": recovery(target, c.final["val_loss"], top.final["val_loss"]),
                "step_cost_vs_ceiling": top.tokens_per_s / c.tokens_per_s,
                "token_fraction_vs_ceiling": None if c_tokens is None else c_tokens / top.final["tokens"],
                "time_fraction_vs_ceiling": None if c_secs is None else c_secs / top.final["elapsed_s"],
            })
    models = []
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        row = {k: rs[0][k] for k in ("name", "router", "num_experts", "top_k", "expert_ffn_dim", "params_total",
                                     "params_active")}
        row["seeds"] = [r["seed"] for r in rs]
        row["final_val_loss"] = _spread([r["final_val_loss"] for r in rs])
        for key in ("final_val_loss_task", "final_val_bpb_task"):  # data with tasks: {task: spread over seeds}
            if rs[0][key]:
                row[key] = {task: _spread([r[key][task] for r in rs]) for task in rs[0][key]}
        row["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in rs)
        row["step_cost_vs_dense"] = statistics.fmean(r["step_cost_vs_dense"] for r in rs)
        row["reached"] = sum(r["time_fraction"] is not None for r in rs)
        keys = ["time_fraction", "token_fraction"]
        for key in keys:
            vals = [r[key] for r in rs]
            row[key] = _spread(vals) if None not in vals else None
            row[key + "_per_seed"] = vals
        topped = [r for r in rs if "recovery" in r]  # the seeds that trained a ceiling
        if topped:
            row["ceiling_seeds"] = [r["seed"] for r in topped]
            row["step_cost_vs_ceiling"] = statistics.fmean(r["step_cost_vs_ceiling"] for r in topped)
            for key in ("recovery", "token_fraction_vs_ceiling", "time_fraction_vs_ceiling"):
                vals = [r[key] for r in topped]
                row[key] = _spread(vals) if None not in vals else None
                row[key + "_per_seed"] = vals
        models.append(row)
    out = {"dense_final_val_loss": _spread([d.final["val_loss"] for d in dense.values()]), "runs": runs,
           "models": models}
    if ceiling:
        out["ceiling_final_val_loss"] = _spread([c.final["val_loss"] for c in ceiling.values()])
    ses = [r["final_val_loss_se"] for r in runs if r["final_val_loss_se"] is not None]
    out["eval_noise"] = statistics.fmean(ses) if ses else None  # mean standard error of a final val loss
    return out


def reading(summary: dict[str, Any]) -> str:
    """One paragraph, in words, of what a comparison found: true for the figures it is given (each
    sentence is chosen by them). The first MoE is the one read; the ceiling, when present, says
    whether capacity is what limits the small dense model at this budget."""
    models = {m["name"]: m for m in summary["models"]}
    moes = [m for m in summary["models"] if m["name"] not in ("dense", CEILING)]
    if not moes:
        return ""
    m = moes[0]
    n = len(m["seeds"])
    seeds = f"{n} seeds" if n > 1 else "1 seed"
    d = summary["dense_final_val_loss"]
    noise = summary.get("eval_noise")
    out = []
    top = models.get(CEILING)
    if top is not None:
        tf = top["token_fraction"]
        c_loss = summary["ceiling_final_val_loss"]["mean"]
        if tf is None:
            out.append(f"The dense model with the MoE's total parameters ({CEILING}, {human(top['params_total'])}) did "
                       f"not reach the small dense model's final loss in every seed ({top['reached']} of "
                       f"{len(top['seeds'])}): "
                       "capacity is not what limits the small model at this budget, so the MoE has little to win.")
        else:
            verdict = ("FFN capacity is the bottleneck here" if tf["max"] <= 0.5 else
                       "capacity limits the small model, though not by half" if tf["mean"] <= 0.8 else
                       "capacity is not the main limit at this budget")
            out.append(f"The dense model with the MoE's total parameters ({CEILING}, {human(top['params_total'])}, "
                       f"{top['step_cost_vs_dense']:.1f}x the dense step time) reached the small dense model's final "
                       f"loss in {_fmt_spread(tf)} of its tokens and ended at {c_loss:.4f} against {d['mean']:.4f}: "
                       f"{verdict}.")
    rec = m.get("recovery")
    loss = m["final_val_loss"]["mean"]
    gap = d["mean"] - loss
    better = f"{gap:.4f} nats below" if gap > 0 else f"{-gap:.4f} nats above"
    line = (f"The MoE ({m['name']}, {human(m['params_active'])} active of {human(m['params_total'])}) ended at "
            f"{loss:.4f}, {better} its dense twin")
    if rec is not None:
        line += (f", recovering {_fmt_spread(rec)} of {CEILING}'s gain " +
                 ("(at least the ~0.8 small-scale MoEs recover in the literature)" if rec["mean"] >= 0.8 else
                  "(short of the ~0.8 small-scale MoEs recover in the literature)"))
    elif top is not None:
        line += " (no recovery: a seed's ceiling gained nothing)"
    out.append(line + f", at {m['step_cost_vs_dense']:.2f}x the dense step cost.")
    per = ", ".join("not reached" if v is None else f"{v:.2f}" for v in m["time_fraction_per_seed"])
    tf = m["time_fraction"]
    if tf is None:
        out.append(f"It reached the dense model's final loss in {m['reached']} of {n} seeds (time fraction per seed: "
                   f"{per}): at this budget sparsity does not pay.")
    elif tf["max"] <= 0.5:
        out.append(f"It reached the dense model's final loss in {tf['mean']:.2f} of the dense model's training time "
                   f"(per seed: {per}): in every seed, at most half the time, so sparsity pays here.")
    elif tf["max"] < 1:
        out.append(f"It reached the dense model's final loss in {tf['mean']:.2f} of the dense model's training time "
                   f"(per seed: {per}): sooner in every seed, though not in half the time.")
    else:
        out.append(f"It reached the dense model's final loss in {tf['mean']:.2f} of the dense model's training time "
                   f"(per seed: {per}): not sooner in every seed, so at this budget sparsity does not clearly pay.")
    if noise is not None:
        within = abs(gap) < 2 * noise
        out.append(f"Evaluation noise (the standard error of a final validation loss over its held-out batches) is "
                   f"±{noise:.4f} nats; the MoE's margin over dense, {abs(gap):.4f} over {seeds}, is "
                   f"{'within' if within else 'beyond'} twice that.")
    return " ".join(out)


def _fmt_spread(s: dict[str, float] | None, pattern: str = "{:.2f}") -> str:
    if s is None:
        return "not reached"
    if s["max"] == s["min"]:
        return pattern.format(s["mean"])
    return f"{pattern.format(s['mean'])} ± {pattern.format(s['std'])}"


def render_report(summary: dict[str, Any], tcfg: TrainConfig) -> str:
    def fmt(v, pattern="{:.3f}"):
        return "not reached" if v is None else pattern.format(v)

    settings = summary.get("settings", {})
    seeds = settings.get("seeds", [tcfg.seed])
    dense_lr = settings.get("dense_lr", tcfg.lr)
    lr_text = f"lr {tcfg.lr}" if dense_lr == tcfg.lr else f"lr {tcfg.lr} for the MoE, {dense_lr} for the dense model"
    sched = getattr(tcfg, "schedule", "cosine")
    d = summary["dense_final_val_loss"]
    validation = settings.get("validation") or (
        "the held-out plays of the embedded Shakespeare corpus" if tcfg.data is None
        else f"the held-out tail of {describe_data(tcfg.data)}")
    timed = f" with {_layout(settings)}" if "threads" in settings and "world_size" in settings else ""
    lines = [
        "# Dense vs sparse: the Switch experiment, measured", "",
        f"Budget: {tcfg.max_steps} steps x {tcfg.tokens_per_step:,} tokens = {tcfg.max_steps * tcfg.tokens_per_step:,} "
        f"tokens per model and seed; the same data order for every model of a seed. Schedule: {lr_text}, "
        f"warmup {_warmup_text(tcfg)}, then {sched}. Seeds: {', '.join(map(str, seeds))} (a seed sets the init and "
        f"the data order). Validation: {validation}, {tcfg.eval_batches} batches every {tcfg.eval_every} steps. "
        f"Times are training seconds on this machine{timed} (evaluation excluded).", "",
        f"Target: each seed's dense final validation loss, **{_fmt_spread(d, '{:.4f}')}** nats/token over seeds.", "",
        *([f"Evaluation noise: the standard error of a final validation loss over its {tcfg.eval_batches} held-out "
           f"batches is {summary['eval_noise']:.4f} nats (mean over runs); differences between models smaller than "
           "about twice that are within it.", ""] if summary.get("eval_noise") is not None else []),
        "| model | params total | active/token | final val loss | tokens/s | step cost vs dense | token fraction | "
        "**time fraction** | reached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["models"]:
        lines.append(
            f"| {m['name']} | {human(m['params_total'])} | {human(m['params_active'])} | "
            f"{_fmt_spread(m['final_val_loss'], '{:.4f}')} | {m['tokens_per_s']:,.0f} | {m['step_cost_vs_dense']:.2f}x | "
            f"{_fmt_spread(m['token_fraction'])} | **{_fmt_spread(m['time_fraction'])}** | "
            f"{m['reached']}/{len(m['seeds'])} |")
    lines += per_task_table(summary)
    with_ceiling = [m for m in summary["models"] if "recovery" in m]
    if with_ceiling:
        lines += ["", f"Against the ceiling ({CEILING}: a dense model with the MoE's total parameters, final loss "
                  f"{_fmt_spread(summary['ceiling_final_val_loss'], '{:.4f}')}):", "",
                  "| model | **recovery** | token fraction vs ceiling | time fraction vs ceiling | step cost vs ceiling |",
                  "|---|---|---|---|---|"]
        for m in with_ceiling:
            rec = _fmt_spread(m["recovery"]) if m["recovery"] is not None else "n/a (a ceiling gained nothing)"
            lines.append(f"| {m['name']} | **{rec}** | "
                         f"{_fmt_spread(m['token_fraction_vs_ceiling'])} | {_fmt_spread(m['time_fraction_vs_ceiling'])} "
                         f"| {m['step_cost_vs_ceiling']:.2f}x |")
        lines += ["", "*recovery*: (dense loss - MoE loss) / (dense loss - ceiling loss) per seed: the share of what "
                  "the MoE's total parameters buy a dense model that the MoE gets at its active cost (1 = all of it; "
                  "'n/a' where a seed's ceiling did not beat its dense model). The fractions vs the ceiling "
                  "measure the MoE against the ceiling's own final loss and time."]
    lines += [
        "", "*time fraction*: seconds the model needed to reach its seed's dense final loss, divided by that dense "
        "model's training seconds (< 1: the sparse model got there sooner; the Switch Transformer reports 1/7 at "
        "scale). It is the *token fraction* (tokens needed / dense tokens: what routing buys per token) times the "
        "*step cost* (seconds per token against dense: what routing costs). A point between two evaluations is "
        "interpolated linearly. Mean ± standard deviation over seeds; per seed below.", ""]
    verdicts = []
    for m in summary["models"][1:]:
        if m["name"] == CEILING:
            continue
        tf = m["time_fraction"]
        if tf is None:
            verdicts.append(f"- **{m['name']}** did not reach the dense model's final loss in "
                            f"{len(m['seeds']) - m['reached']} of {len(m['seeds'])} seeds: at this budget it does not "
                            "beat its dense twin.")
        elif tf["mean"] > 0.8:
            tok = m["token_fraction"]["mean"]
            cause = ("it needs almost as many tokens as dense (routing buys little here)" if tok > 0.7 else
                     f"each step costs {m['step_cost_vs_dense']:.2f}x a dense step")
            verdicts.append(f"- **{m['name']}**: time fraction {tf['mean']:.2f} is above 0.8, a defect at this "
                            f"setting: {cause}.")
        else:
            verdicts.append(f"- **{m['name']}** reaches the dense final loss in {tf['mean']:.2f} of the dense time "
                            f"(seeds: {', '.join(f'{v:.2f}' for v in m['time_fraction_per_seed'])}; "
                            f"range {tf['min']:.2f}-{tf['max']:.2f}).")
    lines += verdicts + ["", "**Reading.** " + reading(summary), "", "Per seed:", "",
                         "| model | seed | final val loss | target | tokens/s | tokens to target | time to target | "
                         "time fraction |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['name']} | {r['seed']} | {r['final_val_loss']:.4f} | {r['target_val_loss']:.4f} | "
                     f"{r['tokens_per_s']:,.0f} | {fmt(r['tokens_to_dense_final'], '{:,.0f}')} | "
                     f"{fmt(r['seconds_to_dense_final'], '{:.1f} s')} | {fmt(r['time_fraction'], '{:.2f}')} |")
    lines.append("")
    if any(r["router"] == "expert_choice" for r in summary["runs"]):
        lines += ["NOTE: expert choice routes each batch's tokens per expert across whole sequences, so a token's "
                  "output (and its validation loss) depends on later tokens; its loss is not comparable to a causal "
                  "model's, and it cannot generate text. It is never picked for samples.", ""]
    if any(r.get("task_routing") == "task" for r in summary["runs"]):
        lines += ["NOTE: a model with task routing sends each task's tokens to that task's experts only, so it needs a "
                  "task for every text; `moekit eval` scores text without one, so such models are left out of its "
                  "evaluation (their per-task losses are above).", ""]
    if summary.get("eval_headline"):
        lines += ["## Evaluation of the final models (`moekit eval`, first seed)", "", summary["eval_headline"], "",
                  "Every figure, with calibration, robustness, efficiency and routing: [eval/report.md](eval/report.md).",
                  ""]
    lines += ["![validation loss](val_loss.png)", ""]
    if settings.get("experts"):
        lines += ["![final loss and time fraction against the number of experts](scaling.png)", ""]
    return "\n".join(lines)


def per_task_table(summary: dict[str, Any]) -> list[str]:
    """Report lines: each model's final validation loss and bits per byte on each task (data with tasks)."""
    models = [m for m in summary["models"] if m.get("final_val_loss_task")]
    if not models:
        return []
    tasks = list(models[0]["final_val_loss_task"])
    lines = ["", "Per task (final validation loss in nats/token / bits per byte; the overall loss above is the "
             "token-weighted mean over the tasks' held-out parts):", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in models:
        cells = [f"{_fmt_spread(m['final_val_loss_task'][t], '{:.4f}')} / "
                 f"{_fmt_spread(m['final_val_bpb_task'][t], '{:.4f}')}" for t in tasks]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return lines


def _warmup_text(tcfg: TrainConfig) -> str:
    if tcfg.effective_warmup < tcfg.warmup_steps:
        return f"{tcfg.effective_warmup} steps (capped from {tcfg.warmup_steps} at a tenth of the run)"
    return f"{tcfg.warmup_steps} steps"


def sample_candidates(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs that can generate text, best validation loss first: MoE runs with a causal router
    (expert choice sees later tokens; see the report's note) that need no task, else the dense twin."""
    causal = [r for r in summary["runs"] if r["router"] and r["router"] != "expert_choice"
              and r.get("task_routing") != "task"]
    return sorted(causal or summary["runs"][:1], key=lambda r: r["final_val_loss"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(out: Path, curves: list[Curve]) -> Path:
    """Validation loss against tokens and against training seconds: every seed of every model (one
    colour per model, dense dashed), and each seed's target as a dotted line."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    names = list(dict.fromkeys(c.name for c in curves))
    colours = {n: ("black" if n == "dense" else plt.cm.tab10(i % 10)) for i, n in enumerate(names)}
    labelled = set()
    for c in curves:
        kw = dict(color=colours[c.name], ls="--" if c.name == "dense" else "-", marker="o", ms=2, lw=1, alpha=0.85)
        label = None if c.name in labelled else c.name
        labelled.add(c.name)
        a.plot([e["tokens"] for e in c.evals], [e["val_loss"] for e in c.evals], label=label, **kw)
        b.plot([e["elapsed_s"] for e in c.evals], [e["val_loss"] for e in c.evals], **kw)
    targets = sorted({c.final["val_loss"] for c in curves if c.name == "dense"})
    finals = [e["val_loss"] for c in curves for e in c.evals[len(c.evals) // 4:]]
    for ax, xlabel in ((a, "tokens"), (b, "training seconds")):
        for t in targets:
            ax.axhline(t, color="grey", lw=0.7, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if finals:  # zoom on the part of the curves where the comparison happens
        a.set_ylim(min(finals) - 0.05, max(finals) + 0.1)
    a.set_ylabel("validation loss (nats/token)")
    a.legend(fontsize=8)
    seeds = len({c.seed for c in curves})
    fig.suptitle(f"dense vs MoE at equal active parameters per token ({seeds} seed{'s' * (seeds > 1)} each; "
                 "dotted: dense final losses)")
    fig.tight_layout()
    path = out / "val_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(out: Path, summary: dict[str, Any]) -> Path:
    """Final validation loss and time fraction against the number of experts (fixed active parameters)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    dense = summary["models"][0]
    by_router: dict[str, list[dict[str, Any]]] = {}
    for m in summary["models"][1:]:
        by_router.setdefault(m["router"], []).append(m)
    for router, ms in by_router.items():
        xs = [m["num_experts"] for m in ms]
        loss = [m["final_val_loss"] for m in ms]
        a.errorbar(xs, [s["mean"] for s in loss], yerr=[s["std"] for s in loss], marker="o", capsize=3, label=router)
        tf = [(m["num_experts"], m["time_fraction"]) for m in ms if m["time_fraction"] is not None]
        if tf:
            b.errorbar([x for x, _ in tf], [s["mean"] for _, s in tf], yerr=[s["std"] for _, s in tf], marker="o",
                       capsize=3, label=router)
        missed = [m["num_experts"] for m in ms if m["time_fraction"] is None]
        if missed:
            b.plot(missed, [1.0] * len(missed), "x", color="red", label="not reached")
    a.axhline(dense["final_val_loss"]["mean"], color="black", ls="--", lw=1, label="dense")
    b.axhline(1.0, color="black", ls="--", lw=1, label="dense")
    b.axhline(0.5, color="grey", ls=":", lw=1)
    for ax, ylabel in ((a, "final validation loss"), (b, "time fraction (to dense final loss)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts (active parameters fixed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    b.set_ylim(0, max(1.1, b.get_ylim()[1]))
    fig.suptitle("more experts at the same cost per token")
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ALL_ROUTERS", "Curve", "compare", "dense_twin", "model_variants", "router_variant", "summarize",
           "time_to_reach", "render_report", "per_task_table", "sample_candidates", "plot_compare", "plot_scaling"]
