"""The OpenAI wire format: request models, the error shape and the error responses every endpoint
declares in ``/openapi.json`` (client generators read that document).

What a request may carry follows OpenAI's API reference. Fields moekit implements are typed here;
fields a client may send that change nothing for a text model served on one machine (``user``,
``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are accepted and ignored; features
moekit does not have (tools, structured output, images, audio) are refused with a 400 that says so,
and any other field is refused as OpenAI itself does ("unrecognized request argument"), so that a
typo never silently changes nothing. Every optional field also takes an explicit ``null``, which the
official clients send. One field is moekit's own: ``task``, for a model trained with task-aware routing
(``ModelConfig.tasks``; the official clients send it through ``extra_body``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints, field_validator

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


def below(n: int) -> str:
    """A regular expression for the decimal integers 0 .. n-1 (no leading zeros); n >= 1."""
    top = str(n - 1)
    k = len(top)
    alts = ["0"] if k == 1 else ["0", f"[1-9][0-9]{{0,{k - 2}}}"]
    for i, d in enumerate(top):
        low = 1 if i == 0 else 0
        if int(d) > low:
            alts.append(f"{top[:i]}[{low}-{int(d) - 1}][0-9]{{{k - i - 1}}}")
    alts.append(top)
    return "^(" + "|".join(dict.fromkeys(alts)) + ")$"


def narrow_schema(schema: dict[str, Any], model_name: str, max_len: int, max_choices: int | None,
                  vocab_size: int, min_chat_prompt: int = 1, tasks: list[str] | None = None,
                  task_required: bool = False) -> dict[str, Any]:
    """What this server accepts, in ``/openapi.json``: its one model name, ``max_tokens`` within its
    context (less the shortest prompt: one token, or a chat template around one empty message), at most
    as many prompts as it can hold, ``logit_bias`` keys that are token ids of its
    vocabulary, and a ``task`` among the model's ``tasks`` (none without tasks; required when
    ``task_required``) (client generators and schemathesis read it)."""
    for name in ("CompletionRequest", "ChatRequest", "RouteRequest"):
        request = schema.get("components", {}).get("schemas", {}).get(name, {})
        props = request.get("properties", {})
        if "model" in props:
            model = props["model"]
            if "anyOf" in model:  # optional (the route endpoint): the name or null
                model = {k: v for k, v in model.items() if k != "anyOf"}
                model["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
            else:
                model = {**model, "enum": [model_name]}
            props["model"] = model
        if "task" in props:
            branches = [{"type": "string", "enum": list(tasks)}] if tasks else []
            task = {k: v for k, v in props["task"].items() if k not in ("anyOf", "default")}
            if task_required:
                request["required"] = [*request.get("required", []), "task"]
            else:
                branches.append({"type": "null"})
                task["default"] = None
            props["task"] = {**task, "anyOf": branches}
        for branch in props.get("logit_bias", {}).get("anyOf", []):
            if branch.get("type") == "object":  # pydantic writes patternProperties, which let any other key through
                (value,) = branch.pop("patternProperties", {"": {"type": "number"}}).values()
                branch.update(propertyNames={"pattern": below(vocab_size)}, additionalProperties=value)
        for key in ("max_tokens", "max_completion_tokens"):
            for branch in props.get(key, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = max_len - (min_chat_prompt if name == "ChatRequest" else 1)
        for branch in props.get("prompt", {}).get("anyOf", []):
            if branch.get("type") == "array":
                if name == "RouteRequest":  # one prompt of token ids, within the context
                    branch["maxItems"] = max_len
                if max_choices is not None and branch.get("items", {}).get("type") != "integer":
                    branch["maxItems"] = max_choices
                items = branch.get("items", {})
                for ints in (items, items.get("items", {})):
                    if ints.get("type") == "integer":
                        ints["maximum"] = vocab_size - 1
    return schema


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses an endpoint can answer."""
    what = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
            413: "request body too large", 429: "the server is full; retry after Retry-After seconds",
            500: "internal error (details are in the server's log)", 503: "the server is shutting down or unhealthy"}
    out: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # JSON's true is not an integer (pydantic would take it as 1)
        raise ValueError("Input should be a number, not a boolean")
    return v


def Int(**limits: Any) -> Any:  # noqa: N802 - used as a type: an integer (not a boolean) within limits
    return Annotated[int, Field(**limits), BeforeValidator(_not_bool)]


def Float(**limits: Any) -> Any:  # noqa: N802 - a number (not a boolean) within limits
    return Annotated[float, Field(**limits), BeforeValidator(_not_bool)]
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]  # logit_bias keys: token ids as strings
Bias = Float(ge=-100.0, le=100.0)
TokenId = Int(ge=0)  # below the vocabulary size too (narrow_schema; checked when served)
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    # Unknown fields are refused (OpenAI: "Unrecognized request argument supplied"); see the module docstring.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


class _Common(_Strict):
    model: str
    max_tokens: Int(ge=0) | None = None
    temperature: Float(ge=0.0, le=2.0) | None = None
    top_p: Float(gt=0.0, le=1.0) | None = None
    n: Int(ge=1, le=MAX_N) | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: Int() | None = None  # any integer (OpenAI: int64); reduced modulo 2**63 for torch
    presence_penalty: Float(ge=-2.0, le=2.0) | None = None
    frequency_penalty: Float(ge=-2.0, le=2.0) | None = None
    logit_bias: dict[TokenKey, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    task: str | None = None  # moekit's own: the task of a model with task-aware routing (one of its tasks)
    # accepted, no effect on a single-machine text model
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else (v or [])


class CompletionRequest(_Common):
    prompt: str | Annotated[list[TokenId], Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] | \
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Int(ge=0) | None = 16
    logprobs: Int(ge=0, le=MAX_COMPLETION_LOGPROBS) | None = None
    echo: StrictBool | None = None
    best_of: Int(ge=1, le=1) | None = None  # best_of > 1 (rerank by logprob) is not supported
    suffix: Annotated[str, StringConstraints(max_length=0)] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]  # image, audio and file parts are refused: the models read text


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        return content if isinstance(content, str) else "".join(p.text for p in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None  # null: the official clients send it for a turn that only called tools
    refusal: str | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None  # no tools here
    function_call: None = None


# tool / function messages are refused (no tools here): the discriminator names the valid roles
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema (structured output) are not supported


#: Fields of features this server does not have; a request that uses them gets this 400.
UNSUPPORTED = {
    "tools": "tools and function calling are not supported by this server",
    "functions": "tools and function calling are not supported by this server",
    "tool_choice": "tool_choice is not supported by this server (only 'none')",
    "function_call": "function_call is not supported by this server (only 'none')",
    "response_format": "response_format: only {'type': 'text'} is supported (no structured output)",
    "modalities": "only text output is supported (modalities: ['text'])",
    "audio": "audio output is not supported",
    "suffix": "suffix (insertion) is not supported by this server",
}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=0) | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    # what a text model here cannot do: only the empty / default values are valid (UNSUPPORTED says why)
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    function_call: Literal["none"] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    audio: None = None


class RouteRequest(_Strict):
    """``POST /v1/moekit/route``: which experts each token of ``prompt`` goes to (moekit's own endpoint)."""

    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
    task: str | None = None  # as in completions: one of the model's tasks, for task-aware routing
    model: str | None = None  # optional; when given it must name the served model
