"""Text generation for one caller at a time: thin wrappers over :class:`moekit.infer.engine.Engine`.

- :func:`generate`: text in, continuation text out, optionally streamed piece by piece;
- :func:`generate_tokens`: a batch of prompt ids in, one token per row yielded per step.

Both reuse one engine per model between calls (:func:`_lease`): its runner, KV cache and fused weights
are built once, and later calls see the model's weights as they are then (the runner shares them, so
training in place between calls is seen). A call that needs more slots, or finds the weights replaced,
cast or moved, builds a new engine. NOTE: the engine, and the KV-cache pages its longest answer
touched, stay with the model until the model is freed.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Generator, Sequence

import torch
from tokenizers import Tokenizer

from moekit.data.special import special_tokens_of
from moekit.infer.engine import Engine, EngineError, SamplingParams
from moekit.model.transformer import Transformer


# --------------------------------------------------------------------------- one engine per model
class _IdleEngine:
    """The engine a model's last generate call left idle, with what it was built for. Kept as an
    attribute of the model (so it goes with the model); a deepcopy or pickle of the model leaves it
    behind."""

    def __init__(self):
        self.engine: Engine | None = None
        self.offload = None  # the model's expert_offload the engine attached

    def __deepcopy__(self, memo):
        return _IdleEngine()

    def __reduce__(self):
        return _IdleEngine, ()


_IDLE = "_moekit_idle_engine"
_LOCK = threading.Lock()  # taking and returning the idle engine (two threads must not share one)


def _lease(model: Transformer, tokenizer: Tokenizer | None, slots: int, any_tokenizer: bool = False) -> Engine:
    """An idle engine on ``model`` with at least ``slots`` slots, taken out of the model's cache (a call
    running meanwhile, e.g. a second live generator, builds its own): the cached one if it still fits,
    else a new one. ``any_tokenizer``: the caller gives ids and its own stops, so any tokenizer will do."""
    with _LOCK:
        idle = model.__dict__.get(_IDLE)
        engine, offload = (None, None) if idle is None else (idle.engine, idle.offload)
        if idle is not None:
            idle.engine = None
    current = engine is not None and engine.runner.is_current() and offload is getattr(model, "expert_offload", None)
    if current and engine.max_batch >= slots and (any_tokenizer or engine.tokenizer is tokenizer):
        engine.special = special_tokens_of(model, engine.tokenizer)  # as the model's are now
        return engine
    if current:  # grow: at least the slots the last engine had, so that calls do not flip between sizes
        slots = max(slots, engine.max_batch)
        if any_tokenizer:
            tokenizer = engine.tokenizer
    return Engine(model, tokenizer, max_batch=slots)


def _give_back(model: Transformer, engine: Engine, request_ids: Sequence[str], keep: bool) -> None:
    """Cancel and forget ``request_ids`` (a caller that stopped early leaves some running) and keep the
    engine for the next call. Not when ``keep`` is False: an exception inside a step (Ctrl-C) may have
    left it half-updated, so it is dropped (the next call builds another)."""
    if not keep:
        return
    for rid in request_ids:
        engine.cancel(rid)
    if engine.has_work():  # the cancelled requests' finish events; nothing is left to run
        engine.step()
    for rid in request_ids:
        engine.release(rid)
    if engine.has_work() or engine.requests:
        return
    with _LOCK:
        idle = model.__dict__.get(_IDLE)
        if idle is None:
            idle = _IdleEngine()
            object.__setattr__(model, _IDLE, idle)  # a plain attribute (not a submodule, parameter or buffer)
        if idle.engine is None or idle.engine.max_batch <= engine.max_batch:
            idle.engine, idle.offload = engine, getattr(model, "expert_offload", None)


def generate_tokens(model: Transformer, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                    temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                    eos_id: int | None = None, stop_at_eos: bool = True, *,
                    repetition_penalty: float = 1.0, task: str | None = None) -> Generator[torch.Tensor, None, None]:
    """Yield the next token of every row, LongTensor [B], as soon as every row has it (streaming).

    ``input_ids``: LongTensor [B, T] (or [T]) or a list of ids (B = 1); each row is its own request
    of one continuous batch. At most ``max_new_tokens`` steps are yielded. With ``eos_id`` and
    ``stop_at_eos``, a row that has produced ``eos_id`` keeps yielding ``eos_id`` and generation ends
    once every row has. ``seed`` makes sampling deterministic (row b uses ``seed + b``; None draws
    from torch's global RNG); ``temperature == 0`` is greedy. ``task``: every row's task (a name in
    ``model.cfg.tasks``), for a model with task-aware routing.

    A prompt too long for ``model.cfg.max_seq_len`` with ``max_new_tokens`` is cut from the left
    (see :func:`moekit.infer.engine.fit_prompt`), with a warning. Arguments are checked here, at the
    call, not at the first ``next()``.
    """
    ids_BT = _as_batch(input_ids)
    vocab = model.cfg.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, {vocab}) or None")
    was_training = model.training
    try:
        engine = _lease(model, None, max(1, ids_BT.shape[0]), any_tokenizer=True)
    finally:  # (a new engine sets eval mode) until the first next(): the caller may never start the generator
        model.train(was_training)
    stop_ids = (eos_id,) if eos_id is not None and stop_at_eos else ()
    requests = []
    try:
        for b, row in enumerate(ids_BT.tolist()):
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=None if seed is None else seed + b,
                                    stop_ids=stop_ids, task=task)
            requests.append(engine.add_request(row, params))
            notice = engine.request(requests[-1]).notice
            if notice:
                warnings.warn(notice, stacklevel=2)
    except EngineError:
        _give_back(model, engine, requests, keep=True)
        raise
    return _lockstep(engine, requests, max_new_tokens, eos_id, was_training)


def _lockstep(engine: Engine, requests: list[str], max_new_tokens: int, eos_id: int | None, was_training: bool):
    model = engine.model
    model.eval()
    keep = False  # whether the engine is whole at the end: finished, or stopped by the caller between steps
    try:
        yield from _rows_in_step(engine, requests, max_new_tokens, eos_id)
        keep = True
    except GeneratorExit:
        keep = True
        raise
    finally:
        _give_back(model, engine, requests, keep)
        model.train(was_training)


def _rows_in_step(engine: Engine, requests: list[str], max_new_tokens: int, eos_id: int | None):
    tokens: dict[str, list[int]] = {r: [] for r in requests}
    done: set[str] = set()
    for i in range(max_new_tokens):
        while any(len(tokens[r]) <= i and r not in done for r in requests):
            for ev in engine.step():
                if ev.token_id is not None:
                    tokens[ev.request_id].append(ev.token_id)
                if ev.finished:
                    done.add(ev.request_id)
        if all(len(tokens[r]) <= i for r in requests):
            return  # every row ended early (context full)
        # NOTE: rows that stopped keep yielding eos (or their last token) so the batch stays rectangular.
        yield torch.tensor([tokens[r][i] if len(tokens[r]) > i else (eos_id if eos_id is not None else tokens[r][-1])
                            for r in requests])
        if eos_id is not None and all(r in done and eos_id in tokens[r] for r in requests):
            return


def _as_batch(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Prompt ids as a LongTensor [B, T], checked to be non-empty integers."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (generate() starts from the "
                         "tokenizer's end-of-text token)")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | None = None, *, repetition_penalty: float = 1.0,
             stop: Sequence[str] = (), task: str | None = None) -> str:
    """The text continuing ``prompt`` (the prompt itself is not included); stops at the model's end
    tokens (read from the checkpoint), a ``stop`` string, or ``max_new_tokens``.

    ``stream`` is called with each new piece of text as it is produced, ready to print as is
    (``stream=lambda s: print(s, end="", flush=True)``); the pieces join to the returned string.
    Special tokens are not part of the text. An empty prompt starts from the end-of-text token.
    ``task``: the task (a name in ``model.cfg.tasks``) of a model with task-aware routing.
    """
    was_training = model.training
    engine, rids, keep = None, [], False
    try:
        engine = _lease(model, tokenizer, 1)
        model.eval()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop), task=task)
        try:
            rids.append(engine.add_request(prompt, params))
        except EngineError:
            keep = True  # refused before any step
            raise
        req = engine.request(rids[0])
        if req.notice:
            warnings.warn(req.notice, stacklevel=2)
        while not req.finished:
            for ev in engine.step():
                if stream is not None and ev.text:
                    stream(ev.text)
        keep = True
        return req.text
    finally:
        if engine is not None:
            _give_back(model, engine, rids, keep)
        model.train(was_training)


__all__ = ["EngineError", "generate", "generate_tokens"]
