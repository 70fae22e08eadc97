"""Tasks in the data: named corpora, each with its own held-out split, mixed into batches by weight.

A training document carries a task in one of two ways (issue 20):

- ``--data NAME=PATH`` once per task (``TrainConfig.data = {name: path}``); PATH is a ``.txt`` /
  ``.jsonl`` file or a folder of them, all of that one task (a record's ``"task"`` field, if any,
  must be NAME);
- a ``"task"`` field in the ``.jsonl`` records of a plain ``--data PATH``. Then every document must
  carry one: a record without it, or a ``.txt`` file beside labelled records, is refused rather than
  put in a guessed task.

A plain ``--data PATH`` without ``"task"`` fields (and the embedded corpus) has no tasks and trains
exactly as before. Task ids are the names' positions in sorted order (the order of the model
config's ``tasks`` when it lists them already: a resumed run, ``--init``), so they do not depend on
the order of the flags or of the records.

Each task is its own token file: a window never crosses tasks, and each task holds out its own tail
(:func:`moekit.data.dataset._val_start`, as a single corpus does). :class:`TaskMixture` draws each row
of a batch from one task, with probabilities from ``task_weights`` (default: proportional to each
task's training tokens), as a pure function of ``(seed, step)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from moekit.config import ConfigError
from moekit.data.dataset import (
    MIN_TOKENS_FOR_VAL,
    TokenDataset,
    _cache_name,
    _val_start,
    iter_task_labels,
    iter_texts,
    list_data_files,
    source_fingerprint,
    tokenize_to_file,
)
from moekit.data.errors import DataError
from moekit.data.tokenizer import find_eos_id, tokenizer_hash
from moekit.utils import atomic_write_text

# Names go into flags (--task-weights a=2,b=1), file names of the token cache and JSON keys: keep them plain.
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABELS_FORMAT = 1


def check_task_name(name: Any, where: str) -> str:
    """``name`` if it is a valid task name, else a ConfigError naming ``where`` it came from."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        what = "an empty task name" if name == "" else f"task name {name!r}"
        raise ConfigError(f"{where}: {what} is not valid: use 1-64 letters, digits, '_', '-' or '.'")
    return name


def parse_data_flags(values: list[str]) -> str | dict[str, str]:
    """The ``--data`` flags (repeatable): one plain PATH, or ``NAME=PATH`` once per task -> ``{name: path}``.

    A value is ``NAME=PATH`` when it holds ``=`` and the part before it holds no ``/`` (write
    ``./a=b.txt`` for a plain path whose name holds ``=``).
    """
    plain, named = [], []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and "/" not in name and os.sep not in name:
            named.append((name, path))
        else:
            plain.append(value)
    if plain and named:
        name, path = named[0]
        raise ConfigError(f"--data {plain[0]} is a plain path but --data {name}={path} names a task: give "
                          "NAME=PATH for every task, or one plain PATH")
    if len(plain) > 1:
        raise ConfigError(f"--data is given {len(plain)} plain paths ({', '.join(plain)}): give one PATH (a folder "
                          "may hold several files), or NAME=PATH once per task")
    if plain:
        return plain[0]
    out: dict[str, str] = {}
    for name, path in named:
        check_task_name(name, f"--data {name}={path}")
        if not path:
            raise ConfigError(f"--data {name}=: no path after '{name}=': give --data {name}=PATH (a .txt or .jsonl "
                              "file or a folder of them)")
        if name in out:
            raise ConfigError(f"--data names task {name!r} twice ({out[name]} and {path}): give each task once "
                              "(a folder may hold several files)")
        out[name] = path
    return out


def parse_task_weights(text: str) -> dict[str, float]:
    """``--task-weights code=2,prose=1`` -> ``{"code": 2.0, "prose": 1.0}`` (checked against the data later)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, weight = (s.strip() for s in part.partition("="))
        if not sep:
            raise ConfigError(f"--task-weights {text}: {part.strip()!r} is not NAME=WEIGHT (e.g. code=2,prose=1)")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"--task-weights {text}: the weight of task {name!r}, {weight!r}, is not a number") from None
        if name in out:
            raise ConfigError(f"--task-weights {text}: task {name!r} is given twice")
        out[name] = value
    if not out:
        raise ConfigError("--task-weights is empty: give NAME=WEIGHT for every task, e.g. code=2,prose=1")
    return out


def check_data_setting(data: Any) -> None:
    """Validate ``TrainConfig.data`` (None, a path, or ``{task: path}``) and ``task_weights`` values."""
    if isinstance(data, dict):
        if not data:
            raise ConfigError("data={}: give at least one task, {name: path}, or a plain path")
        for name, path in data.items():
            check_task_name(name, f"data[{name!r}]")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"data[{name!r}]={path!r}: give the path of the task's .txt/.jsonl file or folder")


def check_weights_setting(weights: Any) -> None:
    if weights is None:
        return
    for name, w in weights.items():
        check_task_name(name, f"task_weights[{name!r}]")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"task_weights[{name!r}]={w!r}: expected a number")
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"task_weights[{name!r}]={w}: a weight must be > 0 (a task's relative share of the "
                              "batches); leave a task out of the data to skip it")


def describe_data(data: str | dict[str, str] | None) -> str:
    """``data`` in words, for model cards and reports."""
    if data is None:
        return "embedded Shakespeare (train split)"
    if isinstance(data, dict):
        return ", ".join(f"{name}={data[name]}" for name in sorted(data))
    return str(data)


def _sources(data: str | dict[str, str]) -> list[tuple[str | None, Path]]:
    """``(task name or None, path)`` per source, names sorted; each path checked now (one line naming it)."""
    items = [(None, data)] if isinstance(data, str) else [(name, data[name]) for name in sorted(data)]
    for name, path in items:
        try:
            list_data_files(path)
        except DataError as e:
            if name is None:
                raise
            raise DataError(f"--data {name}={path}: {e}") from None
    return [(name, Path(path)) for name, path in items]


def iter_data_texts(data: str | dict[str, str]) -> Iterator[str]:
    """Every document of ``data`` (all tasks, names sorted): what a tokenizer is trained on."""
    sources = _sources(data)  # eager: a bad path fails at the call

    def generate() -> Iterator[str]:
        for _, path in sources:
            yield from iter_texts(path)

    return generate()


def _scan_labels(root: Path, fingerprint: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The ``"task"`` labels at ``root``: ``{"labels": {task: where first seen}, "unlabelled": where | None}``.

    Reads every ``.jsonl`` record (``.txt`` files are never read: they carry no task); the result is
    cached beside the token files, keyed by the source's fingerprint, so an unchanged corpus is
    read once.
    """
    path = cache / f"{_cache_name(root)}-tasks.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("format") == _LABELS_FORMAT and saved.get("source") == fingerprint:
            return saved
    except (OSError, ValueError):
        pass
    labels: dict[str, str] = {}
    unlabelled = None
    for where, label in iter_task_labels(root):
        if label is None:
            unlabelled = unlabelled or where
        else:
            labels.setdefault(check_task_name(label, f'{where}: "task"'), where)
    result = {"format": _LABELS_FORMAT, "source": fingerprint, "labels": labels, "unlabelled": unlabelled}
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


@dataclass
class Task:
    """One task's data: its training part and its held-out part (disjoint slices of one token file)."""

    name: str
    source: str  # where it came from, in words (for messages)
    train: TokenDataset
    val: TokenDataset


def prepare_tasks(data: str | dict[str, str] | None, tokenizer: Tokenizer, cache_dir: str | os.PathLike, *,
                  order: list[str] | None = None, eos_id: int | None = None) -> list[Task]:
    """The tasks of ``data``, each tokenized once into ``cache_dir`` and split into train and held-out
    parts; ``[]`` when the data carries no task (the embedded corpus, a plain path without ``"task"``
    fields: :func:`moekit.data.prepare_data` then serves it as today).

    Tasks come in sorted name order, or in ``order`` (the model config's ``tasks``), which must name
    the same tasks. Everything is checked (paths, labels, the order) before anything is tokenized.
    Refused with one line: a plain path whose documents mix tasks and no task, a record of another
    task in a ``NAME=PATH`` source, a task too small to hold out validation.
    """
    if data is None:
        if order:
            raise DataError(f"the model has tasks ({', '.join(order)}) but the embedded corpus has none: give "
                            "--data NAME=PATH for each task")
        return []
    sources = _sources(data)  # every path checked before the cache is touched
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    eos = find_eos_id(tokenizer) if eos_id is None else eos_id
    tok_key = tokenizer_hash(tokenizer)[:12]

    # 1. what each source holds, checked before anything is tokenized
    plans = []  # (name, source in words, token file, fingerprint, texts factory)
    for name, root in sources:
        fingerprint = source_fingerprint(root)
        if any(f.suffix.lower() == ".jsonl" for f in list_data_files(root)):
            found = _scan_labels(root, fingerprint, cache)
        else:  # only .txt files: no labels, nothing to read
            found = {"labels": {}, "unlabelled": str(root)}
        labels = found["labels"]
        if name is not None:  # --data NAME=PATH: the flag names the task; records may repeat it
            other = next((label for label in labels if label != name), None)
            if other is not None:
                raise DataError(f'{labels[other]}: "task" is {other!r} in a source given as --data {name}={root}: '
                                f"a record's task must be {name!r} or absent")
            out = cache / f"{_cache_name(root)}-{tok_key}.bin"  # the token file a plain --data PATH makes
            plans.append((name, str(root), out, fingerprint, lambda root=root: iter_texts(root)))
        elif labels:
            if found["unlabelled"] is not None:
                first, where = next(iter(labels.items()))
                raise DataError(f"{found['unlabelled']} has no task while {where} has task {first!r}: give every "
                                '.jsonl record a "task" field, or none (or use --data NAME=PATH per task)')
            for label in sorted(labels):
                out = cache / f"{_cache_name(root)}-{tok_key}-task-{label}.bin"
                plans.append((label, f'{root} (records with "task": "{label}")', out, {**fingerprint, "task": label},
                              lambda root=root, label=label: iter_texts(root, task=label)))
    if not plans:
        if order:
            raise DataError(f"the model has tasks ({', '.join(order)}) but --data {data} carries none: give "
                            '--data NAME=PATH for each task, or records with a "task" field')
        return []
    names = [p[0] for p in plans]
    if order:
        if sorted(order) != names:
            raise DataError(f"the model's tasks ({', '.join(order)}) are not the data's ({', '.join(names)}): a run "
                            "resumed or started with --init trains on the tasks its model was built for")
        plans.sort(key=lambda p: order.index(p[0]))

    # 2. tokenize (or reuse) each task and hold out its tail
    tasks = []
    for name, source, out, fingerprint, texts in plans:
        tokenize_to_file(texts(), tokenizer, out, eos, fingerprint=fingerprint, desc=f"tokenizing task {name}")
        full = TokenDataset(out)
        cut = _val_start(full.tokens, eos)
        if cut is None:
            raise DataError(f"task {name!r} ({source}) holds {full.num_tokens:,} tokens, too few to hold out "
                            f"validation (each task needs at least {MIN_TOKENS_FOR_VAL:,}): give it more text")
        tasks.append(Task(name, source, TokenDataset(out, end=cut), TokenDataset(out, start=cut)))
    return tasks


def check_tasks(tasks: list[Task], seq_len: int) -> None:
    """Refuse a task whose training or held-out part is shorter than one window of ``seq_len`` + 1 tokens."""
    for t in tasks:
        for part, ds in (("held-out", t.val), ("training", t.train)):
            if ds.num_tokens < seq_len + 1:
                raise DataError(f"task {t.name!r} ({t.source}): its {part} part of {ds.num_tokens:,} tokens is "
                                f"shorter than one window (--seq-len {seq_len} + 1): give it more text or a "
                                f"--seq-len under {ds.num_tokens}")


def mixture_weights(tasks: list[Task], weights: dict[str, float] | None) -> list[float]:
    """Each task's probability of filling a batch row: ``weights`` normalised (every task named, none
    other), or, by default, proportional to its training tokens (as if the tasks were one corpus)."""
    names = [t.name for t in tasks]
    if weights is None:
        raw = [float(t.train.num_tokens) for t in tasks]
    else:
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise ConfigError(f"--task-weights names task {unknown[0]!r}, which the data does not have; its tasks: "
                              f"{', '.join(names)}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise ConfigError(f"--task-weights gives no weight for task {', '.join(map(repr, missing))}: give "
                              f"NAME=WEIGHT for every task ({', '.join(names)})")
        raw = [float(weights[n]) for n in names]
    total = sum(raw)
    return [w / total for w in raw]


class TaskMixture:
    """Training batches drawn from several token datasets (one per task), each row from one task.

    With one dataset (a corpus without tasks) the draws are exactly :meth:`TokenDataset.get_batch`'s,
    so a run without tasks sees the batches it always did.
    """

    def __init__(self, datasets: list[TokenDataset], probs: list[float] | None = None,
                 names: list[str] | None = None) -> None:
        if not datasets:
            raise ValueError("TaskMixture needs at least one dataset")
        self.datasets = datasets
        self.probs = np.asarray(probs if probs is not None else [1.0] * len(datasets), dtype=np.float64)
        if self.probs.shape != (len(datasets),) or not np.isclose(self.probs.sum(), 1.0) or (self.probs <= 0).any():
            raise ValueError(f"probs must be {len(datasets)} positive numbers summing to 1, got {probs}")
        self.names = list(names) if names is not None else []

    def get_batch(self, step: int, batch_size: int, seq_len: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, task_ids)``: LongTensors ``[B, T]``, ``[B, T]`` and ``[B]`` (each row's task index).

        A pure function of ``(seed, step)``, like :meth:`TokenDataset.get_batch`: the generator seeded
        with both draws each row's task (by ``probs``), then the row's start, uniform over its task's
        windows. A resumed run replays exactly the batches of an uninterrupted one.
        """
        if len(self.datasets) == 1:
            x, y = self.datasets[0].get_batch(step, batch_size, seq_len, seed)
            return x, y, torch.zeros(batch_size, dtype=torch.long)
        if step < 0 or seed < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0, seed >= 0 and batch_size >= 1, got {step=}, {seed=}, {batch_size=}")
        for ds in self.datasets:
            ds._require(seq_len)
        rng = np.random.default_rng([int(seed), int(step)])
        task = rng.choice(len(self.datasets), size=batch_size, p=self.probs)  # [B]
        highs = np.array([ds.num_tokens - seq_len for ds in self.datasets])  # last start of each: n - seq_len - 1
        starts = rng.integers(0, highs[task])  # [B]
        x = torch.empty(batch_size, seq_len, dtype=torch.long)
        y = torch.empty(batch_size, seq_len, dtype=torch.long)
        for t in np.unique(task):
            rows = np.flatnonzero(task == t)
            x[torch.from_numpy(rows)], y[torch.from_numpy(rows)] = self.datasets[t]._windows(starts[rows], seq_len)
        return x, y, torch.from_numpy(task.astype(np.int64))


__all__ = ["TASK_NAME", "Task", "TaskMixture", "check_task_name", "check_tasks", "describe_data", "iter_data_texts",
           "mixture_weights", "parse_data_flags", "parse_task_weights", "prepare_tasks"]
