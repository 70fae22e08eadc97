"""An OpenAI-compatible HTTP API on the inference engine (FastAPI + uvicorn, server-sent events).

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as SSE ending in
``data: [DONE]``). Every error is OpenAI-shaped -- ``{"error": {"message", "type", "param", "code"}}``
-- with a 4xx status; a request the server cannot take because it is full gets 429 with
``Retry-After``. With an API key every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.infer import Engine, SamplingParams
from moekit.infer.chat import ChatTemplateError, render_chat
from moekit.infer.engine import EngineError, EngineFull
from moekit.serve.metrics import Metrics
from moekit.serve.worker import EngineWorker, Subscription

MAX_N = 8  # choices per request


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=0)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]  # a string, or content parts (text only: the models read text)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               cors_origins: list[str] | None = None, retry_after_s: int = 1) -> FastAPI:
    """The ASGI app. It starts the engine thread on startup and cancels running requests on shutdown."""
    app = FastAPI(title="moekit", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    state: dict[str, EngineWorker] = {}

    @app.on_event("startup")
    async def _start() -> None:
        state["worker"] = EngineWorker(engine, on_step=metrics.on_step)

    @app.on_event("shutdown")
    async def _stop() -> None:
        worker = state.pop("worker", None)
        if worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, worker.shutdown)

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Auth and body size, before any handler; the response's status is counted."""
        try:
            if api_key is not None and request.url.path != "/health":
                auth = request.headers.get("authorization", "")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                   "authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
                raise APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
            response = await call_next(request)
        except APIError as e:
            response = _error_response(e)
        metrics.count_request(request.url.path, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error_response(APIError(400, f"the body is not valid JSON: {err.get('msg')}", code="invalid_json"))
        param = ".".join(loc) or None
        return _error_response(APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param,
                                        code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type_))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # the server never dies on a request
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "moekit"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        jobs = [(i * body.n + j, p) for i, p in enumerate(prompts) for j in range(body.n)]
        return await _run(request, body, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(body.model, model_name)
        try:
            prompt = render_chat([{"role": m.role, "content": m.text()} for m in body.messages], engine.special,
                                 engine.tokenizer)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        return await _run(request, body, [(j, prompt) for j in range(body.n)], chat=True)

    async def _run(request: Request, body: _Common, jobs: list[tuple[int, str]], chat: bool):
        worker = state.get("worker")
        if worker is None:
            raise APIError(503, "the server is shutting down", "server_error")
        encoded = {p: engine.encode(p) for p in dict.fromkeys(p for _, p in jobs)}  # n choices share a prompt
        prompt_ids = [encoded[p] for _, p in jobs]
        for ids in prompt_ids:
            if len(ids) + 1 > engine.max_len:
                raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {engine.max_len} "
                               "tokens, prompt and answer together", param="prompt" if not chat else "messages",
                               code="context_length_exceeded")
        room = engine.max_len - max(len(ids) for ids in prompt_ids)
        max_tokens = min(body.max_tokens if body.max_tokens is not None else room, room)
        if body.max_tokens is not None and body.max_tokens >= engine.max_len:
            raise APIError(400, f"max_tokens={body.max_tokens} is over this model's context of {engine.max_len} tokens",
                           param="max_tokens", code="context_length_exceeded")
        logprobs = getattr(body, "logprobs", None)
        subs: list[Subscription] = []
        try:
            for k, ids in enumerate(prompt_ids):
                seed = None if body.seed is None else body.seed + k
                params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=0,
                                        top_p=body.top_p, seed=seed, stop=tuple(body.stop or ()),
                                        logprobs=logprobs is not None)
                subs.append(await worker.submit(ids, params))
        except EngineError as e:  # the choices already queued go too
            for s in subs:
                worker.cancel(s.request_id)
            if isinstance(e, EngineFull):
                raise APIError(429, f"{e}; retry later", "rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(retry_after_s)}) from None
            raise APIError(400, str(e)) from None
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        indices = [index for index, _ in jobs]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(request, worker, subs, indices, rid, created, chat, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(_collect(request, worker, s) for s in subs))
        return _response(results, subs, indices, rid, created, chat, logprobs)

    async def _next(request: Request, worker: EngineWorker, sub: Subscription):
        """The next event of ``sub``; cancels it (and returns None) if the client went away."""
        while True:
            try:
                return await asyncio.wait_for(sub.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    worker.cancel(sub.request_id)
                    return None

    async def _collect(request: Request, worker: EngineWorker, sub: Subscription):
        text, tokens, lps = [], [], []
        while True:
            ev = await _next(request, worker, sub)
            if ev is None:
                return None
            if ev.token_id is not None:
                if not tokens:
                    metrics.first_token(time.perf_counter() - sub.submitted)
                tokens.append(ev.token_id)
                lps.append(ev.logprob)
            text.append(ev.text)
            if ev.finished:
                return "".join(text), tokens, lps, _reason(ev.finish_reason)

    def _response(results, subs, indices, rid, created, chat, logprobs):
        if any(r is None for r in results):
            raise APIError(499, "client closed the request")
        choices, completion_tokens = [], 0
        for (text, tokens, lps, reason), index in zip(results, indices):
            completion_tokens += len(tokens)
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "finish_reason": reason,
                                "logprobs": _logprobs(tokens, lps) if logprobs is not None else None})
        prompt_tokens = sum(s.prompt_tokens for s in subs)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": sorted(choices, key=lambda c: c["index"]),
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _logprobs(tokens: list[int], lps: list[float | None]) -> dict[str, Any]:
        pieces = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
        offsets, pos = [], 0
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}

    async def _stream(request, worker, subs, indices, rid, created, chat, include_usage):
        obj = "chat.completion.chunk" if chat else "text_completion"
        index_of = {s.request_id: index for s, index in zip(subs, indices)}

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                          "choices": [choice]}) + "\n\n"

        if chat:
            for index in indices:
                yield chunk(index, None, None, role=True)
        pending = {asyncio.ensure_future(_next(request, worker, s)): s for s in subs}
        seen_first: set[str] = set()
        generated = 0
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    sub = pending.pop(task)
                    ev = task.result()
                    if ev is None:  # client gone: cancel the rest too
                        for s in subs:
                            worker.cancel(s.request_id)
                        return
                    index = index_of[sub.request_id]
                    if ev.token_id is not None:
                        generated += 1
                        if sub.request_id not in seen_first:
                            seen_first.add(sub.request_id)
                            metrics.first_token(time.perf_counter() - sub.submitted)
                    if ev.text:
                        yield chunk(index, ev.text, None)
                    if ev.finished:
                        yield chunk(index, None if chat else "", _reason(ev.finish_reason))
                    else:
                        pending[asyncio.ensure_future(_next(request, worker, sub))] = sub
            if include_usage:  # OpenAI: a last chunk with no choices and the usage counts
                prompt_tokens = sum(s.prompt_tokens for s in subs)
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                              "choices": [], "usage": {
                                                  "prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                  "total_tokens": prompt_tokens + generated}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in pending:
                task.cancel()
            for s in subs:  # a stream closed early (client gone mid-yield) frees its slots
                worker.cancel(s.request_id)

    return app


class _BodyLimit:
    """Counts the body as it arrives, so that a chunked upload (no Content-Length, which the guard
    checks up front) is cut off too: over ``max_bytes`` the handler's body read fails with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        total = 0

        async def limited():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    # FastAPI re-raises an HTTPException from the body read (any other error becomes a 400)
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", "not_found_error",
                       param="model", code="model_not_found")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)
