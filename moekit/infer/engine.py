"""The inference engine: continuous batching over KV-cache slots.

Every caller drives this one engine: ``generate`` / ``chat`` (one request at a time), batched
generation of ragged prompts, the HTTP server (requests join and leave between steps), the evaluator
(log-probabilities of prompts and continuations) and the routing views (which experts each token
used). The contract:

- :meth:`Engine.add_request` (prompt text or ids, :class:`SamplingParams`) -> request id; checked at
  once, so a bad request fails before anything is printed; :meth:`Engine.cancel` drops one.
- :meth:`Engine.step` advances every live request by one token and prefills waiting prompts in chunks
  of at most ``prefill_chunk`` tokens, so a long prompt never stalls the others; it returns
  :class:`Event` s (request id, token id, text piece, log-probability, routing, finished + why); a
  routing request also gets an event (no token) for each prefill chunk but its last, with that chunk's routing.
- :attr:`Engine.stats` counts running batch size, queue, tokens in and out, and (expert offloading,
  :mod:`moekit.infer.offload`) the expert cache's hits, misses and bytes read.

Plan of one step:
  1. admit waiting requests into free slots (first come, first served);
  2. decode: one batched forward of every request that has a token to feed (T = 1 per row);
  3. prefill: chunks of admitted prompts, oldest first, until the step's token budget is spent; a
     request whose prompt is complete samples its first token from the chunk's last logits;
  4. sample every row in one batch-wide pass (:mod:`moekit.infer.sampling`) with each row's own settings
     and one uniform number from its own ``torch.Generator`` (so a request's output never depends on
     what else is in the batch), apply stop rules, free finished slots.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from moekit.data.special import prepend_bos, special_tokens_of
from moekit.infer.runner import Runner
from moekit.infer.sampling import apply_logit_bias, apply_penalties, check_sampling_args, sample
from moekit.infer.text import Detokenizer

if TYPE_CHECKING:
    from moekit.infer.offload import ExpertOffload, OffloadStats

TOP_LOGPROBS_MAX = 20  # as OpenAI's API
LOGIT_BIAS_MAX = 100.0


class EngineError(ValueError):
    """A request the engine cannot take; the message names the value and what would be valid."""


class EngineFull(EngineError):
    """Every cache slot and the waiting queue are taken; try again later."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. ``temperature == 0`` is greedy argmax (after bias and penalties).

    Applied in vLLM's order: ``logit_bias``, then the repetition, presence and frequency penalties, then
    temperature, top-k and top-p. Reported log-probabilities (``logprobs``, ``prompt_logprobs``,
    ``top_logprobs``) are always the model's own: log_softmax of the raw logits, before any of these.
    """

    max_new_tokens: int = 64  # tokens to generate at most (0: only read the prompt, e.g. for its logprobs)
    temperature: float = 0.8
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style, on the tokens of the prompt and the answer
    presence_penalty: float = 0.0  # in [-2, 2], 0 = off; OpenAI: logit -= p for each token already generated
    frequency_penalty: float = 0.0  # in [-2, 2], 0 = off; OpenAI: logit -= f * times the token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    seed: int | None = None  # None: drawn from torch's global RNG when the request is added
    stop_ids: tuple[int, ...] | None = None  # token ids that end the answer; None = the model's own end tokens
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in the text)
    logprobs: bool = False  # log-probability of each generated token under the model (raw logits: before bias,
    #                         penalties, temperature and filters)
    prompt_logprobs: bool = False  # log-probability of each prompt token given the ones before it
    prompt_logprobs_last: int = 0  # with prompt_logprobs: only the last n prompt tokens (the others None); 0 = all.
    #                                A scorer that needs a continuation's tokens skips the head on the context.
    top_logprobs: int = 0  # 0..20: with logprobs / prompt_logprobs, also the k most likely tokens at each position
    routing: bool = False  # record which experts each token went to, with gate weights
    task: str | None = None  # the task, one of the model's ModelConfig.tasks, for task-aware routing (issue 20);
    #                          required by a task-routed model (task_routing='task'); None: no task

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the engine then counts this request's tokens)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def check(self, vocab_size: int, max_len: int) -> None:
        try:
            check_sampling_args(self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                                self.presence_penalty, self.frequency_penalty)
        except ValueError as e:
            raise EngineError(str(e)) from None
        k = self.top_logprobs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= TOP_LOGPROBS_MAX:
            raise EngineError(f"top_logprobs={k!r} must be an integer in [0, {TOP_LOGPROBS_MAX}]")
        if k and not (self.logprobs or self.prompt_logprobs):
            raise EngineError(f"top_logprobs={k} needs logprobs=True or prompt_logprobs=True")
        last = self.prompt_logprobs_last
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise EngineError(f"prompt_logprobs_last={last!r} must be an integer >= 0 (0: every prompt token)")
        if last and not self.prompt_logprobs:
            raise EngineError(f"prompt_logprobs_last={last} needs prompt_logprobs=True")
        self._check_logit_bias(vocab_size)
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise EngineError(f"max_new_tokens={n!r} must be an integer >= 0")
        if n >= max_len:
            raise EngineError(f"max_new_tokens={n} leaves no room for the prompt in the context of {max_len} "
                              f"tokens: ask for at most {max_len - 1}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EngineError(f"seed={self.seed!r} must be an integer or None")
        for t in self.stop_ids or ():
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise EngineError(f"stop id {t!r} is not a token id in [0, {vocab_size})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise EngineError(f"stop string {s!r} must be a non-empty string")

    def _check_logit_bias(self, vocab_size: int) -> None:
        if not isinstance(self.logit_bias, (tuple, list)):
            raise EngineError(f"logit_bias={self.logit_bias!r} must be a tuple of (token id, bias) pairs")
        seen = set()
        for pair in self.logit_bias:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise EngineError(f"logit_bias entry {pair!r} must be a (token id, bias) pair")
            t, b = pair
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise EngineError(f"logit_bias token id {t!r} is not a token id in [0, {vocab_size})")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX:
                raise EngineError(f"logit_bias for token {t}: {b!r} must be a number in "
                                  f"[-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]")
            if t in seen:
                raise EngineError(f"logit_bias names token id {t} twice: give one bias per token")
            seen.add(t)


@dataclass
class Event:
    """What one step did for one request."""

    request_id: str
    token_id: int | None  # the new token (None on a finish without a token: cancel, max_new_tokens=0)
    text: str  # text to append to the answer so far ("" while a piece is held back)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end token or stop string), "length", "cancelled"
    logprob: float | None = None  # log-probability of token_id, with SamplingParams.logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # with logprobs and top_logprobs=k: k (token id, logprob),
    #                                                      most likely first
    prompt_logprobs: list[float | None] | None = None  # with prompt_logprobs, on the event that ends the prefill
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # with prompt_logprobs and top_logprobs,
    #                                                      aligned with prompt_logprobs (None for the first token)
    routing: list[list[tuple[list[int], list[float]]]] | None = None  # tokens fed this step -> per MoE layer (ids, gates)


@dataclass
class Request:
    """A live request. Read-only for callers (``Engine.request(id)``)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    detok: Detokenizer | None
    notice: str | None = None  # e.g. how the prompt was cut to fit the context
    task_id: int | None = None  # params.task's index in the model's tasks
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    routing: list[list[tuple[list[int], list[float]]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    next_token: int | None = None  # sampled, not yet fed to the model

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Tokens in this request's cache slot."""
        return self.prefilled + max(len(self.output_ids) - (self.next_token is not None), 0)


@dataclass
class EngineStats:
    running: int = 0  # requests holding a cache slot
    waiting: int = 0  # requests queued for a slot
    batch_size: int = 0  # rows decoded in the last step
    steps: int = 0
    prompt_tokens: int = 0  # prefilled, in all
    generated_tokens: int = 0  # sampled, in all
    finished: int = 0  # requests finished (any reason)
    offload: OffloadStats | None = None  # expert cache (hit rate, bytes read), when experts are offloaded


@dataclass
class Completion:
    """A finished request, as :meth:`Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    routing: list[list[tuple[list[int], list[float]]]] = field(default_factory=list)
    notice: str | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with top_logprobs, per logprob
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


class Engine:
    """Continuous batching for one model: at most ``max_batch`` sequences hold a KV-cache slot, the
    rest wait (up to ``max_queue``; None = unbounded) in arrival order.

    ``max_len`` (default: the model's ``max_seq_len``) is each slot's context: prompt + answer.
    A prompt too long for it, with its ``max_new_tokens``, is cut from the left, keeping at least half
    of the context for it (the answer then ends early with reason "length"); ``Request.notice`` says so.

    ``offload`` (default: ``model.expert_offload``, set by :func:`moekit.infer.offload.load_offloaded`)
    keeps only some experts resident; ``stats.offload`` then counts the expert cache.

    ``native``: decode on the native kernels (:mod:`moekit.native`); None (default) where they are built.
    """

    def __init__(self, model, tokenizer: Tokenizer | None = None, *, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, max_queue: int | None = None, offload: ExpertOffload | None = None,
                 native: bool | None = None):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineError(f"{name}={value!r} must be an integer >= 1")
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise EngineError(f"max_queue={max_queue!r} must be an integer >= 0, or None for no limit")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = max_len or model.cfg.max_seq_len
        self.runner = Runner(model, max_batch, self.max_len, native=native)
        self.device = model.norm.weight.device
        self.special = special_tokens_of(model, tokenizer)
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.vocab_size = model.cfg.vocab_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self.free_slots = list(range(max_batch))
        self.stats = EngineStats()
        offload = offload if offload is not None else getattr(model, "expert_offload", None)
        if offload is not None:
            self.stats.offload = offload.attach(self.runner)
        self._ids = itertools.count()
        # Token counts of penalized requests, by cache slot, kept up to date as tokens are sampled (one
        # scatter per step, never rebuilt from the history). Allocated at the first penalized request.
        self._counts_SV: torch.Tensor | None = None  # [max_batch, V] int32: times each token was generated
        self._prompt_SV: torch.Tensor | None = None  # [max_batch, V] bool: tokens of the prompt (repetition penalty)
        self._pending: list[Event] = []  # finish events of cancelled requests, returned by the next step

    # ------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with the BOS token first when the model expects one."""
        if self.tokenizer is None:
            raise EngineError("this engine has no tokenizer: give prompts as token ids")
        return prepend_bos(self.tokenizer.encode(text, add_special_tokens=False).ids, self.special)

    def task_id(self, task: str | None) -> int | None:
        """The id of ``task`` (its index in the model's ``ModelConfig.tasks``), None for no task. An
        :class:`EngineError` names the valid tasks for an unknown one, and for None on a model that
        routes each task to its own experts (``task_routing='task'``), which needs one."""
        cfg = self.model.cfg
        if task is None:
            if cfg.num_experts and cfg.task_routing == "task":
                raise EngineError(f"this model routes each task to its own experts (task_routing='task'): give a "
                                  f"task, one of {cfg.tasks}")
            return None
        if not isinstance(task, str):
            raise EngineError(f"task={task!r} must be a task name (a string)")
        if not cfg.tasks:
            raise EngineError(f"task {task!r}: this model has no tasks (it was trained without task labels); "
                              "leave the task out")
        if task not in cfg.tasks:
            close = difflib.get_close_matches(task, cfg.tasks, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EngineError(f"task {task!r} is not one of this model's tasks {cfg.tasks}{hint}")
        return cfg.tasks.index(task)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises :class:`EngineError` for a bad request and
        :class:`EngineFull` when every slot is busy and the queue is full."""
        params = params or SamplingParams()
        params.check(self.vocab_size, self.max_len)
        task_id = self.task_id(params.task)
        ids = self.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        if not ids:  # an unconditional sample starts where a document starts: BOS, else end-of-text
            start = self.special.bos_id if self.special.bos_id is not None else self.special.eos_id
            if start is None:
                raise EngineError("the prompt is empty and the model has no BOS or end-of-text token to start from")
            ids = [start]
        if params.stop and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer; give stop_ids instead")
        if self.max_queue is not None and len(self.running) + len(self.waiting) >= self.max_batch + self.max_queue:
            raise EngineFull(f"the engine is full: {self.max_batch} requests running and {self.max_queue} waiting")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in use")
        ids, notice = fit_prompt(ids, params.max_new_tokens, self.max_len)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        stop_ids = frozenset(self.special.eos_ids if params.stop_ids is None else params.stop_ids)
        detok = Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        req = Request(request_id, ids, params, stop_ids, torch.Generator(device=self.device).manual_seed(seed),
                      detok, notice, task_id)
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def _check_ids(self, prompt: Sequence[int]) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise EngineError(f"prompt ids must be a 1-D integer tensor, got {prompt.dtype} {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        ids = list(prompt)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise EngineError(f"prompt holds {t!r}, not a token id in [0, {self.vocab_size})")
        return ids

    def request(self, request_id: str) -> Request:
        return self.requests[request_id]

    def cancel(self, request_id: str) -> bool:
        """Stop a request now (its slot is free for the next step). False if unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "cancelled")
        self._pending.append(Event(req.id, None, "", True, "cancelled"))
        return True

    def release(self, request_id: str) -> None:
        """Forget a finished request (the engine keeps finished ones until released or collected)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[Event]:
        """Advance every live request (see the module plan); returns this step's events."""
        events, self._pending = self._pending, []
        while self.waiting and self.free_slots:  # 1. admit
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop(0)
            self.running.append(req)
            if req.params.penalized:
                self._reset_counts(req)
        with torch.inference_mode():
            events += self._forward()  # 2., 3. and 4.
        self.stats.steps += 1
        self.stats.running, self.stats.waiting = len(self.running), len(self.waiting)
        return events

    def _forward(self) -> list[Event]:
        """Steps 2-3 of the plan as one pass of the model: decoding rows first, then prefill chunks."""
        decoding = [r for r in self.running if r.next_token is not None]
        segments = [(r.slot, r.position, 1) for r in decoding]
        tokens = [r.next_token for r in decoding]
        chunks: list[tuple[Request, int]] = []
        budget = self.prefill_chunk
        for req in self.running:
            todo = len(req.prompt_ids) - req.prefilled
            if budget <= 0:
                break
            if todo <= 0:
                continue
            n = min(todo, budget)
            budget -= n
            chunks.append((req, n))
            segments.append((req.slot, req.prefilled, n))
            tokens += req.prompt_ids[req.prefilled:req.prefilled + n]
        self.stats.batch_size = len(decoding)
        if not segments:
            return []
        all_logits = [False] * len(decoding) + [req.params.prompt_logprobs for req, _ in chunks]
        skips = [0] * len(decoding) + [_rows_skipped(req, n) for req, n in chunks]
        wants_routing = any(r.params.routing for r in decoding) or any(r.params.routing for r, _ in chunks)
        routing = [] if wants_routing else None
        tasks = [r.task_id for r in decoding] + [req.task_id for req, _ in chunks]
        logits = self.runner.forward(torch.tensor(tokens, device=self.device), segments, all_logits, routing,
                                     skip=skips if any(skips) else None,
                                     tasks=tasks if any(t is not None for t in tasks) else None)
        fed = _split_routing(routing, [n for _, _, n in segments])
        for r in decoding:
            r.next_token = None
        # Rows to sample: every decoding request, and every request whose prompt is now complete.
        sample_rows, sample_idx = list(decoding), list(range(len(decoding)))
        sample_fed = list(fed[:len(decoding)]) if fed else None
        events: list[Event] = []
        row = len(decoding)
        for j, (req, n) in enumerate(chunks):
            skip = skips[len(decoding) + j]
            width = n - skip if req.params.prompt_logprobs else 1
            if req.params.prompt_logprobs:
                self._score_prompt(req, logits[row:row + width], n, skip)
            last = row + width - 1
            row += width
            req.prefilled += n
            self.stats.prompt_tokens += n
            chunk_fed = fed[len(decoding) + j] if fed else None
            if chunk_fed is not None:
                req.routing += chunk_fed
            if req.prefilled < len(req.prompt_ids):
                if chunk_fed is not None:  # a routing request hears of every chunk it fed, not only the last
                    events.append(Event(req.id, None, "", routing=chunk_fed))
                continue
            if req.params.max_new_tokens == 0:
                self._finish(req, "length")
                events.append(Event(req.id, None, "", True, "length",
                                    prompt_logprobs=req.prompt_logprobs if req.params.prompt_logprobs else None,
                                    prompt_top_logprobs=_prompt_top(req), routing=chunk_fed))
                continue
            sample_rows.append(req)
            sample_idx.append(last)
            if sample_fed is not None:
                sample_fed.append(chunk_fed)
        if sample_rows:
            idx = torch.tensor(sample_idx, device=self.device)
            events += self._sample(sample_rows, logits.index_select(0, idx), sample_fed, n_decoding=len(decoding))
        return events

    def _reset_counts(self, req: Request) -> None:
        """Start a penalized request's token counts in its slot: none generated, its prompt's tokens seen."""
        if self._counts_SV is None:
            self._counts_SV = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=self.device)
            self._prompt_SV = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        self._counts_SV[req.slot] = 0
        self._prompt_SV[req.slot] = False
        if req.params.repetition_penalty != 1:
            self._prompt_SV[req.slot, torch.tensor(req.prompt_ids, device=self.device)] = True

    def _score_prompt(self, req: Request, logits_TV: torch.Tensor, n: int, skip: int = 0) -> None:
        """Log-probability of each prompt token given the ones before it (the first has none), and with
        ``top_logprobs`` the most likely tokens at each position. ``logits_TV`` holds the chunk's rows from
        ``skip`` on (``prompt_logprobs_last``): the tokens the skipped rows predict get None."""
        start = req.prefilled
        if start == 0:
            req.prompt_logprobs.append(None)
            if req.params.top_logprobs:
                req.prompt_top_logprobs.append(None)
        skipped = len(req.prompt_ids[start + 1:start + skip + 1])
        req.prompt_logprobs += [None] * skipped
        if req.params.top_logprobs:
            req.prompt_top_logprobs += [None] * skipped
        start, n = start + skip, n - skip
        targets = req.prompt_ids[start + 1:start + n + 1]  # the next prompt token after each position
        if targets:
            logp = logits_TV[:len(targets)].float().log_softmax(-1)
            req.prompt_logprobs += logp.gather(1, torch.tensor(targets, device=self.device)[:, None])[:, 0].tolist()
            if req.params.top_logprobs:
                req.prompt_top_logprobs += _top(logp, [req.params.top_logprobs] * len(targets))

    def _sample(self, rows: list[Request], logits_BV: torch.Tensor, fed_routing, n_decoding: int) -> list[Event]:
        """Sample one token per row; the rows after the first ``n_decoding`` just finished their prompt
        (their events carry the prompt's log-probabilities, and their routing is already recorded)."""
        tokens_B = self._sample_tokens(rows, logits_BV)
        penalized = [b for b, r in enumerate(rows) if r.params.penalized]
        if penalized:  # count this step's tokens (a finished row's slot is reset before its next use)
            idx = torch.tensor(penalized, device=self.device)
            slots = torch.tensor([rows[b].slot for b in penalized], device=self.device)
            self._counts_SV.index_put_((slots, tokens_B.index_select(0, idx)),
                                       torch.ones(len(penalized), dtype=torch.int32, device=self.device), accumulate=True)
        tokens = tokens_B.tolist()  # NOTE: host sync, once per step
        want_logp = [b for b, r in enumerate(rows) if r.params.logprobs]
        logps, tops = {}, {}
        if want_logp:  # the model's own distribution: the raw logits, before bias, penalties and filters
            idx = torch.tensor(want_logp, device=self.device)
            lp = logits_BV.index_select(0, idx).float().log_softmax(-1)
            logps = dict(zip(want_logp, lp.gather(1, tokens_B.index_select(0, idx)[:, None])[:, 0].tolist()))
            ks = [rows[b].params.top_logprobs for b in want_logp]
            if any(ks):
                tops = {b: top for b, k, top in zip(want_logp, ks, _top(lp, ks)) if k}
        events = []
        for b, (r, t) in enumerate(zip(rows, tokens)):
            self.stats.generated_tokens += 1
            ev = Event(r.id, t, "", logprob=logps.get(b), top_logprobs=tops.get(b),
                       routing=fed_routing[b] if fed_routing else None)
            if b >= n_decoding and r.params.prompt_logprobs:
                ev.prompt_logprobs = r.prompt_logprobs
                ev.prompt_top_logprobs = _prompt_top(r)
            if r.params.logprobs:
                r.logprobs.append(logps[b])
                if b in tops:
                    r.top_logprobs.append(tops[b])
            if fed_routing is not None and b < n_decoding:
                r.routing += fed_routing[b]
            if t in r.stop_ids:
                ev.text = r.detok.flush() if r.detok else ""
                self._finish(r, "stop")
            else:
                r.output_ids.append(t)
                if r.detok is not None:
                    ev.text = r.detok.push(t)
                if r.detok is not None and r.detok.stopped:
                    self._finish(r, "stop")
                elif len(r.output_ids) >= r.params.max_new_tokens or r.prefilled + len(r.output_ids) >= self.max_len:
                    ev.text += r.detok.flush() if r.detok else ""
                    self._finish(r, "length")
                else:
                    r.next_token = t
            r.text += ev.text
            if r.finished:
                ev.finished, ev.finish_reason = True, r.finish_reason
            events.append(ev)
        return events

    def _sample_tokens(self, rows: list[Request], logits_BV: torch.Tensor) -> torch.Tensor:
        """This step's token of every row, LongTensor [B]: one batch-wide pass of :mod:`moekit.infer.sampling`."""
        params = [r.params for r in rows]
        modified = any(p.logit_bias or p.penalized for p in params)
        greedy = all(p.temperature == 0 for p in params)
        if greedy and not modified:  # the common fast path: one argmax for the batch
            return logits_BV.argmax(-1)
        dev = self.device
        logits_BV = logits_BV.float()  # NOTE: a copy for bf16 models; the ops below never write into it
        if any(p.logit_bias for p in params):
            pairs = [(b, t, x) for b, p in enumerate(params) for t, x in p.logit_bias]
            rows_N, ids_N, bias_N = zip(*pairs)
            logits_BV = apply_logit_bias(logits_BV, torch.tensor(rows_N, device=dev), torch.tensor(ids_N, device=dev),
                                         torch.tensor(bias_N, dtype=torch.float32, device=dev))
        if any(p.penalized for p in params):
            # Rows without penalties read their slot's stale counts, and off values (0, 0, 1) ignore them.
            slots = torch.tensor([r.slot for r in rows], device=dev)
            repetition = [p.repetition_penalty for p in params]
            logits_BV = apply_penalties(
                logits_BV, self._counts_SV.index_select(0, slots),
                torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev),
                torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev),
                torch.tensor(repetition, dtype=torch.float32, device=dev),
                self._prompt_SV.index_select(0, slots) if any(x != 1 for x in repetition) else None)
        if greedy:
            return logits_BV.argmax(-1)
        # One uniform number per sampled row, from the row's own generator (greedy rows draw nothing).
        zero = torch.zeros(1, device=dev)
        uniform_B = torch.cat([torch.rand(1, generator=r.generator, device=dev) if r.params.temperature > 0 else zero
                               for r in rows])
        top_k_B = torch.tensor([p.top_k for p in params], device=dev) if any(p.top_k for p in params) else None
        top_p_B = torch.tensor([float(p.top_p) for p in params], device=dev) if any(p.top_p != 1 for p in params) else None
        return sample(logits_BV, torch.tensor([float(p.temperature) for p in params], device=dev), uniform_B, top_k_B, top_p_B)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.next_token = None
        if req in self.running:
            self.running.remove(req)
            self.free_slots.append(req.slot)
            self.free_slots.sort()  # NOTE: low slots first keeps a small batch contiguous (a view, no gather)
        self.stats.finished += 1

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: Callable[[int], object] | None = None) -> list[Completion]:
        """Run ``prompts`` to completion as one continuous batch; results in prompt order.

        ``progress`` is called with 1 as each request finishes (e.g. a tqdm bar's ``update``).
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise EngineError(f"{len(params_list)} sampling settings for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        mine = set(ids)
        while any(not self.requests[i].finished for i in ids):
            for ev in self.step():
                if progress is not None and ev.finished and ev.request_id in mine:
                    progress(1)
        out = []
        for i in ids:
            r = self.requests.pop(i)
            out.append(Completion(r.text, r.output_ids, r.finish_reason, len(r.prompt_ids), r.logprobs,
                                  r.prompt_logprobs, r.routing, r.notice, r.top_logprobs, r.prompt_top_logprobs))
        return out


def fit_prompt(ids: list[int], max_new_tokens: int, max_len: int) -> tuple[list[int], str | None]:
    """Cut a prompt from the left so that it fits the context with room for the answer.

    The prompt keeps ``max_len - max_new_tokens`` tokens, but never less than half the context (or all
    of it if shorter): a request for a long answer shortens the answer, not the prompt to nothing.
    Returns the ids and a one-line notice when they were cut (None otherwise).
    """
    room = max_len - max_new_tokens
    if len(ids) <= room:
        return ids, None
    keep = min(max(room, math.ceil(max_len / 2)), len(ids), max_len - 1)
    if keep == len(ids):
        return ids, (f"the prompt ({len(ids)} tokens) and max_new_tokens={max_new_tokens} exceed the context of "
                     f"{max_len} tokens: the answer stops after {max_len - len(ids)} tokens")
    return ids[-keep:], (f"the prompt ({len(ids)} tokens) does not fit the context of {max_len} tokens with "
                         f"max_new_tokens={max_new_tokens}: keeping its last {keep} tokens"
                         + (f"; the answer stops after {max_len - keep} tokens" if max_len - keep < max_new_tokens else ""))


def _rows_skipped(req: Request, n: int) -> int:
    """Leading rows of a prefill chunk whose logits ``prompt_logprobs_last`` does not need (never the prompt's
    last row, which samples the first answer token). Position t predicts prompt token t + 1."""
    last = req.params.prompt_logprobs_last
    if not req.params.prompt_logprobs or not last:
        return 0
    first_needed = len(req.prompt_ids) - last - 1  # the position that predicts the first wanted token
    completes = req.prefilled + n == len(req.prompt_ids)
    return min(max(first_needed - req.prefilled, 0), n - 1 if completes else n)


def _top(logp_BV: torch.Tensor, ks: list[int]) -> list[list[tuple[int, float]]]:
    """The ``ks[b]`` most likely (token id, logprob) of each row of log-probabilities, most likely first."""
    values, ids = logp_BV.topk(min(max(ks), logp_BV.shape[-1]), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[b][:k], values[b][:k])) for b, k in enumerate(ks)]


def _prompt_top(req: Request) -> list[list[tuple[int, float]] | None] | None:
    return req.prompt_top_logprobs if req.params.prompt_logprobs and req.params.top_logprobs else None


def _split_routing(routing: list | None, lengths: list[int]):
    """Per MoE layer (ids [N, K], gates) -> per segment, per fed token, per layer (ids, gates)."""
    if routing is None:
        return None
    layers = [(ids.tolist(), gates.tolist()) for ids, gates in routing]
    out, start = [], 0
    for n in lengths:
        out.append([[(ids[t], gates[t]) for ids, gates in layers] for t in range(start, start + n)])
        start += n
    return out
