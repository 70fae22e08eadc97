"""The OpenAI wire format: request models, the error shape and the error responses every endpoint
declares in ``/openapi.json`` (client generators read that document).

What a request may carry follows OpenAI's API reference. Fields moekit implements are typed here;
fields a client may send that change nothing for a text model served on one machine (``user``,
``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are accepted and ignored; features
moekit does not have (tools, structured output, images, audio) are refused with a 400 that says so,
and any other field is refused as OpenAI itself does ("unrecognized request argument"), so that a
typo never silently changes nothing. Every optional field also takes an explicit ``null``, which the
official clients send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string is matched against the text after every token: bound the work
MAX_LOGIT_BIAS = 300  # token ids in one logit_bias (OpenAI documents up to 300)
MAX_TOP_LOGPROBS = 20  # chat (OpenAI: 0..20)
MAX_COMPLETION_LOGPROBS = 5  # completions (OpenAI: 0..5)


class APIError(Exception):
    """An OpenAI-shaped error answer: status, message, type, param, code (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses an endpoint can answer."""
    what = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
            413: "request body too large", 429: "the server is full; retry after Retry-After seconds",
            500: "internal error (details are in the server's log)", 503: "the server is shutting down or unhealthy"}
    out: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


class _Strict(BaseModel):
    # Unknown fields are refused (OpenAI: "Unrecognized request argument supplied"); see the module docstring.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # accepted, no effect on a single-machine text model
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids, got {len(v)}")
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"keys must be token ids (digits), got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"bias {b} for token {k} must be in [-100, 100]")
        return v


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """Parsed only to refuse it with a clear message (the models read text)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, refusal...: checked in the serving code
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart | ImagePart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content
                                                                          if isinstance(p, TextPart))


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # refused unless empty / default (see serving_chat.check_unsupported)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
