"""``moekit paths``: which experts serve each task, and how much of the network each task really uses.

Legend: L MoE layers, E experts per layer, K experts per token.

Plan:
  1. check what can be checked before a model is loaded: the ``--data name=PATH`` specs (names, paths
     that exist, no task twice), ``--limit``;
  2. load the checkpoint; a dense model has nothing to trace; a task-aware model (``task_routing`` other
     than "none") must know every task name;
  3. read each task's documents (pieces of about 2,000 characters, :func:`moekit.eval.data.user_documents`),
     at most ``limit`` of them spread through the whole text;
  4. prefill every document through the inference engine with routing recorded (the windows and the BOS
     handling of :mod:`moekit.eval.routing`), each request carrying its task for a task-aware model, and
     count each task's (token, expert) assignments per layer;
  5. per task: the expert shares, the experts reached, and the smallest sets covering 90/95/99% of its
     assignments (:mod:`moekit.paths.coverage`); between tasks, the Jensen-Shannon divergence per layer.
Writing (paths.json, paths.md, heatmaps) is :func:`moekit.paths.report.write_paths`'s.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit.config import ConfigError, ModelConfig
from moekit.data.dataset import list_data_files
from moekit.data.errors import DataError
from moekit.eval import routing
from moekit.eval.score import trained_context
from moekit.paths.coverage import COVERAGES, coverage_summary

PATHS_VERSION = 1
#: Documents (of about 2,000 characters) per task by default: enough for stable shares in a few seconds
#: per task on 2 cores for the tiny presets.
DEFAULT_LIMIT = 100
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as moekit train's task names


# --------------------------------------------------------------------------- tasks and their text
def parse_data_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``--data`` values -> [(task, path)]: ``NAME=PATH``, or a bare ``PATH`` named by its file or folder
    name without the extension (characters a name cannot hold turned into '_'). A value is ``NAME=PATH``
    when it holds ``=`` and the part before it holds no ``/`` (write ``./a=b.txt`` for a path whose name
    holds ``=``): the rule of ``moekit train --data``. Checks the names and that no task comes twice (the
    paths: :func:`read_tasks`)."""
    if not specs:
        raise ConfigError("give each task's text with --data NAME=PATH (a .txt/.jsonl file or a folder of them)")
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or os.sep in name:
            # A bare PATH is named after its file or folder, characters a name cannot hold turned into '_'.
            name, path = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec.rstrip("/")).name.split(".")[0])[:64], spec
        if not path:
            raise ConfigError(f"--data {spec}: no path after '=' (give NAME=PATH)")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--data {spec}: task name {name!r} is not valid: use 1-64 letters, digits, '_', '-' "
                              "or '.' (write --data NAME=PATH)")
        if name in (n for n, _ in out):
            raise ConfigError(f"task {name!r} is given twice with --data; each task takes one PATH (a folder may "
                              "hold many files)")
        out.append((name, path))
    return out


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit {limit!r} must be an integer >= 1 (documents per task)")


def spread_evenly(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced through the list, in order (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_tasks(tasks: Sequence[tuple[str, str]], limit: int | None = DEFAULT_LIMIT) -> dict[str, list[str]]:
    """{task: documents}: every path is checked before any is read (DataError: missing, no text files);
    a task whose files hold no text is a DataError too."""
    from moekit.eval.data import user_documents

    check_limit(limit)
    for _, path in tasks:
        list_data_files(path)
    texts = {}
    for name, path in tasks:
        try:
            docs = user_documents(path)
        except DataError as e:
            raise DataError(f"task {name!r}: {e}") from None
        texts[name] = spread_evenly(docs, limit) if limit else docs
    return texts


# --------------------------------------------------------------------------- tasks in the model
def task_routing(cfg: ModelConfig) -> str:
    """The routing by task the model does: its ``task_routing``, "none" for a dense model."""
    return cfg.task_routing if cfg.num_experts else "none"


def check_task_names(cfg: ModelConfig, names: Sequence[str]) -> None:
    """A task-aware model (``task_routing`` "embedding" or "task") routes by the tasks it was trained on:
    every name must be one of them. A plain model takes any name (it is only a label)."""
    if task_routing(cfg) == "none":
        return
    known = cfg.tasks
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown task {name!r}: this model (task_routing={task_routing(cfg)!r}) knows the "
                              f"tasks {', '.join(known)}")


def check_traceable(cfg: ModelConfig, where: str) -> None:
    """A ConfigError for a model whose routing cannot be traced through the engine."""
    if not cfg.num_experts:
        raise ConfigError(f"nothing to trace: the model has no experts ({where} is dense)")
    if cfg.router == "expert_choice":
        raise ConfigError(f"{where} uses expert_choice routing, where each expert picks among all tokens of a "
                          "batch: a task's path depends on the other text beside it, and the engine cannot run it")


def route_tasks(model, tokenizer, texts: dict[str, list[str]], *, seed: int = 0, context: int | None = None,
                progress=None) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, list[list[int]]]]:
    """({task: [L, E] assignments}, {task: tokens}, {task: [L] experts of the leading BOS}) from the
    engine's routing of each task's documents.

    A BOS the engine puts before every passage is not counted (as in :mod:`moekit.eval.routing`), but the
    experts it goes to are returned: every request starts with it, so an extraction keeps them.
    A task-aware model gets the task with each request (``SamplingParams(task=...)``); prefill only, so
    nothing is sampled and ``seed`` changes nothing. ``context``: the longest window (a run's trained
    context, :func:`moekit.eval.score.trained_context`). ``progress``: called with 1 per finished request."""
    from moekit.infer.engine import SamplingParams

    cfg = model.cfg
    routing.check_texts(tokenizer, texts)
    engine = routing.routing_engine(model, tokenizer, context)
    chunks = routing.routing_windows(engine, texts)
    aware = task_routing(cfg) != "none"
    params = {name: SamplingParams(max_new_tokens=0, temperature=0.0, seed=seed, routing=True,
                                   **({"task": name} if aware else {}))
              for name in texts}
    completions = engine.generate([ids for _, ids, _ in chunks], [params[name] for name, _, _ in chunks], progress)
    counts, tokens = routing.count_assignments(chunks, completions, texts, cfg.num_moe_layers, cfg.num_experts)
    lead: dict[str, list[set[int]]] = {name: [set() for _ in range(cfg.num_moe_layers)] for name in texts}
    for (name, _, skip), done in zip(chunks, completions):
        for per_layer in done.routing[:skip]:
            for j, (ids_K, _) in enumerate(per_layer):
                lead[name][j].update(ids_K)
    return counts, tokens, {name: [sorted(s) for s in sets] for name, sets in lead.items()}


# --------------------------------------------------------------------------- the result
def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one routed expert: gate and up [2F, D] and down [D, F]."""
    return 3 * cfg.dim * cfg.expert_ffn_dim


def summarise(cfg: ModelConfig, counts: dict[str, np.ndarray], tokens: dict[str, int], lead: dict[str, list[list[int]]],
              sources: dict[str, str], documents: dict[str, int], checkpoint: str) -> dict:
    """The paths.json dict (keys: docs/pathways.md) from each task's [L, E] assignment counts."""
    per = expert_params(cfg)
    layers = routing.moe_layers(cfg)
    tasks = {}
    for name, c in counts.items():
        rows = c.tolist()
        tasks[name] = {
            "source": sources[name],
            "documents": documents[name],
            "tokens": tokens[name],
            "assignments": rows,
            "share": routing.shares(rows),
            "reached": [sum(1 for n in row if n) for row in rows],
            "bos_experts": lead[name],
            "coverage": {str(cov): coverage_summary(rows, cov, per) for cov in COVERAGES},
        }
    present = [n for n in tasks if tokens[n]]
    pairs = list(itertools.combinations(present, 2))
    return {
        "version": PATHS_VERSION,
        "checkpoint": checkpoint,
        "task_routing": task_routing(cfg),
        "router": cfg.router,
        "layers": layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "expert_params": per,
        "expert_params_total": per * cfg.num_experts * len(layers),
        "params_total": cfg.param_counts()[0],
        "coverages": list(COVERAGES),
        "tasks": tasks,
        "specialisation": {
            "pairs": [[a, b] for a, b in pairs],
            "js_divergence": [[routing.js_divergence(pa, pb) for pa, pb in zip(tasks[a]["share"], tasks[b]["share"])]
                              for a, b in pairs],
        },
    }


def trace_paths(checkpoint: str | os.PathLike, data: Sequence[str], *, limit: int | None = DEFAULT_LIMIT,
                seed: int = 0, progress: bool = False) -> dict:
    """``moekit paths``: steps 1-5 of the plan for ``checkpoint`` and the ``--data`` specs; returns the
    paths.json dict. Raises ConfigError / DataError / CheckpointError (one line) for bad input."""
    from moekit.checkpoint import load

    specs = parse_data_specs(data)
    check_limit(limit)
    for _, path in specs:
        list_data_files(path)
    model, tokenizer = load(checkpoint)
    check_traceable(model.cfg, str(checkpoint))
    if tokenizer is None:
        raise ConfigError(f"{checkpoint} has no tokenizer; cannot turn the tasks' text into tokens")
    check_task_names(model.cfg, [name for name, _ in specs])
    texts = read_tasks(specs, limit)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(desc="paths", unit="window", file=sys.stderr)
    try:
        counts, tokens, lead = route_tasks(model, tokenizer, texts, seed=seed, context=trained_context(checkpoint),
                                           progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return summarise(model.cfg, counts, tokens, lead, dict(specs), {n: len(t) for n, t in texts.items()},
                     str(checkpoint))
