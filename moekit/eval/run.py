"""``moekit eval``: every model on the same items, one after another, into one report dict.

Plan:
  1. check everything that can be checked before a model is loaded (tasks, limits, paths, ``--data``),
     so bad input fails with one line and nothing written;
  2. build the items once, seeded: language-modelling documents, multiple-choice items, their
     perturbed copies, the texts for the routing analysis;
  3. per model: load, score every document and every choice in one batched pass each through the
     engine (:mod:`moekit.eval.score`), measure efficiency and routing, free the model;
  4. figures (:mod:`moekit.eval.metrics`) and paired differences between models.
Writing (report.json, report.md, plots) is :func:`moekit.eval.report.write_report`'s.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.config import ConfigError
from moekit.data.corpus import VAL_PLAYS
from moekit.eval import metrics
from moekit.eval.data import austen_text, held_out_speeches, held_out_text, pieces, user_documents
from moekit.eval.perturb import PERTURBATIONS, perturb
from moekit.eval.report import headline
from moekit.eval.score import TextScore, score_continuations, score_texts, scoring_engine, trained_context
from moekit.eval.tasks import CHOICES, MC_TASKS, Item, build_items

REPORT_VERSION = 1
LM_TASKS: tuple[str, ...] = ("shakespeare", "austen")  # "data" joins them with --data
EXTRA_TASKS: tuple[str, ...] = ("robustness", "efficiency", "routing")
ALL_TASKS: tuple[str, ...] = (*LM_TASKS, *MC_TASKS, *EXTRA_TASKS)
#: Items per task by default: sized so that the main job's two models (micro-moe, width 64) take every
#: task in under two minutes on 2 cores (BENCHMARKS.md).
DEFAULT_LM_LIMIT = 48  # documents of about 2,000 characters
DEFAULT_MC_LIMIT = 150
#: Robustness re-scores this share of each task's items (the first ones) under each perturbation.
ROBUST_SHARE = 0.25
LM_SOURCES = {"shakespeare": "held-out plays (never trained on): " + ", ".join(sorted(VAL_PLAYS)),
              "austen": "Jane Austen, Persuasion (1818): out of domain",
              "data": "your text (--data)"}


@dataclass
class Suite:
    """What every model is scored on: built once, the same for all."""

    documents: dict[str, list[str]]  # LM task -> documents
    items: dict[str, list[Item]]  # MC task -> items
    perturbed_docs: dict[str, dict[str, list[str]]]  # perturbation -> LM task -> first documents, perturbed
    perturbed_items: dict[str, dict[str, list[Item]]]  # perturbation -> MC task -> first items, contexts perturbed
    routing_texts: dict[str, list[str]] | None
    limits: dict[str, int]


def parse_tasks(tasks: Sequence[str] | None, data: str | None) -> list[str]:
    """The selected tasks in canonical order; ``data`` is added with ``--data``. Unknown names fail."""
    chosen = list(ALL_TASKS) if not tasks else [t.strip() for spec in tasks for t in spec.split(",") if t.strip()]
    valid = (*ALL_TASKS, "data")
    unknown = [t for t in chosen if t not in valid]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}: valid tasks are {', '.join(valid)}")
    if "data" in chosen and data is None:
        raise ConfigError("task 'data' needs --data FILE_OR_DIR (your text)")
    if data is not None and "data" not in chosen:
        chosen.append("data")
    if "robustness" in chosen and not any(t in chosen for t in (*LM_TASKS, "data", *MC_TASKS)):
        raise ConfigError("robustness perturbs the language-modelling and multiple-choice tasks: select one of "
                          + ", ".join((*LM_TASKS, *MC_TASKS)) + " too")
    return [t for t in (*LM_TASKS, "data", *MC_TASKS, *EXTRA_TASKS) if t in chosen]


def check_paths(paths: Sequence[str]) -> None:
    """Each PATH is something :func:`moekit.load` reads (CheckpointError otherwise), before any is loaded."""
    from moekit.checkpoint import detect_format

    if not paths:
        raise ConfigError("give at least one model PATH")
    for p in paths:
        detect_format(p)


def model_names(paths: Sequence[str]) -> list[str]:
    """Short, distinct names: a folder's or file's name (``run/checkpoints/step-60``: ``run/step-60``)."""
    def short(p: str) -> str:
        path = Path(p.rstrip("/"))
        if path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}/{path.name}"
        return path.name or str(path)
    names = [short(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(Path(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def _subset(rng: np.random.Generator, docs: list[str], limit: int) -> list[str]:
    """``limit`` documents drawn without replacement, kept in their text order."""
    if len(docs) <= limit:
        return list(docs)
    return [docs[i] for i in sorted(rng.choice(len(docs), size=limit, replace=False).tolist())]


def robust_count(n: int) -> int:
    return max(1, math.ceil(n * ROBUST_SHARE)) if n else 0


def build_suite(tasks: Sequence[str], data: str | None, limit: int | None, seed: int) -> Suite:
    """Steps 1-2 of the plan: the documents and items of every selected task (seeded)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit {limit} must be an integer >= 1 (items per task)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed {seed} must be an integer >= 0")
    limits: dict[str, int] = {}
    documents: dict[str, list[str]] = {}
    sources = {"shakespeare": lambda: [p for text in held_out_text().values() for p in pieces(text)],
               "austen": lambda: pieces(austen_text()),
               "data": lambda: user_documents(data)}
    for i, task in enumerate(t for t in (*LM_TASKS, "data") if t in tasks):
        limits[task] = limit or DEFAULT_LM_LIMIT
        documents[task] = _subset(np.random.default_rng([seed, 1000 + i]), sources[task](), limits[task])
    items: dict[str, list[Item]] = {}
    for task in (t for t in MC_TASKS if t in tasks):
        limits[task] = limit or DEFAULT_MC_LIMIT
        items[task] = build_items(task, held_out_speeches(), limits[task], seed)
    perturbed_docs: dict[str, dict[str, list[str]]] = {}
    perturbed_items: dict[str, dict[str, list[Item]]] = {}
    if "robustness" in tasks:
        for kind in PERTURBATIONS:
            perturbed_docs[kind] = {t: perturb(d[:robust_count(len(d))], kind, seed) for t, d in documents.items()}
            perturbed_items[kind] = {}
            for t, its in items.items():
                first = its[:robust_count(len(its))]
                contexts = perturb([it.context for it in first], kind, seed)
                perturbed_items[kind][t] = [Item(it.task, c, it.choices, it.answer, it.play, it.meta)
                                            for it, c in zip(first, contexts)]
    routing_texts = None
    if "routing" in tasks:  # text_kinds spreads its passages over the whole texts, the same for every model
        from moekit.eval import routing

        routing_texts = routing.text_kinds("\n\n\n".join(held_out_text().values()), austen_text())
    return Suite(documents, items, perturbed_docs, perturbed_items, routing_texts, limits)


def _work_units(suite: Suite, tasks: Sequence[str]) -> int:
    n = sum(len(d) for d in suite.documents.values()) + sum(len(i) * CHOICES for i in suite.items.values())
    for kind in suite.perturbed_docs:
        n += sum(len(d) for d in suite.perturbed_docs[kind].values())
        n += sum(len(i) * CHOICES for i in suite.perturbed_items[kind].values())
    return n + ("efficiency" in tasks) + ("routing" in tasks)


def _score_items(engine, items: Sequence[Item], progress) -> list[list]:
    """Every choice of every item in one batched pass; per item, its choices' Scored."""
    pairs = [(it.context, c) for it in items for c in it.choices]
    flat = score_continuations(engine, pairs, progress, greedy=False)
    out, k = [], 0
    for it in items:
        out.append(flat[k:k + len(it.choices)])
        k += len(it.choices)
    return out


def evaluate_model(path: str, name: str, suite: Suite, tasks: Sequence[str], seed: int, bar=None) -> dict:
    """Step 3 of the plan for one model: raw scores and figures (differences between models come later)."""
    import torch

    from moekit.checkpoint import detect_format, load

    t0 = time.perf_counter()
    fmt, _ = detect_format(path)
    model, tokenizer = load(path)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer: moekit eval scores text")
    progress = bar.update if bar is not None else None
    torch.manual_seed(seed)
    context = trained_context(path)
    engine = scoring_engine(model, tokenizer, context=context)
    total, active = model.cfg.param_counts()
    out: dict = {"name": name, "path": str(path), "format": fmt, "params_total": total, "params_active": active,
                 "experts": model.cfg.num_experts, "top_k": model.cfg.top_k if model.cfg.num_experts else 0,
                 "context": engine.max_len,
                 "lm": {}, "mc": {}}
    raw: dict = {"lm": {}, "mc": {}}  # per-document scores and per-item outcomes, for paired differences
    parts: dict[str, float] = {}  # seconds by part: where the time goes (BENCHMARKS.md)
    clock = t0

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[part] = now - clock
        clock = now

    lap("load")
    all_docs = [(t, d) for t, docs in suite.documents.items() for d in docs]
    scores = score_texts(engine, [d for _, d in all_docs], progress)
    for task in suite.documents:
        raw["lm"][task] = [s for (t, _), s in zip(all_docs, scores) if t == task]
        out["lm"][task] = {**metrics.lm_metrics(raw["lm"][task]), "source": LM_SOURCES[task]}
    all_items = [it for its in suite.items.values() for it in its]
    lap("language_modelling")
    scored = _score_items(engine, all_items, progress)
    outcomes = [metrics.choice_outcomes(it.choices, s, it.answer) for it, s in zip(all_items, scored)]
    for task in suite.items:
        raw["mc"][task] = [o for it, o in zip(all_items, outcomes) if it.task == task]
        out["mc"][task] = metrics.mc_metrics(raw["mc"][task], CHOICES)
    lap("multiple_choice")
    if outcomes:
        conf, ok = [o["confidence"] for o in outcomes], [o["correct"] for o in outcomes]
        out["calibration"] = {"ece": metrics.ece(conf, ok), "bins": metrics.reliability(conf, ok), "items": len(outcomes),
                              "per_task": {t: metrics.ece([o["confidence"] for o in raw["mc"][t]],
                                                          [o["correct"] for o in raw["mc"][t]]) for t in suite.items}}
    if suite.perturbed_docs:
        out["robustness"] = _robustness(engine, suite, raw, progress)
        lap("robustness")
    del engine
    if "efficiency" in tasks:
        from moekit.eval import efficiency

        out["efficiency"] = efficiency.measure(model, tokenizer, seed=seed)
        lap("efficiency")
        if bar is not None:
            bar.update(1)
    if "routing" in tasks:
        from moekit.eval import routing

        out["routing"] = routing.analyse(model, tokenizer, suite.routing_texts, seed=seed, context=out["context"])
        lap("routing")
        if bar is not None:
            bar.update(1)
    out["seconds"] = time.perf_counter() - t0
    out["seconds_by_part"] = parts
    del model
    gc.collect()
    return {"figures": out, "raw": raw}


def _robustness(engine, suite: Suite, raw: dict, progress) -> dict:
    """Per perturbation: each task's figure on its first items, clean and perturbed, and the change."""
    result = {}
    for kind in PERTURBATIONS:
        docs = suite.perturbed_docs[kind]
        flat = [(t, d) for t, ds in docs.items() for d in ds]
        scores = score_texts(engine, [d for _, d in flat], progress) if flat else []
        items = [it for its in suite.perturbed_items[kind].values() for it in its]
        scored = _score_items(engine, items, progress) if items else []
        entry: dict = {"lm": {}, "mc": {}}
        for task in docs:
            pert = [s for (t, _), s in zip(flat, scores) if t == task]
            clean = raw["lm"][task][:len(pert)]
            d, se = metrics.bpb_difference(pert, clean)
            entry["lm"][task] = {"clean": metrics.lm_metrics(clean)["bits_per_byte"],
                                 "perturbed": metrics.lm_metrics(pert)["bits_per_byte"], "delta": d, "delta_se": se,
                                 "documents": len(pert)}
        for task in suite.perturbed_items[kind]:
            pert = [metrics.choice_outcomes(it.choices, s, it.answer) for it, s in zip(items, scored) if it.task == task]
            clean = raw["mc"][task][:len(pert)]
            d, se = metrics.paired_difference([o["correct"] for o in pert], [o["correct"] for o in clean])
            entry["mc"][task] = {"clean": float(np.mean([o["correct"] for o in clean])),
                                 "perturbed": float(np.mean([o["correct"] for o in pert])), "delta": d, "delta_se": se,
                                 "items": len(pert)}
        result[kind] = entry
    return result


def compare_models(runs: list[dict]) -> dict:
    """The best model, and every other model's paired differences from it (other minus best, same items)."""
    best_name = best_model(runs)
    best = next(r for r in runs if r["figures"]["name"] == best_name)
    diffs = []
    for other in runs:
        if other is best:
            continue
        entry = {"model": other["figures"]["name"], "vs": best_name, "bits_per_byte": {}, "acc": {}}
        for task, scores in best["raw"]["lm"].items():
            d, se = metrics.bpb_difference(other["raw"]["lm"][task], scores)
            entry["bits_per_byte"][task] = {"delta": d, "delta_se": se}
        for task, outcomes in best["raw"]["mc"].items():
            d, se = metrics.paired_difference([o["correct"] for o in other["raw"]["mc"][task]],
                                              [o["correct"] for o in outcomes])
            entry["acc"][task] = {"delta": d, "delta_se": se}
        if best["raw"]["mc"]:
            tasks = list(best["raw"]["mc"])
            d, se = metrics.paired_difference([o["correct"] for t in tasks for o in other["raw"]["mc"][t]],
                                              [o["correct"] for t in tasks for o in best["raw"]["mc"][t]])
            entry["acc_all"] = {"delta": d, "delta_se": se}
        diffs.append(entry)
    return {"best": best_name, "differences": diffs}


def best_model(runs: list[dict]) -> str:
    """Lowest in-domain bits per byte (else the first language-modelling set), else highest MC accuracy."""
    figs = [r["figures"] for r in runs]
    lm_task = next(iter(figs[0]["lm"]), None)
    if lm_task is not None:
        return min(figs, key=lambda f: f["lm"][lm_task]["bits_per_byte"])["name"]
    if figs[0]["mc"]:
        return max(figs, key=lambda f: np.mean([m["acc"] for m in f["mc"].values()]))["name"]
    return figs[0]["name"]


def evaluate(paths: Sequence[str], *, tasks: Sequence[str] | None = None, data: str | os.PathLike | None = None,
             limit: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Evaluate every model of ``paths`` on the same items; the report dict (keys in docs/eval.md).

    Raises ConfigError / CheckpointError / DataError for bad input before any model is loaded.
    """
    from tqdm import tqdm

    selected = parse_tasks(tasks, None if data is None else str(data))
    check_paths(paths)
    suite = build_suite(selected, None if data is None else str(data), limit, seed)
    names = model_names(paths)
    runs = []
    units = _work_units(suite, selected)
    for path, name in zip(paths, names):
        with tqdm(total=units, desc=f"eval {name}", unit="item", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
            runs.append(evaluate_model(path, name, suite, selected, seed, bar))
    report = {"version": REPORT_VERSION, "seed": seed, "tasks": selected, "limits": suite.limits,
              "models": [r["figures"] for r in runs], "comparison": compare_models(runs)}
    if suite.routing_texts is not None:
        report["routing_texts"] = {k: len(v) for k, v in suite.routing_texts.items()}
    report["headline"] = headline(report)
    return report


__all__ = ["ALL_TASKS", "evaluate", "evaluate_model", "build_suite", "parse_tasks", "TextScore"]
