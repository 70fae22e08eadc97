"""What completions and chat share: checking a request against the model, submitting its choices,
collecting or streaming their events, usage, log-probabilities and errors.

Plan of one request (``OpenAIServing.serve``):
  1. the subclass turns the body into prompts (token ids; tokenized off the event loop) and checks
     what it does not support;
  2. every choice must fit: the prompt in the context, the prompt plus ``max_tokens`` too (a 400
     otherwise, as OpenAI answers), and the request's choices within ``max_batch + max_queue`` (a 400:
     waiting would never help);
  3. submit every choice into one :class:`~moekit.serve.engine_client.Group`; a full engine is a 429
     with ``Retry-After``;
  4. watch the connection for the whole request: a client that goes away cancels its choices in the
     engine at once (streaming or not);
  5. answer: one JSON body, or server-sent events ending in ``data: [DONE]``. A fault (the engine
     failed, the server is shutting down) is an OpenAI-shaped 5xx before any byte was sent, or an
     ``error`` event in a stream, never a normal finish.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from moekit.data.special import prepend_bos
from moekit.infer import Engine, SamplingParams
from moekit.infer.engine import EngineError, EngineFull, Event
from moekit.infer.text import Detokenizer
from moekit.serve.engine_client import EngineClient, Failure, Group, Unavailable
from moekit.serve.metrics import Metrics
from moekit.serve.protocol import APIError, _Common


@dataclass
class Prompt:
    """One prompt of a request: its ids (BOS included when the model wants one) and its text."""

    ids: list[int]
    text: str


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt: Prompt
    request_id: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finish_reason: str | None = None
    pieces: Detokenizer | None = None  # token -> its piece of text, for logprobs (no stop strings)
    offset: int = 0  # characters of text streamed so far (completions' text_offset)

    def add(self, ev: Event) -> None:
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.top_logprobs.append(getattr(ev, "top_logprobs", None))
        if ev.text:
            self.text.append(ev.text)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
            self.prompt_top_logprobs = getattr(ev, "prompt_top_logprobs", None)
        if ev.finished:
            self.finish_reason = ev.finish_reason


class OpenAIServing(abc.ABC):
    """Shared by :class:`~moekit.serve.serving_completion.CompletionServing` and
    :class:`~moekit.serve.serving_chat.ChatServing`; the subclasses format the answer."""

    object_name = ""  # "text_completion" / "chat.completion"
    id_prefix = ""
    retry_after_s = 1  # the Retry-After of a 429 (create_app sets it)

    def __init__(self, engine: Engine, client: Callable[[], EngineClient | None], metrics: Metrics, model_name: str):
        self.engine, self._client, self.metrics, self.model_name = engine, client, metrics, model_name
        self.tokenizer = engine.tokenizer

    # ------------------------------------------------------------------ helpers for the subclasses
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Prompt texts -> ids with BOS, off the event loop (``encode_batch`` releases the GIL, so a
        megabyte of prompt does not stall the other streams)."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        special = self.engine.special
        encodings = await asyncio.to_thread(self.tokenizer.encode_batch, texts, add_special_tokens=False)
        return [prepend_bos(e.ids, special) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def token_text(self, token_id: int) -> str:
        """One token as shown among the alternatives of ``top_logprobs`` (special tokens by name)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None else ""

    def sampling_params(self, body: _Common, max_tokens: int, seed: int | None, *, logprobs: bool = False,
                        top_logprobs: int = 0, prompt_logprobs: bool = False, stop: tuple[str, ...] = ()
                        ) -> SamplingParams:
        try:
            self.engine.task_id(body.task)  # an unknown task (or none for a task-routed model): a 400 naming the valid ones
        except EngineError as e:
            raise APIError(400, str(e), param="task", code="invalid_value") from None
        bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
        for token, _ in bias:
            if token >= self.engine.vocab_size:
                raise APIError(400, f"logit_bias: token id {token} is not in [0, {self.engine.vocab_size})",
                               param="logit_bias", code="invalid_value")
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature, top_k=0,
            top_p=1.0 if body.top_p is None else body.top_p, seed=None if seed is None else seed % 2**63,
            stop=tuple(body.stop or ()) + stop,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=bias, logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            task=body.task)

    def fit(self, prompts: list[Prompt], max_tokens: int | None, n: int, param: str, max_param: str) -> int:
        """Checks steps 2 of the plan; returns the tokens each choice may generate."""
        engine = self.engine
        choices = len(prompts) * n
        if engine.max_queue is not None and choices > engine.max_batch + engine.max_queue:
            raise APIError(400, f"this request asks for {choices} choices (prompts x n); this server takes at most "
                           f"{engine.max_batch + engine.max_queue} at once ({engine.max_batch} running + "
                           f"{engine.max_queue} waiting): send fewer", param="n" if n > 1 else param,
                           code="too_many_choices")
        longest = max(max(len(p.ids), 1) for p in prompts)  # an empty prompt starts from one token (Engine)
        if longest >= engine.max_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_len} tokens. However, your "
                           f"{param} has {longest} tokens, leaving no room for an answer. Please shorten it.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return engine.max_len - longest
        if longest + max_tokens > engine.max_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_len} tokens. However, you "
                           f"requested {longest + max_tokens} tokens ({longest} in the {param}, {max_tokens} in the "
                           f"completion). Please reduce the length of the {param} or completion.",
                           param=max_param, code="context_length_exceeded")
        return max_tokens

    # ------------------------------------------------------------------ the request
    async def serve(self, request: Request, body: _Common, prompts: list[Prompt], params: list[SamplingParams],
                    echo: bool = False):
        """Steps 3-5 of the plan; ``params[i]`` serves every choice of ``prompts[i]``."""
        client = self._client()
        if client is None:
            raise APIError(503, "the server is shutting down", "server_error", code="unavailable")
        n = body.n or 1
        stream = bool(body.stream)
        choices = [Choice(i * n + j, p) for i, p in enumerate(prompts) for j in range(n)]
        group = client.group(stream)
        try:
            for k, c in enumerate(choices):
                p = params[k // n]
                if p.seed is not None:  # each choice its own stream of random numbers, reproducibly
                    p = dataclasses.replace(p, seed=(p.seed + k) % 2**63)
                c.request_id = (await client.submit(group, c.prompt.ids, p)).request_id
                if p.logprobs and self.tokenizer is not None:
                    c.pieces = Detokenizer(self.tokenizer)
        except (EngineError, Unavailable) as e:
            for c in choices:  # the choices already queued go too
                if c.request_id:
                    client.cancel(c.request_id)
            if isinstance(e, Unavailable):
                raise APIError(503, str(e), "server_error", code="unavailable") from None
            if isinstance(e, EngineFull):
                raise APIError(429, f"{e}; retry later", "rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(self.retry_after_s)}) from None
            raise APIError(400, str(e), code="invalid_value") from None
        by_id = {c.request_id: c for c in choices}
        rid, created = self.id_prefix + uuid.uuid4().hex[:24], int(time.time())
        if stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = self._stream(request, client, group, choices, by_id, rid, created, include_usage, echo)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with _watch_disconnect(request, lambda: [client.cancel(c.request_id) for c in choices]):
            pending = len(choices)
            while pending:
                for item in await group.items.get():
                    if isinstance(item, Failure):
                        self._cancel_all(client, choices)
                        raise APIError(item.status, item.message, item.type,
                                       code="unavailable" if item.status == 503 else None)
                    c = by_id[item.request_id]
                    if item.token_id is not None and not c.token_ids:
                        self.metrics.first_token(time.perf_counter() - group.submitted)
                    c.add(item)
                    if item.finished:
                        pending -= 1
                        if item.finish_reason == "cancelled":  # only we cancel: the client went away
                            self._cancel_all(client, choices)
                            raise APIError(499, "client closed the request", code="client_closed")
        return {"id": rid, "object": self.object_name, "created": created, "model": self.model_name,
                "choices": [self.choice(c, echo) for c in choices], "usage": self.usage(choices)}

    @staticmethod
    def _cancel_all(client: EngineClient, choices: list[Choice]) -> None:
        for c in choices:
            client.cancel(c.request_id)

    def usage(self, choices: list[Choice]) -> dict[str, int]:
        """Prompt tokens count once per prompt, not once per choice (as OpenAI counts ``n > 1``)."""
        prompt = sum(len(p.ids) for p in {id(c.prompt): c.prompt for c in choices}.values())
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _stream(self, request: Request, client: EngineClient, group: Group, choices: list[Choice],
                      by_id: dict[str, Choice], rid: str, created: int, include_usage: bool, echo: bool
                      ) -> AsyncIterator[str]:
        head = {"id": rid, "object": self.object_name + ("" if self.object_name == "text_completion" else ".chunk"),
                "created": created, "model": self.model_name}

        def event(choice: dict[str, Any]) -> str:
            return "data: " + json.dumps({**head, "choices": [choice]}, ensure_ascii=False) + "\n\n"

        finished = 0
        try:
            async with _watch_disconnect(request, lambda: self._cancel_all(client, choices)):
                for c in choices:
                    first = self.first_chunk(c, echo)
                    if first is not None:
                        yield event(first)
                while finished < len(choices):
                    for item in await group.items.get():
                        if isinstance(item, Failure):
                            self._cancel_all(client, choices)
                            err = APIError(item.status, item.message, item.type)
                            yield "data: " + json.dumps(err.body()) + "\n\n"
                            return  # no [DONE]: the answer did not complete
                        c = by_id[item.request_id]
                        if item.token_id is not None and not c.token_ids:
                            self.metrics.first_token(time.perf_counter() - group.submitted)
                        n_before = len(c.token_ids)
                        c.add(item)
                        if item.prompt_logprobs is not None and echo:
                            prompt_chunk = self.echo_chunk(c)
                            if prompt_chunk is not None:
                                yield event(prompt_chunk)
                        if item.finished and item.finish_reason == "cancelled":
                            return  # only we cancel: the client went away
                        chunk = self.delta(c, item, n_before)
                        if chunk is not None:
                            yield event(chunk)
                        if item.finished:
                            finished += 1
            if include_usage:  # OpenAI: a last chunk with no choices and the usage counts
                yield "data: " + json.dumps({**head, "choices": [], "usage": self.usage(choices)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a stream closed early (client gone mid-write, server stopping) frees its slots
            if finished < len(choices):
                self._cancel_all(client, choices)

    # ------------------------------------------------------------------ formatting (subclasses)
    @abc.abstractmethod
    def choice(self, c: Choice, echo: bool) -> dict[str, Any]:
        """One finished choice of the JSON answer."""

    def first_chunk(self, c: Choice, echo: bool) -> dict[str, Any] | None:
        return None

    def echo_chunk(self, c: Choice) -> dict[str, Any] | None:
        return None

    @abc.abstractmethod
    def delta(self, c: Choice, ev: Event, n_before: int) -> dict[str, Any] | None:
        """The streamed chunk for ``ev`` (None: nothing to send); ``n_before`` tokens came before it."""

    def text_pieces(self, ids: list[int]) -> list[str]:
        """The text each of ``ids`` adds (they join to the decoded text; special tokens are empty)."""
        if self.tokenizer is None:
            return ["" for _ in ids]
        d = Detokenizer(self.tokenizer)
        out = [d.push(t) for t in ids]
        if out:
            out[-1] += d.flush()
        return out

    def pieces(self, c: Choice, start: int) -> list[str]:
        """Text pieces of ``c``'s generated tokens from ``start`` on: they join to the decoded answer
        (special tokens are empty, a character split over tokens comes with its last token)."""
        if c.pieces is None:
            return ["" for _ in c.token_ids[start:]]
        out = [c.pieces.push(t) for t in c.token_ids[start:]]
        if c.finish_reason is not None and out:
            out[-1] += c.pieces.flush()
        return out


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, on_gone: Callable[[], Any]):
    """Runs ``on_gone`` as soon as the client hangs up (one listener task per request, as vLLM's
    ``listen_for_disconnect``): the request's slots are free at the engine's next step."""

    async def listen() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                on_gone()
                return

    task = asyncio.create_task(listen())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
