"""The training loop: one visible function, :func:`train`, in the order things happen.

Run directory (docs/architecture.md):
    RUN/config.json          model + train settings of the run
    RUN/tokenizer.json       the tokenizer the run uses
    RUN/metrics.jsonl        one JSON object per logged step (and per evaluation)
    RUN/checkpoints/step-N/  complete checkpoints (config, weights, tokenizer, card, trainer_state.pt)
    RUN/plots/*.png          loss curves, expert load over time
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_trainer_state,
    load_weights,
    remove_partial_checkpoints,
    save_checkpoint,
)
from moekit.config import ConfigError, ModelConfig
from moekit.data import DataError, TokenDataset, decode, load_tokenizer, prepare_data, train_tokenizer
from moekit.data.corpus import load_shakespeare
from moekit.data.tasks import (
    TaskMixture,
    check_tasks,
    describe_data,
    iter_data_texts,
    mixture_weights,
    prepare_tasks,
)
from moekit.model import Transformer, update_router_biases
from moekit.model.losses import max_violation
from moekit.parallel import (
    Parallel,
    clip_grad_norm_,
    full_model_state,
    full_optimizer_state,
    no_sync,
    parallelize,
    reduce_expert_grads,
    shard_optimizer_state,
    wrap_data_parallel,
)
from moekit.train.config import TrainConfig
from moekit.train.optim import build_optimizer, lr_at
from moekit.utils import atomic_write, atomic_write_text, data_cache_dir

# Settings that may change when a run is resumed: none of them alters the data order or the math of
# the steps already taken. (Changing max_steps stretches the cosine schedule from that point on.)
RESUMABLE_CHANGES = {"max_steps", "eval_every", "save_every", "keep_last", "log_every", "threads"}


class RunError(RuntimeError):
    """A problem with the run directory or its settings; the message says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    evals: list[dict[str, Any]] = field(default_factory=list)  # every evaluation of this run
    val_loss_task: dict[str, float] | None = None  # final validation loss of each task (data with tasks)
    val_bpb_task: dict[str, float] | None = None


def train(out: str | os.PathLike, model_cfg: ModelConfig | None = None, cfg: TrainConfig | None = None, *,
          resume: bool = False, overrides: dict[str, Any] | None = None, init: str | os.PathLike | None = None,
          progress: bool = True, desc: str = "train", parallel: Parallel | None = None) -> TrainResult:
    """Train ``model_cfg`` under ``cfg`` into run directory ``out`` (or continue it with ``resume``).

    ``init``: start from the weights (and tokenizer) of any checkpoint :func:`moekit.load` reads -- a
    moekit checkpoint or run directory, a Hugging Face directory, a ``.gguf`` file; its config is the
    model's (``model_cfg`` may be None).

    A new run that fails before its first checkpoint (bad data, a wrong setting, Ctrl-C) removes what
    it created, so the same command can simply be run again.

    ``parallel``: this process's place in a ``torchrun`` launch (:class:`moekit.parallel.Parallel`);
    every rank calls ``train`` with the same arguments. ``batch_size`` stays the global batch: each
    rank trains on its rows of the same batches, so the losses do not depend on the world size. Rank 0
    alone writes the run directory (checkpoints hold full tensors: they resume on any world size).
    """
    run = Path(out)
    par = parallel or Parallel.single()
    existed = run.exists()
    occupied = existed and any(run.iterdir())  # refused below; never clean up a folder this run did not fill
    try:
        return _train(run, model_cfg, cfg, resume=resume, overrides=overrides, init=init, progress=progress,
                      desc=desc, par=par)
    except BaseException:
        if par.is_main and not resume and not occupied and not find_checkpoints(run):
            _remove_new_run(run, existed)
        raise


def _remove_new_run(run: Path, existed: bool) -> None:
    """Undo a new run that never checkpointed: the folder if it created it, else what it wrote there."""
    import shutil

    if not run.exists():
        return
    if not existed:
        shutil.rmtree(run, ignore_errors=True)
        return
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "plots"):
        p = run / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _train(run: Path, model_cfg: ModelConfig | None, cfg: TrainConfig | None, *, resume: bool,
           overrides: dict[str, Any] | None, init: str | os.PathLike | None, progress: bool,
           desc: str, par: Parallel) -> TrainResult:
    """The body of :func:`train`.

    On resume the run's saved settings are used; ``overrides`` (or fields of ``cfg`` that differ from
    the saved ones) may change only ``RESUMABLE_CHANGES``, e.g. ``max_steps`` to extend a finished run.

    Plan: 1. run directory (new, or resume: newest complete checkpoint, drop later metrics);
    2. tokenizer and token datasets; 3. model, optimizer, RNG (several processes: shard the experts,
    wrap in DDP); 4. the loop -- per step: LR from the schedule, ``grad_accum`` micro-batches of
    forward/backward, reduce gradients, clip, optimizer step, DeepSeek bias update, log, evaluate,
    checkpoint; 5. plots. Returns the final figures. Rank 0 does every file write; what it decides or
    refuses reaches the other ranks through ``par.main_first``.
    """

    # 1. run directory -----------------------------------------------------------------------
    state: dict[str, Any] | None = None
    init_model = init_tokenizer = None
    if resume:
        opened: dict[str, Any] = {}

        def open_run():  # rank 0 checks and repairs the run; the (large) trainer state stays here
            model_cfg_, cfg_, ckpt_, opened["state"] = _open_for_resume(run, cfg, overrides or {}, par.check)
            return model_cfg_, cfg_, ckpt_

        model_cfg, cfg, ckpt_dir = par.main_first(open_run)  # a refusal on rank 0 is raised on every rank
        state = opened["state"] if "state" in opened else load_trainer_state(ckpt_dir)
    else:
        if init is not None:  # before anything is created: a bad --init is one line and no folder
            init_model, init_tokenizer, model_cfg = _load_init(Path(init), model_cfg)
        if model_cfg is None or cfg is None:
            raise ValueError("a new run needs both model_cfg and cfg")
        par.check(model_cfg, cfg.batch_size)
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
        par.main_first(lambda: _create_run_dir(run))

    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # 2. tokenizer and data ------------------------------------------------------------------
    tokenizer = par.main_first(lambda: _run_tokenizer(run, cfg, resume, None if resume else init_tokenizer),
                               then=lambda: load_tokenizer(run / "tokenizer.json"))
    if tokenizer.get_vocab_size() != model_cfg.vocab_size:
        if resume or init:
            raise RunError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                           f"{model_cfg.vocab_size}")
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": tokenizer.get_vocab_size()})
    prepare = lambda: _prepare_data(cfg, tokenizer, model_cfg.tasks)  # noqa: E731
    train_ds, val_sets = par.main_first(prepare, then=prepare)  # rank 0 tokenizes into the cache, the others read it
    model_cfg = with_data_tasks(model_cfg, train_ds.names, resume)
    use_tasks = bool(model_cfg.tasks)  # give the model each row's task
    val_sizes = [_eval_size(ds, tokenizer, cfg) for _, ds in val_sets]  # (bytes, tokens) each evaluation scores
    if not resume and par.is_main:
        atomic_write_text(run / "config.json", json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()},
                                                         indent=2) + "\n")

    # 3. model, optimizer, RNG ---------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)  # the whole model on every rank, from the same seed: the same init
    if init_model is not None:
        missing = sorted(set(model.state_dict()) - set(init_model.state_dict()))
        if missing:  # e.g. task routing needs weights a checkpoint trained without tasks does not have
            raise RunError(f"--init {init}: the checkpoint has no {missing[0]} ({len(missing)} tensors missing), which "
                           f"this model with tasks {', '.join(train_ds.names)} needs")
        model.load_state_dict(init_model.state_dict())
        # the checkpoint's end tokens and chat template go on into this run's checkpoints
        model.special_tokens = getattr(init_model, "special_tokens", None)
        model.chat_template = getattr(init_model, "chat_template", None)
        del init_model
    if state is not None:
        load_weights(model, ckpt_dir / "model.safetensors")
    parallelize(model, par)  # several processes: keep this rank's expert shard; global router losses
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    step, tokens, elapsed = 0, 0, 0.0
    window_loss, window_aux, window_n = 0.0, 0.0, 0  # train_loss / aux_loss averaged since the last log line
    if state is not None:
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer, model, par))
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        window_loss, window_aux, window_n = state.get("loss_window", (0.0, 0.0, 0))
        _set_rng_state(state["rng"])
        del state
    if par.distributed:  # router noise (noisy_topk, jitter): a different stream per rank, from the same state
        torch.manual_seed(int(torch.randint(2**62, ())) + par.rank)
    train_model = wrap_data_parallel(model, par)  # DDP for the replicated parameters; the model itself for one process
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    evals = [e for e in read_metrics(run) if "val_loss" in e]

    if cfg.effective_warmup < cfg.warmup_steps and step == 0 and par.is_main:
        print(f"note: warm-up capped at {cfg.effective_warmup} steps (a tenth of --max-steps {cfg.max_steps}; "
              f"--warmup-steps {cfg.warmup_steps} would leave no room for the schedule)", file=sys.stderr)

    # 4. the loop ----------------------------------------------------------------------------
    bar = _progress_bar(cfg.max_steps, step, desc, progress and par.is_main)
    last_loss = None
    t_start = time.perf_counter() - elapsed
    t_window, tokens_window = time.perf_counter(), 0
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.lr, cfg.effective_warmup, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_aux, loads = 0.0, 0.0, None
            for micro in range(cfg.grad_accum):
                # every rank: its rows of the same global batch; task_ids [B]: each row's task
                x, y, task_ids = par.local_rows(*train_ds.get_batch(step * cfg.grad_accum + micro, cfg.batch_size,
                                                                    cfg.seq_len, cfg.seed))
                with no_sync(train_model, micro < cfg.grad_accum - 1):  # DDP reduces on the last one
                    with autocast:  # fused linear cross-entropy: no [B, T, V] logits
                        out = _forward(train_model, x, y, task_ids if use_tasks else None)
                    loss = out.loss
                    ((loss + out.aux_loss) / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_aux += out.aux_loss.item() / cfg.grad_accum
                layer_loads = [s.expert_load for s in out.router_stats]
                loads = layer_loads if loads is None else [a + b for a, b in zip(loads, layer_loads)]
            reduce_expert_grads(model, par)
            step_loss, step_aux, loads = _global_figures(par, step_loss, step_aux, loads)
            if not math.isfinite(step_loss):
                raise RunError(f"training diverged at step {step + 1} (loss {step_loss}); the last checkpoint is "
                               f"intact -- lower --lr or enable --grad-clip and --resume")
            if cfg.grad_clip > 0:
                clip_grad_norm_(model, cfg.grad_clip, par)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if out.router_stats:  # DeepSeek-V3 balance bias: after the step, outside backprop
                for s, load in zip(out.router_stats, loads):
                    s.expert_load = load
                update_router_biases(model, out.router_stats)
            step += 1
            tokens += cfg.tokens_per_step
            tokens_window += cfg.tokens_per_step
            window_loss, window_aux, window_n = window_loss + step_loss, window_aux + step_aux, window_n + 1
            last_loss = step_loss
            maxvio = _max_violation(loads)
            # refresh=False: the bar redraws at its own interval (every step on a terminal would be
            # fine, but in a log file each redraw is a line).
            bar.set_postfix_str(_postfix(step_loss, step_aux, maxvio, tokens_window / (time.perf_counter() - t_window)),
                                refresh=False)
            bar.update(1)

            is_last = step == cfg.max_steps
            if (step % cfg.log_every == 0 or is_last) and par.is_main:
                record = {"step": step, "tokens": tokens, "elapsed_s": round(time.perf_counter() - t_start, 3),
                          "lr": lr, "train_loss": window_loss / window_n, "aux_loss": window_aux / window_n}
                if loads:
                    record["max_violation"] = maxvio
                    record["expert_load"] = [(v.float() / v.sum().clamp_min(1)).tolist() for v in loads]
                _append_metrics(run, record)
            if step % cfg.log_every == 0 or is_last:
                window_loss, window_aux, window_n = 0.0, 0.0, 0
            if val_sets and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
                t_eval = time.perf_counter()
                record = {"step": step, "tokens": tokens, "elapsed_s": round(t_eval - t_start, 3),
                          **_validate(model, val_sets, val_sizes, cfg, autocast, par, use_tasks)}
                if par.is_main:
                    _append_metrics(run, record)
                evals.append(record)
                t_start += time.perf_counter() - t_eval  # evaluation time is not training time
            if (cfg.save_every and step % cfg.save_every == 0) or is_last:
                elapsed = time.perf_counter() - t_start
                # whole tensors (expert shards gathered on rank 0): resumable on any number of processes
                weights, optimizer_state = full_model_state(model, par), full_optimizer_state(optimizer, model, par)
                if par.is_main:
                    trainer_state = {"step": step, "tokens": tokens, "elapsed_s": elapsed, "optimizer": optimizer_state,
                                     "rng": _get_rng_state(), "train_config": cfg.to_dict(),
                                     "loss_window": (window_loss, window_aux, window_n)}
                    card = {"data": describe_data(cfg.data), "step": step, "tokens": tokens,
                            "train_loss": last_loss, "val_loss": evals[-1]["val_loss"] if evals else None,
                            "val_bpb": evals[-1]["val_bpb"] if evals else None, "elapsed_s": elapsed}
                    save_checkpoint(run, step, model, tokenizer, trainer_state, card, cfg.keep_last, state=weights)
                del weights, optimizer_state
            if step % cfg.log_every == 0:
                t_window, tokens_window = time.perf_counter(), 0
    finally:
        bar.close()

    # 5. plots -------------------------------------------------------------------------------
    from moekit.train.plots import plot_run

    if par.is_main:
        plot_run(run)
    par.barrier()  # no rank returns (and reads the run) before rank 0 has written all of it
    final_eval = evals[-1] if evals else {}
    return TrainResult(run, step, tokens, time.perf_counter() - t_start, last_loss, final_eval.get("val_loss"),
                       final_eval.get("val_bpb"), evals, final_eval.get("val_loss_task"), final_eval.get("val_bpb_task"))


def _prepare_data(cfg: TrainConfig, tokenizer, model_tasks: list[str]):
    """(training batches, [(task name or None, held-out dataset)]): each task its own held-out part, in
    the model's task order when it has one (else sorted); a corpus without tasks as one unnamed set (none
    when it is too small to hold one out)."""
    tasks = prepare_tasks(cfg.data, tokenizer, data_cache_dir(), order=model_tasks or None)
    if not tasks:
        if cfg.task_weights is not None:
            raise ConfigError(f"--task-weights needs tasks in the data, and {describe_data(cfg.data)} has none: give "
                              '--data NAME=PATH once per task, or .jsonl records with a "task" field')
        train_ds, val_ds = prepare_data(cfg.data, tokenizer, data_cache_dir())
        return TaskMixture([train_ds]), ([] if val_ds is None else [(None, val_ds)])
    check_tasks(tasks, cfg.seq_len)
    names = [t.name for t in tasks]
    return (TaskMixture([t.train for t in tasks], mixture_weights(tasks, cfg.task_weights), names),
            [(t.name, t.val) for t in tasks])


def with_data_tasks(model_cfg: ModelConfig, names: list[str], resume: bool) -> ModelConfig:
    """``model_cfg`` with the data's task names, as its vocabulary follows the tokenizer (the model's own
    names, when it has them, were matched by :func:`moekit.data.tasks.prepare_tasks`); refuses a task
    routing with no tasks to route by, and a run trained without tasks whose data now has them."""
    if model_cfg.tasks != names:
        if resume:
            raise RunError(f"the run was trained without tasks, and its data now has tasks ({', '.join(names)}); "
                           "start a new run to train with them")
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "tasks": names})
    model_cfg.check_tasks()
    return model_cfg


def _forward(model, x: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor | None):
    """The model's output with its loss; ``task_ids`` ([B], each row's task) only for a model with tasks."""
    if task_ids is None:
        return model(x, labels=y)
    return model(x, labels=y, task_ids=task_ids)


def _validate(model: Transformer, val_sets: list[tuple[str | None, TokenDataset]], sizes: list[tuple[int, int]],
              cfg: TrainConfig, autocast, par: Parallel, use_tasks: bool) -> dict[str, Any]:
    """The evaluation record: ``val_loss``, ``val_bpb`` (and ``val_loss_se``); with tasks, also
    ``val_loss_task`` and ``val_bpb_task`` ({task: figure}), each task scored on ``eval_batches`` batches
    of its own held-out part. The overall figures are then the token-weighted means over the tasks:
    all scored nats over all scored tokens (bytes for bpb), as if the held-out parts were one corpus,
    so they do not depend on ``task_weights``."""
    losses, ses = [], []
    for i, (_, ds) in enumerate(val_sets):
        batch_losses: list[float] = []
        losses.append(evaluate(model, ds, cfg, autocast, par, batch_losses, task_id=i if use_tasks else None))
        ses.append(standard_error(batch_losses))  # None under torchrun: the batches are split over the ranks
    bpb = [loss / math.log(2) / (n_bytes / max(n_tokens, 1)) for loss, (n_bytes, n_tokens) in zip(losses, sizes)]
    if val_sets[0][0] is None:  # one corpus without tasks
        record = {"val_loss": losses[0], "val_bpb": bpb[0]}
        if ses[0] is not None:
            record["val_loss_se"] = ses[0]
        return record
    n_tokens = sum(n for _, n in sizes)
    nats = sum(loss * n for loss, (_, n) in zip(losses, sizes))
    record = {"val_loss": nats / n_tokens, "val_bpb": nats / math.log(2) / sum(b for b, _ in sizes)}
    if None not in ses:  # the tasks' batches are independent: the weighted mean's variance adds up
        record["val_loss_se"] = math.sqrt(sum((n / n_tokens * se) ** 2 for se, (_, n) in zip(ses, sizes)))
    names = [name for name, _ in val_sets]
    record["val_loss_task"] = dict(zip(names, losses))
    record["val_bpb_task"] = dict(zip(names, bpb))
    return record


@torch.no_grad()
def evaluate(model: Transformer, val_ds: TokenDataset, cfg: TrainConfig, autocast=None,
             parallel: Parallel | None = None, batch_losses: list[float] | None = None,
             task_id: int | None = None) -> float:
    """Mean cross-entropy (nats/token) over the first ``eval_batches`` sequential validation windows.
    ``batch_losses``, when given, receives each batch's mean (for the standard error, :func:`standard_error`).
    ``task_id``: every window is of that task (given to a model with tasks as ``task_ids``).

    With ``parallel`` every rank scores its rows of each batch (a short last batch is padded with
    ignored rows so that each rank runs every forward, as expert parallelism needs) and the sums are
    all-reduced: the same figure as one process.
    """
    par = parallel or Parallel.single()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_ds.iter_eval_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        if par.distributed:
            x, y = par.local_rows(*_pad_rows(x, y, par.world))
        task_ids = None if task_id is None else torch.full((x.shape[0],), task_id, dtype=torch.long)
        with autocast or torch.autocast("cpu", enabled=False):
            loss = _forward(model, x, y, task_ids).loss
        n = int((y != -100).sum())
        if n:  # a rank holding only padding rows has a NaN mean over nothing
            total += loss.item() * n
            count += n
            if batch_losses is not None and not par.distributed:
                batch_losses.append(loss.item())
    model.train(was_training)
    if par.distributed:
        sums = par.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean of ``values`` (the validation batches' losses): how far another set of
    held-out windows of the same size could move the figure. None for fewer than two."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _pad_rows(x: torch.Tensor, y: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows repeated from the last one, with ignored labels, up to a multiple of ``multiple``."""
    pad = -x.shape[0] % multiple
    if not pad:
        return x, y
    return torch.cat([x, x[-1:].expand(pad, -1)]), torch.cat([y, torch.full_like(y[-1:], -100).expand(pad, -1)])


def _global_figures(par: Parallel, loss: float, aux: float, loads):
    """The step's loss and aux loss averaged over the ranks, and the expert loads summed (one all-reduce)."""
    if not par.distributed:
        return loss, aux, loads
    parts = [torch.tensor([loss, aux], dtype=torch.float64)] + [v.double() for v in (loads or [])]
    flat = par.all_reduce_sum(torch.cat(parts))
    out, offset = [], 2
    for v in loads or []:
        out.append(flat[offset:offset + v.numel()].round().long())
        offset += v.numel()
    return float(flat[0]) / par.world, float(flat[1]) / par.world, (out if loads else loads)


# --------------------------------------------------------------------------- helpers
def _create_run_dir(run: Path) -> None:
    if run.exists() and any(run.iterdir()):
        raise RunError(f"run directory {run} already exists; continue it with --resume {run}, "
                       "or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "checkpoints").mkdir(exist_ok=True)


def _open_for_resume(run: Path, cfg: TrainConfig | None, overrides: dict[str, Any], check=None):
    """(model config, train config, checkpoint directory, trainer state) to resume from; ``check(model_cfg,
    batch_size)`` (the process layout's) runs before anything on disk is repaired."""
    if not (run / "config.json").exists():
        raise RunError(f"cannot resume {run}: it is not a moekit run directory (no config.json)")
    saved = json.loads((run / "config.json").read_text())
    model_cfg = ModelConfig.from_dict(saved["model"])
    saved_train = TrainConfig(**saved["train"])
    changes = dict(overrides)
    if cfg is not None:
        changes.update({k: v for k, v in cfg.to_dict().items() if v != getattr(saved_train, k)})
    changes = {k: v for k, v in changes.items() if v != getattr(saved_train, k)}
    frozen = sorted(set(changes) - RESUMABLE_CHANGES)
    if frozen:
        raise RunError(f"cannot change {', '.join(frozen)} when resuming {run} (it would change the data order or "
                       f"the math of the steps taken); changeable: {', '.join(sorted(RESUMABLE_CHANGES))}")
    new_cfg = TrainConfig(**{**saved_train.to_dict(), **changes})
    if check is not None:
        check(model_cfg, new_cfg.batch_size)
    changed = set(changes)
    remove_partial_checkpoints(run)
    found = find_checkpoints(run)
    while found:
        step, ckpt = found[-1]
        try:
            state = load_trainer_state(ckpt)
            load_weights(Transformer(model_cfg), ckpt / "model.safetensors")  # validate before trusting it
            break
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {ckpt}: {e}", file=sys.stderr)
            found.pop()
    else:
        raise RunError(f"cannot resume {run}: no complete checkpoint in {run / 'checkpoints'}; "
                       "start a new run with another --out")
    if step >= new_cfg.max_steps:
        raise RunError(f"run {run} already finished {step} steps; pass --max-steps N with N > {step} to extend it")
    if changed:
        atomic_write_text(run / "config.json", json.dumps({"model": model_cfg.to_dict(), "train": new_cfg.to_dict()},
                                                         indent=2) + "\n")
    _truncate_metrics(run, step)
    return model_cfg, new_cfg, ckpt, state


def _load_init(path: Path, model_cfg: ModelConfig | None):
    """(float32 model, tokenizer, config) of the checkpoint a run starts from; one clear line if unusable."""
    from moekit.checkpoint import load

    model, tokenizer = load(path, quantized=False)
    model = model.float()
    if model_cfg is not None and model_cfg != model.cfg:
        raise RunError(f"--init {path}: the model settings differ from the checkpoint's; the model comes from the "
                       "checkpoint (drop --preset and model flags)")
    if tokenizer is None:
        raise RunError(f"--init {path}: the checkpoint has no tokenizer; give one with --tokenizer")
    return model, tokenizer, model.cfg


def _run_tokenizer(run: Path, cfg: TrainConfig, resume: bool, init_tokenizer=None):
    path = run / "tokenizer.json"
    if resume:
        return load_tokenizer(path)
    tokenizer = new_run_tokenizer(cfg, init_tokenizer)
    atomic_write(path, lambda tmp: tokenizer.save(tmp))
    return tokenizer


def new_run_tokenizer(cfg: TrainConfig, init_tokenizer=None):
    """The tokenizer a new run trains with: ``init_tokenizer`` (--init's own), one trained on the data
    (``vocab_size``), or ``cfg.tokenizer`` (None: the embedded one)."""
    if init_tokenizer is not None and cfg.tokenizer is None and cfg.vocab_size is None:
        return init_tokenizer
    if cfg.vocab_size is not None:
        texts = iter_data_texts(cfg.data) if cfg.data else iter([load_shakespeare("train")])
        return train_tokenizer(texts, cfg.vocab_size)
    return load_tokenizer(cfg.tokenizer)


def _eval_bytes_per_token(val_ds: TokenDataset, tokenizer, cfg: TrainConfig) -> float:
    """UTF-8 bytes per predicted token over exactly the windows :func:`evaluate` scores (for bpb)."""
    n_bytes, n_tokens = _eval_size(val_ds, tokenizer, cfg)
    return n_bytes / max(n_tokens, 1)


def _eval_size(val_ds: TokenDataset, tokenizer, cfg: TrainConfig) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) predicted over exactly the windows :func:`evaluate` scores (for bpb)."""
    n_bytes, n_tokens = 0, 0
    for _, y in val_ds.iter_eval_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        for row in y.tolist():
            n_bytes += len(decode(tokenizer, row).encode("utf-8"))
            n_tokens += len(row)
    return n_bytes, n_tokens


def _get_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (a line torn by a kill is skipped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
    return records


def _truncate_metrics(run: Path, step: int) -> None:
    """Drop records after ``step`` (they will be redone), so a resumed log equals an uninterrupted one."""
    kept = [r for r in read_metrics(run) if r.get("step", 0) <= step]
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def _max_violation(loads) -> float:
    """Mean over MoE layers of MaxVio (losses.max_violation); 0 for a dense model."""
    if not loads:
        return 0.0
    return sum(float(max_violation(v)) for v in loads) / len(loads)


def _postfix(loss: float, aux: float, maxvio: float, tok_s: float) -> str:
    return f"loss {loss:.3f} aux {aux:.4f} maxvio {maxvio:.2f} {tok_s:,.0f} tok/s"


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # In a log file (not a terminal) redraw rarely, so CI logs stay readable.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                    file=sys.stderr, mininterval=interval)


__all__ = ["RunError", "TrainResult", "train", "evaluate", "DataError"]
