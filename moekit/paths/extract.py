"""``moekit extract``: a smaller checkpoint holding only one task's experts.

Legend: L MoE layers, E experts per layer, E' kept experts per layer, K experts per token.

Plan:
  1. check the arguments before anything is loaded (one selection, a coverage in (0, 1], K >= 1, one
     source of statistics, DST free);
  2. load the checkpoint in float; refuse what cannot be cut (dense, expert choice, group-limited routing)
     and a K outside [top_k, E];
  3. the task's statistics: its (token, expert) assignments per layer, routed now from ``data`` (as
     ``moekit paths`` does) or read from a paths.json; a task-routed model (``task_routing="task"``)
     without them: the task's own experts;
  4. the kept experts (:func:`moekit.paths.coverage.kept_experts`): the same number E' in every layer,
     ids ascending, so expert e' of the new model is the e'-th kept expert of the old one; the BOS's
     experts always; under task routing only the task's own;
  5. cut: the router's rows (``weight`` [E, D], the sigmoid_bias ``bias`` [E], the noisy router's
     ``noise_weight`` [E, D]) and the stacked experts (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F])
     indexed by the kept ids; ``num_experts`` E', ``top_k`` min(K, E'); the tasks as one task's model sees
     them (:func:`cut_config`; an embedding router's task vector cut to that task's row); shared experts,
     attention and dense layers unchanged;
  6. write into a temporary sibling of DST (weights in the source's storage dtype, the tokenizer, special
     tokens, a model card saying what was kept, extraction.json) and rename it into place.

Why it is exact at full coverage: a token's router picks its top-K experts by logit (or biased score);
the experts it picked in the full model are all kept, and every kept expert's logit is the same as before,
so it picks the same ones. The gate weights are the same when they depend only on the chosen experts:
softmax over the top-K logits (``norm_topk_prob``), the noisy router's softmax of its top K, sigmoid
scores, Switch's unit gate. A softmax over *all* experts (``topk`` without ``norm_topk_prob``, Switch's
probability gate) loses the removed experts from its denominator: the card then says the copy is close
but not exact -- unless the model routes by task and all of the task's experts are kept, since its
softmax never counted the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import ConfigError, ModelConfig
from moekit.data.dataset import list_data_files
from moekit.eval.routing import moe_layers
from moekit.eval.score import trained_context
from moekit.paths.coverage import check_coverage, held_share, kept_experts
from moekit.paths.trace import (
    DEFAULT_LIMIT,
    check_limit,
    check_task_names,
    check_traceable,
    expert_params,
    read_tasks,
    route_tasks,
    task_routing,
)

DEFAULT_COVERAGE = 0.95
EXTRACTION_FILE = "extraction.json"
#: Tensors of an MoE block with one row per routed expert, cut to the kept experts.
EXPERT_ROWS = ("ffn.router.weight", "ffn.router.bias", "ffn.router.noise_weight",
               "ffn.experts.gate_up_proj", "ffn.experts.down_proj")


@dataclass
class Extraction:
    """What :func:`extract` wrote; also the content of extraction.json."""

    path: Path
    source: str
    task: str
    selection: str  # "coverage" | "experts_per_layer" | "task_experts" (a task-routed model's own set)
    coverage: float | None
    statistics: str  # where the task's assignments came from
    tokens: int | None  # tokens behind the statistics
    layers: list[int]  # MoE block indices
    kept: list[list[int]]  # [L] original ids of the kept experts, ascending
    bos_experts: list[list[int]]  # [L] experts of the BOS that starts every request, always kept ([] without one)
    held: list[float] | None  # [L] share of the task's assignments the kept experts received (None: no statistics)
    task_routing: tuple[str, str]  # before, after
    num_experts: tuple[int, int]  # before, after
    top_k: tuple[int, int]
    params: tuple[int, int]  # total parameters before, after
    expert_params: tuple[int, int]  # routed-expert parameters before, after
    exact: bool  # the task's statistics text gets the full model's logits (float noise aside)
    why: str

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def gates_depend_on_chosen_only(cfg: ModelConfig) -> bool:
    """Whether a token's gate weights depend only on the experts it chose (then removing experts it never
    chooses leaves them unchanged)."""
    if cfg.router == "topk":
        return cfg.norm_topk_prob
    if cfg.router == "switch":
        return cfg.switch_gate == "unit"
    return cfg.router in ("noisy_topk", "sigmoid_bias")


def exactness(cfg: ModelConfig, new_cfg: ModelConfig, assignments: Sequence[Sequence[int]] | None,
              kept: Sequence[Sequence[int]], own: Sequence[int] | None = None) -> tuple[bool, str]:
    """(whether the cut model gives the full model's logits on the statistics' text, why): see the module
    docstring. ``assignments`` None: no statistics (a task-routed model's own experts). ``own``: under
    task routing, the task's own experts: the only ones its tokens can reach, and the only ones in the
    denominator of a softmax gate."""
    whole_set = own is not None and all(set(own) <= set(ids) for ids in kept)
    if assignments is None:
        if not whole_set:
            return False, "no statistics, and not all of the task's own experts were kept"
    elif not all({e for e, n in enumerate(row) if n} <= set(ids) for row, ids in zip(assignments, kept)):
        return False, "some experts the task's tokens reach were left out"
    if new_cfg.top_k != cfg.top_k:
        return False, f"top_k fell from {cfg.top_k} to {new_cfg.top_k}"
    if whole_set:
        return True, ("the task's own experts are all kept: its tokens can reach no other, and a gate's softmax "
                      "never counted the others")
    if not gates_depend_on_chosen_only(cfg):
        return False, f"router={cfg.router!r} gates with a softmax over all experts, and the removed ones left its denominator"
    return True, "every expert the task's tokens reach is kept, and gate weights depend only on the chosen experts"


def cut_state(state: dict[str, torch.Tensor], cfg: ModelConfig, kept: Sequence[Sequence[int]],
              task_id: int | None = None) -> dict[str, torch.Tensor]:
    """Step 5 on a state dict: each MoE block's per-expert tensors indexed by that layer's kept ids; with
    ``task_id`` (embedding routing), each router's task embedding [n_tasks, D] cut to that task's row."""
    out = dict(state)
    for ids, i in zip(kept, moe_layers(cfg), strict=True):
        index = torch.tensor(list(ids), dtype=torch.long)
        for suffix in EXPERT_ROWS:
            key = f"layers.{i}.{suffix}"
            if key in out:
                out[key] = out[key].index_select(0, index).contiguous()
        key = f"layers.{i}.ffn.router.task_embed"
        if task_id is not None and key in out:
            out[key] = out[key][task_id:task_id + 1].contiguous()
    return out


def cut_config(cfg: ModelConfig, n: int, task: str) -> ModelConfig:
    """The cut model's config: ``n`` experts, top_k capped at n, and the tasks as one task's model sees them.

    Task routing ("task") becomes plain routing over the kept experts (they are the task's own, or some of
    them) with ``tasks=[task]``, so ``--task NAME`` is still accepted, and exports work. Embedding routing
    stays, with the one task: its vector is part of every router input, so requests keep naming the task.
    A plain model keeps ``[task]`` if it knew the task, else no tasks."""
    mode = task_routing(cfg)
    fields = dict(num_experts=n, top_k=min(cfg.top_k, n))
    if mode == "task":
        fields.update(task_routing="none", task_experts=None, tasks=[task])
    elif mode == "embedding":
        fields.update(tasks=[task])
    elif getattr(cfg, "tasks", None):
        fields.update(tasks=[task] if task in cfg.tasks else [])
    return dataclasses.replace(cfg, **fields)


def cut_model(model, kept: Sequence[Sequence[int]], task: str):
    """A new model holding only the ``kept`` experts of each MoE layer for ``task`` (step 5), special tokens
    and chat template carried over."""
    from moekit.model import Transformer

    cfg: ModelConfig = model.cfg
    new = Transformer(cut_config(cfg, len(kept[0]), task))
    task_id = cfg.tasks.index(task) if task_routing(cfg) == "embedding" else None
    new.load_state_dict(cut_state(model.state_dict(), cfg, kept, task_id), strict=True)
    for attr in ("special_tokens", "chat_template"):
        if hasattr(model, attr):
            setattr(new, attr, getattr(model, attr))
    return new.eval()


def read_paths_file(path: str | os.PathLike, task: str, cfg: ModelConfig) -> tuple[list[list[int]], int, list[list[int]]]:
    """(the task's [L][E] assignments, its tokens, [L] experts of the leading BOS) from a paths.json of this
    model's shape."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--paths file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--paths {path} is not a readable paths.json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ConfigError(f"--paths {path} is not a paths.json from moekit paths (no 'tasks')")
    if task not in data["tasks"]:
        raise ConfigError(f"task {task!r} has no statistics in {path}; it has {', '.join(data['tasks']) or 'none'}")
    if data.get("layers") != moe_layers(cfg) or data.get("num_experts") != cfg.num_experts:
        raise ConfigError(f"{path} describes another model (MoE layers {data.get('layers')}, "
                          f"{data.get('num_experts')} experts; this one: {moe_layers(cfg)}, {cfg.num_experts})")
    t = data["tasks"][task]
    return t["assignments"], int(t["tokens"]), t.get("bos_experts") or [[] for _ in t["assignments"]]


def _card(cfg: ModelConfig, x: Extraction) -> str:
    from moekit.checkpoint import model_card

    if x.selection == "coverage":
        what = f"the experts holding {x.coverage:g} of the task's (token, expert) assignments in each layer"
    elif x.selection == "experts_per_layer":
        what = f"the {x.num_experts[1]} experts with the most of the task's assignments"
    else:
        what = "the task's own experts (task routing: its tokens can reach no other)"
    routing = x.task_routing[1] + ("" if x.task_routing[0] == x.task_routing[1] else f" (was {x.task_routing[0]})")
    lines = [model_card(cfg).rstrip("\n"), "", "## Extracted path", "",
             f"Extracted by `moekit extract` from `{x.source}` for task **{x.task}**: {what}; statistics: "
             f"{x.statistics}." + (" The experts of the BOS token that starts every request are always kept."
                                   if any(x.bos_experts) else "")
             + " Every layer keeps the same number of experts; a layer that needs fewer is filled with its next most "
             "used ones.",
             "", "| | |", "|---|---|",
             f"| task | {x.task} |",
             f"| task routing | {routing}" + (" (give the task with each request)" if x.task_routing[1] == "embedding"
                                             else "") + " |",
             f"| experts per MoE layer | {x.num_experts[1]} of {x.num_experts[0]} |",
             f"| experts per token (top_k) | {x.top_k[1]}" + (f" (was {x.top_k[0]})" if x.top_k[0] != x.top_k[1] else "")
             + " |",
             f"| routed-expert parameters | {x.expert_params[0]:,} -> {x.expert_params[1]:,} |",
             f"| parameters (total) | {x.params[0]:,} -> {x.params[1]:,} |",
             f"| same logits as the full model on the task's text | {'yes' if x.exact else 'no'}: {x.why} |",
             "", "| layer | kept experts (original ids) | share of the task's assignments |", "|---|---|---:|"]
    held = x.held or [None] * len(x.layers)
    lines += [f"| {i} | {', '.join(map(str, ids))} | {'-' if h is None else f'{h:.1%}'} |"
              for i, ids, h in zip(x.layers, x.kept, held)]
    return "\n".join(lines) + "\n"


def extract(src: str | os.PathLike, dst: str | os.PathLike, task: str, *, coverage: float | None = None,
            per_layer: int | None = None, data: str | os.PathLike | None = None,
            paths_file: str | os.PathLike | None = None, limit: int | None = DEFAULT_LIMIT, seed: int = 0,
            overwrite: bool = False) -> Extraction:
    """``moekit extract`` (the plan above). ``coverage`` (default 0.95) or ``per_layer`` (K experts per
    layer) picks the experts from the task's statistics: its text ``data`` routed now, or ``paths_file``.
    Bad input raises ConfigError / DataError / CheckpointError before anything is written."""
    from moekit.checkpoint import detect_format, load, save, source_dtype

    # 1. arguments
    if coverage is not None and per_layer is not None:
        raise ConfigError("give --coverage C or --experts-per-layer K, not both")
    if coverage is not None:
        try:
            check_coverage(coverage)
        except ValueError as e:
            raise ConfigError(f"--coverage: {e}") from None
    if per_layer is not None and (isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 1):
        raise ConfigError(f"--experts-per-layer {per_layer!r} must be an integer >= 1")
    if data is not None and paths_file is not None:
        raise ConfigError("give the task's statistics once: --data PATH (its text) or --paths paths.json, not both")
    check_limit(limit)
    dst = Path(dst)
    if dst.suffix.lower() == ".gguf":
        raise ConfigError(f"{dst}: moekit extract writes a moekit checkpoint directory; convert it to GGUF after")
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists; pass --overwrite to replace it")
    _, resolved = detect_format(src)
    if dst.resolve() in (Path(src).resolve(), resolved.resolve()):
        raise ConfigError(f"{dst} is the source checkpoint; write the extracted path somewhere else")
    if data is not None:
        list_data_files(data)
    # 2. the model
    model, tokenizer = load(src, quantized=False)
    cfg: ModelConfig = model.cfg
    check_traceable(cfg, str(src))
    if cfg.n_group > 1:
        raise ConfigError(f"{src} uses group-limited routing (n_group={cfg.n_group}): the kept experts would not "
                          "form equal groups, and without the groups tokens would choose differently")
    if per_layer is not None and not cfg.top_k <= per_layer <= cfg.num_experts:
        raise ConfigError(f"--experts-per-layer {per_layer} must be between top_k={cfg.top_k} and "
                          f"num_experts={cfg.num_experts}")
    # 3. statistics
    check_task_names(cfg, [task])
    mode = task_routing(cfg)
    own = cfg.task_expert_sets()[task] if mode == "task" else None
    layers = moe_layers(cfg)
    assignments, n_tokens, bos = None, None, [[] for _ in layers]
    if data is not None:
        if tokenizer is None:
            raise ConfigError(f"{src} has no tokenizer; cannot turn the task's text into tokens")
        texts = read_tasks([(task, str(data))], limit)
        counts, tokens, lead = route_tasks(model, tokenizer, texts, seed=seed, context=trained_context(src))
        assignments, n_tokens, bos = counts[task].tolist(), tokens[task], lead[task]
        statistics = f"{n_tokens:,} tokens of {data}"
    elif paths_file is not None:
        assignments, n_tokens, bos = read_paths_file(paths_file, task, cfg)
        statistics = f"{n_tokens:,} tokens, from {paths_file}"
    elif own is not None:
        if coverage is not None or per_layer is not None:
            raise ConfigError(f"--coverage and --experts-per-layer choose by the task's statistics: give --data PATH "
                              f"or --paths FILE (without them, task {task!r} keeps its own {len(own)} experts)")
        statistics = "the task's own experts (task_routing='task')"
    else:
        raise ConfigError(f"task {task!r} has no statistics: give its text with --data PATH, or a paths.json from "
                          "moekit paths with --paths FILE")
    if assignments is not None and not any(n for row in assignments for n in row):
        raise ConfigError(f"task {task!r} has no statistics: its text routed no token")
    # 4. the kept experts (under task routing, only the task's own: its tokens can reach no other)
    if assignments is None:
        kept, selection = [sorted(own) for _ in layers], "task_experts"
    else:
        if per_layer is not None and own is not None and per_layer > len(own):
            raise ConfigError(f"--experts-per-layer {per_layer} is more than task {task!r}'s {len(own)} experts")
        if per_layer is None and coverage is None:
            coverage = DEFAULT_COVERAGE
        selection = "coverage" if per_layer is None else "experts_per_layer"
        kept = kept_experts(assignments, coverage=None if per_layer else coverage, per_layer=per_layer, always=bos,
                            within=own)
    # 5. cut
    new = cut_model(model, kept, task)
    exact, why = exactness(cfg, new.cfg, assignments, kept, own)
    x = Extraction(
        path=dst, source=str(src), task=task, selection=selection,
        coverage=coverage if selection == "coverage" else None, statistics=statistics, tokens=n_tokens,
        layers=layers, kept=kept, bos_experts=bos,
        held=None if assignments is None else [held_share(row, ids) for row, ids in zip(assignments, kept)],
        task_routing=(mode, task_routing(new.cfg)),
        num_experts=(cfg.num_experts, new.cfg.num_experts), top_k=(cfg.top_k, new.cfg.top_k),
        params=(cfg.param_counts()[0], new.cfg.param_counts()[0]),
        expert_params=(expert_params(cfg) * cfg.num_experts * len(layers),
                       expert_params(cfg) * new.cfg.num_experts * len(layers)),
        exact=exact, why=why)
    # 6. write: a temporary sibling renamed into place, so DST is either complete or absent
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        from moekit.utils import atomic_write_text, plain_permissions

        plain_permissions(tmp, directory=True)
        save(new, tokenizer, tmp, card=_card(new.cfg, x), dtype=source_dtype(src))
        atomic_write_text(tmp / EXTRACTION_FILE, json.dumps(x.to_dict(), indent=1) + "\n")
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return x
