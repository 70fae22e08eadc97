"""``POST /v1/chat/completions``: messages in, assistant messages out.

The prompt and its stop strings come from :func:`moekit.infer.chat.chat_prompt`, the function the
CLI's chat uses too (a model without a chat template stops at the next ``User:`` line). ``logprobs``
and ``top_logprobs`` follow OpenAI's chat shape (``choices[].logprobs.content``), in streamed chunks
as well. Tools, structured output and non-text inputs are refused with a 400 that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

from fastapi import Request

from moekit.infer.chat import ChatTemplateError, chat_prompt
from moekit.infer.engine import Event
from moekit.serve.protocol import APIError, ChatRequest
from moekit.serve.serving import Choice, OpenAIServing, Prompt


def check_unsupported(body: ChatRequest) -> None:
    """Refuse, with a clear 400, what a text model served here cannot do."""
    for i, m in enumerate(body.messages):
        if getattr(m, "tool_calls", None) or getattr(m, "function_call", None):
            raise APIError(400, f"messages[{i}]: tool calls are not supported by this server",
                           param=f"messages.{i}", code="unsupported")


class ChatServing(OpenAIServing):
    object_name = "chat.completion"
    id_prefix = "chatcmpl-"

    @functools.cached_property
    def max_tokens_limit(self) -> int:
        """The largest ``max_tokens`` any conversation can take: the context less the shortest prompt
        (the template around one empty message). Declared in ``/openapi.json`` and enforced."""
        shortest = 1
        if self.tokenizer is not None:
            with contextlib.suppress(Exception):  # a template that cannot render one message: no narrowing
                shortest = min(len(self.engine.encode(chat_prompt([{"role": r, "content": ""}], self.engine.special,
                                                                  self.tokenizer)[0]))
                               for r in ("system", "developer", "user", "assistant"))
        return self.engine.max_len - max(shortest, 1)

    async def create(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        check_unsupported(body)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:  # a template over a megabyte of messages takes a while: off the event loop
            text, stops = await asyncio.to_thread(chat_prompt, messages, self.engine.special, self.tokenizer)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = Prompt((await self.tokenize([text]))[0], text)
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name)
            if value is not None and value > self.max_tokens_limit:
                raise APIError(400, f"{name}={value} leaves no room for a conversation in this model's context of "
                               f"{self.engine.max_len} tokens: at most {self.max_tokens_limit}", param=name,
                               code="context_length_exceeded")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        room = self.fit([prompt], max_tokens, body.n or 1, "messages", max_param)
        k = body.top_logprobs or 0  # top_logprobs > 0 asks for logprobs even without logprobs: true
        params = self.sampling_params(body, room, body.seed, logprobs=bool(body.logprobs) or k > 0, top_logprobs=k,
                                      stop=stops)
        return await self.serve(request, body, [prompt], [params])

    # ------------------------------------------------------------------ formatting
    def _content(self, c: Choice, pieces: list[str], start: int) -> list[dict[str, Any]]:
        out = []
        for piece, lp, top in zip(pieces, c.logprobs[start:], c.top_logprobs[start:]):
            alts = [] if top is None else [
                {"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())} for i, v in top]
            out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts})
        return out

    def choice(self, c: Choice, echo: bool) -> dict[str, Any]:
        logprobs = {"content": self._content(c, self.pieces(c, 0), 0)} if c.pieces is not None else None
        return {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": logprobs, "finish_reason": c.finish_reason}

    def first_chunk(self, c: Choice, echo: bool) -> dict[str, Any] | None:
        return {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, c: Choice, ev: Event, n_before: int) -> dict[str, Any] | None:
        logprobs = None
        if c.pieces is not None and len(c.token_ids) > n_before:
            logprobs = {"content": self._content(c, self.pieces(c, n_before), n_before)}
        if not ev.text and not ev.finished and logprobs is None:
            return None
        return {"index": c.index, "delta": {"content": ev.text} if ev.text else {}, "logprobs": logprobs,
                "finish_reason": ev.finish_reason if ev.finished else None}
