"""An OpenAI-compatible HTTP API on the inference engine (FastAPI + uvicorn, server-sent events).

Endpoints: ``GET /health`` (503 once the engine thread is gone), ``GET /metrics`` (Prometheus text),
``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as
SSE ending in ``data: [DONE]``), and moekit's own ``POST /v1/moekit/route`` (the experts of each
token, :mod:`moekit.serve.serving_route`) and ``GET /v1/moekit/info``. Every error is OpenAI-shaped --
``{"error": {"message", "type", "param", "code"}}`` -- and declared in ``/openapi.json``: 4xx for what
the client can fix (429 with ``Retry-After`` when the server is full), 5xx for faults (the detail goes to
the server's log, not to the client). With an API key every endpoint but ``/health`` and the page
(``/``, ``/static/...``: :mod:`moekit.serve.page`) needs ``Authorization: Bearer KEY``; CORS
preflights are answered before the key is checked, so a page on an allowed origin can call the server.

This file wires things together; the wire format is :mod:`moekit.serve.protocol`, the requests are
served by :mod:`moekit.serve.serving_completion` and :mod:`moekit.serve.serving_chat`, and the engine
thread is :mod:`moekit.serve.engine_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import threading
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.infer import Engine
from moekit.serve.engine_client import EngineClient
from moekit.serve.metrics import Metrics
from moekit.serve.page import PUBLIC_PATHS, PUBLIC_PREFIXES, add_page
from moekit.serve.protocol import (
    UNSUPPORTED,
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    RouteRequest,
    error_responses,
    narrow_schema,
)
from moekit.serve.runs import runs_router
from moekit.serve.serving_chat import ChatServing
from moekit.serve.serving_completion import CompletionServing
from moekit.serve.serving_route import RouteServing

log = logging.getLogger("moekit.serve")

_STREAM = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               cors_origins: list[str] | None = None, retry_after_s: int = 1, page: bool = True) -> FastAPI:
    """The ASGI app. It starts the engine thread on startup and fails running requests on shutdown
    (call :func:`begin_shutdown` when the shutdown starts, so that they fail at once)."""
    metrics = Metrics(engine)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = EngineClient(engine, on_step=metrics.on_step)
        yield
        client, app.state.client = app.state.client, None
        await asyncio.get_running_loop().run_in_executor(None, client.shutdown)

    app = FastAPI(title="moekit", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.client = None
    completion = CompletionServing(engine, lambda: app.state.client, metrics, model_name)
    chat = ChatServing(engine, lambda: app.state.client, metrics, model_name)
    completion.retry_after_s = chat.retry_after_s = retry_after_s
    route = RouteServing(completion)
    app.state.serving = {"completions": completion, "chat": chat, "route": route}

    # Middleware, inner to outer: the guard (auth, body size, counting, 500s), then CORS outermost, so
    # that preflights never need the key and every answer, a 401 included, carries the CORS headers.
    app.add_middleware(_Guard, api_key=api_key, max_bytes=max_body_bytes, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    install_error_handlers(app)

    @app.get("/health", responses={**error_responses(503), 200: {"description": "the engine thread is running"}})
    async def health():
        client = app.state.client
        if client is None or not client.healthy:
            why = "the server is shutting down" if client is None else client.why_unavailable()
            raise APIError(503, why, "server_error", code="unavailable")
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", response_class=Response, responses={**error_responses(401), 200: {
        "content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", responses=error_responses(401))
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "moekit"}]}

    answers = {**error_responses(400, 401, 404, 413, 429, 500, 503),
               200: {"content": {"application/json": {}, **_STREAM}, "description": "the answer, or SSE with stream"}}

    @app.post("/v1/completions", responses=answers)
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/chat/completions", responses=answers)
    async def chat_completions(body: ChatRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/v1/moekit/route", responses=error_responses(400, 401, 404, 413, 429, 500, 503))
    async def moekit_route(body: RouteRequest, request: Request):
        """Per prompt token: its id, its text and each MoE layer's expert ids and gate weights; per layer
        the tokens each expert got."""
        return await route.create(body, request)

    @app.get("/v1/moekit/info", responses=error_responses(401))
    async def moekit_info():
        """What the page needs to know about the served model: its experts, MoE layers and tasks."""
        cfg = engine.model.cfg
        task_required = bool(cfg.num_experts) and cfg.task_routing == "task"
        return {"model": model_name, "max_len": engine.max_len, "num_experts": cfg.num_experts,
                "top_k": cfg.top_k if cfg.num_experts else 0, "moe_layers": route.moe_layers(),
                "tasks": list(cfg.tasks or []), "task_routing": cfg.task_routing if cfg.num_experts else "none",
                "task_required": task_required,
                "task_experts": cfg.task_expert_sets() if task_required and cfg.tasks else None}

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            max_choices = None if engine.max_queue is None else engine.max_batch + engine.max_queue
            cfg = engine.model.cfg
            app.openapi_schema = narrow_schema(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                               model_name, engine.max_len, max_choices,
                                               engine.vocab_size,
                                               engine.max_len - chat.max_tokens_limit, tasks=cfg.tasks,
                                               task_required=bool(cfg.num_experts) and cfg.task_routing == "task")
        return app.openapi_schema

    app.openapi = openapi
    if page:
        add_page(app, "index.html")
    return app


def create_dashboard_app(root: str | os.PathLike) -> FastAPI:
    """The dashboard of the run or ``moekit compare`` directory ``root``: its page and the read-only
    runs endpoints (:mod:`moekit.serve.runs`); no model, no key (it binds to loopback by default)."""
    app = FastAPI(title="moekit dashboard", version="1", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(runs_router(root))
    add_page(app, "dashboard.html")
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error OpenAI-shaped: APIError, a body that fails validation (400), an unknown path (404)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type_, headers=dict(e.headers or {})))


def begin_shutdown(app: FastAPI) -> None:
    """Fail the requests in flight now (503 / an error event) rather than after the graceful timeout.
    Safe from a signal handler: the command is queued by a new thread."""
    client = app.state.client
    if client is not None:
        threading.Thread(target=client.stop_soon, daemon=True).start()


def validation_error(e: RequestValidationError) -> APIError:
    errors = e.errors()
    for err in errors:  # a non-text content part fails every branch of the union: say that, not "not a str"
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        if "content" in loc and err.get("type") == "literal_error" and loc[-1] == "type":
            where = ".".join(x for x in loc[:loc.index("content") + 1] if x not in ("user", "system", "developer",
                                                                                     "assistant"))
            return APIError(400, f"{where}: {err.get('input')!r} parts are not supported: this model reads text only",
                            param=where, code="unsupported")
    err = errors[0] if errors else {}
    loc = [str(x) for x in err.get("loc", []) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('msg')}", code="invalid_json")
    # a union's failed branch names itself in the location (str, list[int]...): keep the field's path
    roles = ("system", "developer", "user", "assistant", "tool", "function")
    loc = [x for x in loc if not x.startswith(("str", "constrained-", "list[", "function-", "int", "float", "bool", "dict["))
           and x not in ("TextPart",) and not (x in roles and "messages" in loc)] or loc
    param = ".".join(loc) or None
    if err.get("type") == "union_tag_invalid" and "messages" in loc:
        return APIError(400, f"{'.'.join(loc)}: role {err.get('ctx', {}).get('tag')!r} is not supported (no tools "
                        "here); roles: system, developer, user, assistant", param=".".join(loc), code="unsupported")
    if loc and loc[0] in UNSUPPORTED:
        return APIError(400, UNSUPPORTED[loc[0]], param=loc[0], code="unsupported")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param, code="invalid_value")


class _Guard:
    """Auth, body size (a declared Content-Length at once; a chunked upload as it arrives), the
    request counter by path and status, and a generic 500 for anything unexpected (logged with its
    traceback here, never sent to the client)."""

    def __init__(self, app, api_key: str | None, max_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, total, started = 500, 0, False

        async def counted_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def limited_receive():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    # FastAPI re-raises an HTTPException from the body read (any other error becomes a 400)
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        try:
            refused = self._refuse(scope)
            if refused is not None:
                await _error_response(refused)(scope, receive, counted_send)
            else:
                await self.app(scope, limited_receive, counted_send)
        except Exception:  # noqa: BLE001 - the server never dies on a request, and never leaks its insides
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # a started response cannot change its status
                with contextlib.suppress(Exception):
                    await _error_response(APIError(500, "internal error; the details are in the server's log",
                                                   "server_error"))(scope, receive, counted_send)
        finally:
            self.metrics.count_request(scope["path"], status)

    def _refuse(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        public = path == "/health" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)  # the page holds no data
        if self.api_key is not None and not public:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return APIError(413, f"request body over {self.max_bytes} bytes", code="request_too_large")
        return None


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


__all__ = ["ErrorResponse", "begin_shutdown", "create_app", "create_dashboard_app", "validation_error"]
