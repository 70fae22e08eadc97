"""This project's tasks as lm-evaluation-harness task files: a YAML per task and the JSONL it reads.

The items are ``moekit eval``'s own, built by the same code (:func:`moekit.eval.run.build_suite`) with
the same seed and default limits, so a harness run and ``moekit eval`` score the same text:

==================== ======================= ========================================================
harness task         ``moekit eval`` task    what
==================== ======================= ========================================================
``moekit_next_line`` ``next-line``           multiple choice (``acc``, ``acc_norm``), 150 questions
``moekit_speaker``   ``speaker``             multiple choice, 150 questions
``moekit_blank``     ``blank``               multiple choice, 150 questions
``moekit_shakespeare`` ``shakespeare``       ``loglikelihood_rolling`` on 48 held-out documents
``moekit_austen``    ``austen``              ``loglikelihood_rolling`` on 48 documents of Persuasion
==================== ======================= ========================================================

All five carry the tag ``moekit`` (``--tasks moekit`` runs them all). The harness's ``--limit N`` takes
the first N items; the first N multiple-choice questions are exactly ``moekit eval --limit N``'s (a
task's questions come from one seeded generator in order). Language-modelling documents are a seeded
draw that depends on the limit, so ``moekit_shakespeare --limit N`` is the first N of the 48 documents.

NOTE: a YAML names its JSONL by absolute path: the harness hands ``data_files`` to Hugging Face
``datasets``, which resolves a relative path against the working directory, not the YAML's folder.
So the files are written per machine (:func:`write_tasks`), not shipped; ``datasets`` then reads them
offline (``HF_DATASETS_OFFLINE=1``; ``moekit lm-eval`` sets it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moekit.eval.tasks import MC_TASKS
from moekit.utils import atomic_write_text, data_cache_dir

#: moekit eval task -> harness task name.
HARNESS_TASKS = {"next-line": "moekit_next_line", "speaker": "moekit_speaker", "blank": "moekit_blank",
                 "shakespeare": "moekit_shakespeare", "austen": "moekit_austen"}
TAG = "moekit"


def _yaml(task: str, data: Path, body: list[str]) -> str:
    # json.dumps gives a double-quoted scalar YAML reads back exactly (any path, any character).
    return "\n".join([
        "# Written by moekit (moekit.eval.lm_eval_tasks.write_tasks); the items are moekit eval's own.",
        f"task: {task}",
        f"tag: {TAG}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        *body,
        "metadata:",
        "  version: 1.0",
        "",
    ])


MC_BODY = [
    "output_type: multiple_choice",
    # Field names, not Jinja: the harness then hands the stored strings over untouched.
    "doc_to_text: context",
    "doc_to_choice: choices",
    "doc_to_target: answer",
    # moekit's choices carry their own leading text; the harness's default delimiter would add a space.
    'target_delimiter: ""',
    "metric_list:",
    "  - metric: acc",
    "    aggregation: mean",
    "    higher_is_better: true",
    "  - metric: acc_norm",
    "    aggregation: mean",
    "    higher_is_better: true",
]

LM_BODY = [
    "output_type: loglikelihood_rolling",
    'doc_to_text: ""',
    "doc_to_target: text",
    "metric_list:",
    "  - metric: word_perplexity",
    "    aggregation: weighted_perplexity",
    "    higher_is_better: false",
    "  - metric: byte_perplexity",
    "    aggregation: weighted_perplexity",
    "    higher_is_better: false",
    "  - metric: bits_per_byte",
    "    aggregation: bits_per_byte",
    "    higher_is_better: false",
]


def write_tasks(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write every task's YAML and JSONL into ``directory`` (created); returns it, for ``--include_path``.

    ``seed`` is ``moekit eval --seed``: the same seed gives the same items as ``moekit eval`` with its
    default limits. Files already there are replaced.
    """
    from moekit.eval.run import build_suite

    out = Path(directory).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    suite = build_suite(list(HARNESS_TASKS), None, None, seed)
    for task, docs in suite.documents.items():
        name = HARNESS_TASKS[task]
        data = out / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        atomic_write_text(out / f"{name}.yaml", _yaml(name, data, LM_BODY))
    for task in MC_TASKS:
        name = HARNESS_TASKS[task]
        data = out / f"{name}.jsonl"
        rows = [{"context": it.context, "choices": list(it.choices), "answer": it.answer, "play": it.play}
                for it in suite.items[task]]
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(out / f"{name}.yaml", _yaml(name, data, MC_BODY))
    return out


def default_task_dir() -> Path:
    """Where ``moekit lm-eval`` writes the tasks when not told: ``lm_eval_tasks`` in moekit's cache folder
    (``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``)."""
    return data_cache_dir() / "lm_eval_tasks"


def set_offline() -> None:
    """Offline unless told otherwise: the project's tasks read local files, and a hub lookup would only wait
    for a network that is not there (``HF_DATASETS_OFFLINE=0`` lets the harness's built-in tasks download).

    NOTE: ``datasets`` and ``huggingface_hub`` read these when first imported: call this before lm_eval.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
