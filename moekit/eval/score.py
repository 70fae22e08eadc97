"""Log-likelihood scoring through the inference engine: the one path every evaluation number takes.

``moekit eval`` and the lm-evaluation-harness adapter both call these functions, so a log-likelihood
from either is the same float, computed by the code that serves (:class:`moekit.infer.engine.Engine`
with ``prompt_logprobs``), with many requests in flight (continuous batching over ``max_batch`` slots).

- :func:`score_continuations`: ``log p(continuation | context)``, its token count, and whether every
  continuation token is the argmax (lm-eval's ``loglikelihood`` and ``is_greedy``).
- :func:`score_texts`: the log-likelihood of whole texts, scored in disjoint windows when longer than
  the context (lm-eval's ``loglikelihood_rolling``), with token and byte counts for perplexity and
  bits per byte.

Tokenisation follows lm-eval 0.4 (``HFLM._encode_pair`` and ``get_rolling_token_windows`` with
``context_len=1``): the context's trailing whitespace moves onto the continuation, the whole string is
encoded and split at the context's token length, an empty context becomes the model's start token
(BOS, else end-of-text), and a prompt too long for the context keeps its last tokens. The one moekit
choice: a model that expects BOS (``SpecialTokens.add_bos``) gets it in front of the context, as the
engine does for every prompt it serves.

Lengths: lm-eval feeds at most ``max_length`` tokens and scores the token after them; the engine reads
whole prompts of at most ``engine.max_len`` tokens, so :func:`max_length` is ``engine.max_len - 1``
and both truncate at the same place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from moekit.data.special import prepend_bos
from moekit.infer.engine import Engine, EngineError, SamplingParams

#: Read the prompt only, with the log-probabilities of its last tokens (``prompt_logprobs_last``, set per
#: request: the head and the softmax run on the scored rows only, not the context's), and with
#: ``top_logprobs=1`` their argmax, for ``greedy`` (a top-1 over the vocabulary at every scored position).
SCORING_PARAMS = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=True)
GREEDY_PARAMS = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=True, top_logprobs=1)

Progress = Callable[[int], object] | None  # called with how many more items finished (e.g. tqdm's update)


@dataclass(frozen=True)
class Scored:
    """One continuation: ``logprob`` = sum of log p(token | everything before it), in nats."""

    logprob: float
    tokens: int  # continuation tokens scored
    greedy: bool | None  # every continuation token was the model's argmax (lm-eval's is_greedy); None: not asked


@dataclass(frozen=True)
class TextScore:
    """One text, every token predicted once: ``-logprob / tokens`` is its loss in nats per token."""

    logprob: float
    tokens: int
    bytes: int  # UTF-8 bytes of the text (bits per byte = -logprob / ln 2 / bytes)


def trained_context(path) -> int | None:
    """The sequence length a moekit run (or one of its checkpoints) was trained at, from the run's
    ``config.json``; None when ``path`` is not a moekit run (a Hugging Face folder, a .gguf file).

    NOTE: a run may declare a longer ``max_seq_len`` than it ever trained on (micro-moe: 256, trained at
    128); positions beyond its training windows were never seen, so its scores there measure rotary
    extrapolation, not the model. Scoring stays within the trained context.
    """
    import json
    from pathlib import Path

    p = Path(path)
    for candidate in (p / "config.json", p.parent.parent / "config.json"):
        try:
            train = json.loads(candidate.read_text()).get("train")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(train, dict) and isinstance(train.get("seq_len"), int) and train["seq_len"] > 1:
            return train["seq_len"]
    return None


def scoring_engine(model, tokenizer, *, max_batch: int = 32, prefill_chunk: int = 4096,
                   context: int | None = None) -> Engine:
    """An engine sized for scoring: many short prompts per step (``prefill_chunk`` tokens in all);
    ``context`` (default: the model's ``max_seq_len``) caps the tokens a prompt may hold
    (:func:`trained_context` gives a run's own).

    NOTE: the engine's default ``prefill_chunk`` (512) suits serving, where a long prompt must not stall
    decoding; scoring has nothing to decode, so a larger budget lets one forward pass read many prompts.
    """
    max_len = min(context, model.cfg.max_seq_len) if context else None
    return Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, max_len=max_len)


def max_length(engine: Engine) -> int:
    """Tokens a prediction may condition on at most (lm-eval's ``max_length``): the context less one."""
    return engine.max_len - 1


def start_id(engine: Engine) -> int:
    """The token an empty context stands for (lm-eval's ``prefix_token_id``): BOS, else end-of-text."""
    special = engine.special
    start = special.bos_id if special.bos_id is not None else special.eos_id
    if start is None:
        raise EngineError("the model has no BOS or end-of-text token to stand for an empty context")
    return start


def _encode(engine: Engine, text: str) -> list[int]:
    if engine.tokenizer is None:
        raise EngineError("this engine has no tokenizer: give token ids instead of text")
    return engine.tokenizer.encode(text, add_special_tokens=False).ids


def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval 0.4 makes them (see the module docstring)."""
    if not continuation:
        raise EngineError("an empty continuation has no log-likelihood: give at least one character")
    if not context:
        return [start_id(engine)], _encode(engine, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Q: x\nA:" + " y": the space belongs with the word that follows it, as BPE splits it
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [start_id(engine)], _encode(engine, continuation)
    whole = prepend_bos(_encode(engine, context + continuation), engine.special)
    context_ids = prepend_bos(_encode(engine, context), engine.special)
    return context_ids, whole[len(context_ids):]


def score_continuations(engine: Engine, pairs: Sequence[tuple[str, str]] | Sequence[tuple[Sequence[int], Sequence[int]]],
                        progress: Progress = None, *, greedy: bool = True) -> list[Scored]:
    """``log p(continuation | context)`` of each (context, continuation) pair, as text or as token ids.

    ``greedy=False`` skips the argmax check (``Scored.greedy`` is then None): multiple choice needs only
    the log-likelihoods.
    Results are in the order of ``pairs``. A context too long for the model keeps its last tokens (as
    lm-eval does); a continuation longer than :func:`max_length` is an :class:`EngineError`.
    """
    encoded = []
    for context, continuation in pairs:
        if isinstance(context, str) and isinstance(continuation, str):
            ctx, cont = encode_pair(engine, context, continuation)
        else:
            ctx, cont = list(context), list(continuation)
            if not ctx:
                ctx = [start_id(engine)]
        encoded.append((ctx, cont))
    limit = max_length(engine)
    for i, (_, cont) in enumerate(encoded):
        if not cont:
            raise EngineError(f"pair {i}: the continuation has no tokens (it merged into the context's last token)")
        if len(cont) > limit:
            raise EngineError(f"pair {i}: the continuation has {len(cont)} tokens, more than the {limit} the model "
                              f"can condition on (context of {engine.max_len} tokens)")
    prompts = [(ctx + cont)[-engine.max_len:] for ctx, cont in encoded]
    scored = run_prompts(engine, prompts, [len(cont) for _, cont in encoded], progress, greedy=greedy)
    return [Scored(math.fsum(lp), len(lp), is_greedy) for lp, is_greedy in scored]


def rolling_windows(ids: list[int], start: int, window: int) -> list[tuple[list[int], int]]:
    """Disjoint windows that predict every token of ``ids`` once: (prompt ids, tokens scored at its end).

    lm-eval's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``: the first window
    predicts ``ids[:window]`` after ``start``; each later one predicts the next ``window`` tokens (fewer
    at the end) conditioned on the ``window`` tokens before them.
    """
    out = []
    first = ids[:window]
    if first:
        out.append(([start] + first, len(first)))
    done = len(first)
    while done < len(ids):
        n = min(window, len(ids) - done)
        end = done + n
        out.append((ids[max(end - window - 1, 0):end], n))
        done = end
    return out


def score_texts(engine: Engine, texts: Sequence[str], progress: Progress = None) -> list[TextScore]:
    """The log-likelihood of each text from its first token on (after the start token), every token once."""
    window = max_length(engine)
    start = start_id(engine)
    prompts, counts, owner = [], [], []
    for i, text in enumerate(texts):
        if not text:
            raise EngineError(f"text {i} is empty: nothing to score")
        ids = _encode(engine, text)
        for prompt, n in rolling_windows(ids, start, window):
            prompts.append(prompt)
            counts.append(n)
            owner.append(i)
    done_per_text = [0] * len(texts)
    windows_per_text = [owner.count(i) for i in range(len(texts))]

    def window_done(index: int) -> None:  # progress counts texts, not windows
        i = owner[index]
        done_per_text[i] += 1
        if progress is not None and done_per_text[i] == windows_per_text[i]:
            progress(1)

    scored = run_prompts(engine, prompts, counts, None, greedy=False, on_done=window_done)
    logprob = [[] for _ in texts]
    for i, (lp, _) in zip(owner, scored):
        logprob[i] += lp
    return [TextScore(math.fsum(lp), len(lp), len(t.encode("utf-8"))) for lp, t in zip(logprob, texts)]


def run_prompts(engine: Engine, prompts: Sequence[list[int]], scored: Sequence[int], progress: Progress = None, *,
                greedy: bool = True, on_done: Callable[[int], None] | None = None) -> list[tuple[list[float], bool | None]]:
    """For each prompt, the log-probabilities of its last ``scored[i]`` tokens and (``greedy``) whether each
    was the argmax, else None.

    Plan:
      1. order the prompts longest first (lm-eval's order: the long ones do not straggle at the end);
      2. keep every slot busy and as many again waiting, so a slot freed in one step is refilled at the
         start of the next (the engine admits waiting requests before it runs the step);
      3. step the engine; a finished request's event carries its prompt's log-probabilities.
    Requests of other callers sharing the engine are left alone (their events are ignored).
    """
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    room = engine.max_batch + min(engine.max_batch, engine.max_queue if engine.max_queue is not None else engine.max_batch)
    params = GREEDY_PARAMS if greedy else SCORING_PARAMS
    results: list[tuple[list[float], bool | None] | None] = [None] * len(prompts)
    live: dict[str, int] = {}
    nxt = 0
    while nxt < len(order) or live:
        while nxt < len(order) and len(live) < room:
            i = order[nxt]
            live[engine.add_request(prompts[i], replace(params, prompt_logprobs_last=scored[i]))] = i
            nxt += 1
        for ev in engine.step():
            i = live.pop(ev.request_id, None) if ev.finished else None
            if i is None:
                continue
            engine.release(ev.request_id)
            n = scored[i]
            logps = ev.prompt_logprobs[-n:]
            is_greedy = None
            if greedy:  # no token beat the target (a tie with the argmax counts, whichever id topk returned)
                is_greedy = all(lp >= top[0][1] for lp, top in zip(logps, ev.prompt_top_logprobs[-n:]))
            results[i] = (logps, is_greedy)
            if progress is not None:
                progress(1)
            if on_done is not None:
                on_done(i)
    return results
