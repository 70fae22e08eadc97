"""Evaluation speed: scoring through the engine batched against one prompt at a time, and a whole
``moekit eval`` of two models with the default limits, part by part.

Models: the main job's shape (``micro-moe``: width 64, 2 layers, 16 experts of 128, top-2, vocabulary
4096) and its dense twin (``num_experts=0``), built from a seed (speed does not depend on the weights),
or the checkpoints given with ``--models`` (e.g. ``runs/compare/dense-s0 runs/compare/moe-sigmoid_bias-s0``
after ``make run``).

1. Scoring (:mod:`moekit.eval.score`), per model, on the default items of ``moekit eval``:
   - multiple choice: every (context, choice) pair of the three tasks (``score_continuations``);
   - language modelling: the held-out documents (``score_texts``, windows of the context).
   Batched = ``scoring_engine`` (32 slots, 4096 prompt tokens per step); one at a time = an
   ``Engine(max_batch=1)`` with the serving default ``prefill_chunk``, i.e. one prompt per forward pass.
   Reported: prompt tokens per second (every token fed, context included), the ratio (the issue asks
   for >= 3x), and the largest difference between the two runs' log-likelihoods (they must agree to 1e-5).
   The one-at-a-time run scores the first ``--single`` prompts only (it is slow); its rate is per token.
2. ``moekit eval`` of both models with the default limits and every task (``evaluate``): wall time,
   and ``seconds_by_part`` of each model (load, language modelling, multiple choice, robustness,
   efficiency, routing). The issue asks for under 2 minutes on 2 cores.

    python benchmarks/eval_scoring.py                  # about 1-2 minutes on 2 quiet cores
    python benchmarks/eval_scoring.py --threads 1
    python benchmarks/eval_scoring.py --models runs/compare/dense-s0 runs/compare/moe-sigmoid_bias-s0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moekit  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.data import load_tokenizer  # noqa: E402
from moekit.eval.run import ALL_TASKS, build_suite, evaluate  # noqa: E402
from moekit.eval.score import score_continuations, score_texts, scoring_engine  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.model import Transformer  # noqa: E402


def seeded_models(root: Path) -> list[str]:
    paths = []
    for name, extra in (("dense", dict(num_experts=0)), ("moe", {})):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("micro-moe", **extra)
        paths.append(str(moekit.save(Transformer(cfg), load_tokenizer(), root / name)))
    return paths


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rate(engine: Engine, score, items: list) -> tuple[list, float, int]:
    """(scores, prompt tokens per second, prompt tokens) of ``score(engine, items)``: every token the engine
    prefilled, context included."""
    before = engine.stats.prompt_tokens
    scores, seconds = timed(lambda: score(engine, items))
    tokens = engine.stats.prompt_tokens - before
    return scores, tokens / seconds, tokens


def scoring_rows(path: str, suite, single: int) -> list[str]:
    model, tok = moekit.load(path)
    pairs = [(it.context, c) for items in suite.items.values() for it in items for c in it.choices]
    docs = [d for ds in suite.documents.values() for d in ds]
    rows = []
    for label, items, score, n_single in (
        ("multiple choice", pairs, lambda e, xs: score_continuations(e, xs, greedy=False), single),
        ("language modelling", docs, score_texts, max(1, single // 40)),  # a document is ~15 windows of ~60 pairs' tokens
    ):
        batched_engine = scoring_engine(model, tok)
        score(batched_engine, items[:n_single])  # warm-up (the runner fuses its weights on first use)
        batched, rate_b, tokens = rate(batched_engine, score, items)
        one = Engine(model, tok, max_batch=1)
        alone, rate_s, _ = rate(one, score, items[:n_single])
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(batched, alone))
        rows.append(f"| {Path(path).name} | {label} | {tokens:,} | {rate_b:,.0f} | {rate_s:,.0f} | {rate_b / rate_s:.1f}x "
                    f"| {diff:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs=2, default=None, metavar="PATH", help="two checkpoints (default: seeded micro-moe)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--single", type=int, default=400, help="pairs scored one at a time (default 400)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.models or seeded_models(Path(tmp))
        suite = build_suite(list(ALL_TASKS), None, None, 0)
        print(f"torch {torch.__version__}, {args.threads} threads\n")
        print("| model | scoring | prompt tokens | batched tok/s | one at a time tok/s | speed-up | max |Δ logprob| |")
        print("|---|---|---|---|---|---|---|")
        for p in paths:
            for row in scoring_rows(p, suite, args.single):
                print(row, flush=True)
        report, wall = timed(lambda: evaluate(paths, progress=False))
        print(f"\nmoekit eval of {len(paths)} models, every task, default limits {report['limits']}: {wall:.1f} s")
        for fig in report["models"]:
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in fig["seconds_by_part"].items())
            print(f"  {fig['name']}: {fig['seconds']:.1f} s ({parts})")


if __name__ == "__main__":
    main()
