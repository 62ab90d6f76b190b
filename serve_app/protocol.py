"""Request and response shapes of every API, and the messages passed between ingress and model deployments.

HTTP bodies are pydantic models (validated at the ingress, which turns failures into OpenAI-style 4xx errors).
Between deployments plain dataclasses travel: `TextRequest` to a pool, `TextDelta`s back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.sampling import SamplingParams

History = list[tuple[str, str]]

Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy; higher = more random")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus sampling mass")]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ErrorInfo:
    """An error raised inside a pool, carried back to the ingress as data (exceptions lose their type in transit)."""

    status: int
    message: str
    type: str
    code: str

    def to_api_error(self) -> APIError:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return APIError(self.status, self.message, type=self.type, code=self.code, headers=headers)


@dataclass
class TextRequest:
    """What the ingress asks of a pool: a chat turn (query + history) or a raw completion prompt."""

    request_id: str
    params: SamplingParams
    query: str | None = None
    history: History = field(default_factory=list)
    system: str | None = None
    raw_prompt: str | None = None  # /v1/completions: no chat template, just the [gMASK] sop prefix
    stop: list[str] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
        }


@dataclass
class TextDelta:
    """One streamed piece of a reply. The last one has finish_reason (and usage), or error instead."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None


# --- the official api.py, and its /chatglm alias -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiPyRequest(_Strict):
    """POST / : the official api.py body."""

    prompt: str = Field(description="the new user message")
    history: History = Field(default_factory=list, description="previous rounds as [query, response] pairs")
    max_length: int | None = Field(default=None, ge=1, description="prompt + reply tokens (official meaning)")
    top_p: TopP | None = None
    temperature: Temperature | None = None
    model: str | None = Field(default=None, description="pool to use; default: the configured default model")

    _finite_params = field_validator("top_p", "temperature")(_finite)


class ApiPyResponse(BaseModel):
    response: str
    history: History
    status: int = 200
    time: str = Field(description="YYYY-MM-DD HH:MM:SS")


# --- the seeds' streaming API ------------------------------------------------------------------------------------


class StreamChatRequest(_Strict):
    """POST /chat and POST /stream."""

    query: str
    history: History = Field(default_factory=list)
    max_length: int | None = Field(default=None, ge=1)
    top_p: TopP | None = None
    temperature: Temperature | None = None
    model: str | None = None

    _finite_params = field_validator("top_p", "temperature")(_finite)


# --- OpenAI -------------------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id ... are accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAICommon(_Strict):
    model: str | None = Field(default=None, description="a pool name from GET /v1/models, or 'auto'")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="cap on generated tokens")
    stop: str | list[str] | None = Field(default=None, validate_default=True, description="up to 4 stop strings")
    seed: int | None = Field(default=None, description="fixes sampled output for the same request")
    n: Literal[1] = Field(default=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted for client compatibility; only their neutral values are supported.
    frequency_penalty: Literal[0, 0.0] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    ignore_eos: bool = Field(default=False, description="generate past eos (benchmarks; as in vLLM)")

    _finite_params = field_validator("top_p", "temperature")(_finite)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatCompletionRequest(_OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_OpenAICommon):
    prompt: str | list[str]
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request")
            return value[0]
        return value


def split_messages(messages: list[ChatMessage]) -> tuple[str | None, History, str]:
    """OpenAI messages -> (system text, [query, response] rounds, new query).

    ChatGLM2's prompt has no system slot: system (and developer) messages are joined and later prepended to the first
    query, as the official OpenAI-style server does. Consecutive messages of one role are joined with a blank line.
    The conversation must end with a user message.
    """
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer")) or None
    turns: list[tuple[str, str]] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        if turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, turns[-1][1] + "\n\n" + message.text())
        else:
            turns.append((message.role, message.text()))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "messages must end with a user message", param="messages")
    if turns[0][0] != "user":
        turns.insert(0, ("user", ""))  # an assistant greeting first: its query is empty
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1][1]
