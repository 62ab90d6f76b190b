"""Request and response shapes of every API, as pydantic models.

Requests are validated at the ingress (failures become OpenAI-style 400s, serve_app/api/error_table.py); responses are
built from the response models, so the OpenAPI document describes what is sent. What travels between the ingress and
the pools is in serve_app/server/messages.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    WithJsonSchema,
)

from serve_app.api.error_table import APIError
from serve_app.engine.params import MAX_BIAS, MAX_REPETITION_PENALTY, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS
from serve_app.server.messages import LogprobEntry, Usage


def _unicode(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they are not text and no tokenizer can encode them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return value


def _integral(value):
    # JSON Schema counts 5.0 as an integer; pydantic's strict int would not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _pair(value):
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a [query, response] pair of strings")  # noqa: TRY004 (pydantic wants ValueError)
    if len(value) != 2:
        raise ValueError(f"must be a [query, response] pair, not {len(value)} items")
    return value


# Request fields are strict where JSON has a type for them: "5" is not a number and "true" not a boolean, as the
# OpenAPI document says, and NaN/Infinity (which Python's json reads) are "not a finite number". Text is any Unicode
# string without lone surrogates.
Text = Annotated[str, AfterValidator(_unicode)]
Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Bool = Annotated[bool, Strict()]
History = list[Annotated[tuple[Text, Text], BeforeValidator(_pair)]]
Temperature = Annotated[float, Strict(), Field(ge=0.0, le=2.0, allow_inf_nan=False,
                                               description="0 = greedy; higher = more random")]
TopP = Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")]
# vLLM's extension of OpenAI's requests: -1 (vLLM's "off") and 0 both keep every token. The upper bound only keeps
# absurd integers out; past the vocabulary it keeps every token too.
TopK = Annotated[int, Strict(), Field(ge=-1, le=1_000_000, description="keep the k most likely tokens; -1 or 0: all"),
                 BeforeValidator(_integral)]
RepetitionPenalty = Annotated[float, Strict(), Field(
    gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
    description="transformers' repetition_penalty over prompt and reply tokens: > 1 repeats less; 1: off")]
Penalty = Annotated[float, Strict(), Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MinP = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False,
                                        description="keep tokens at least min_p times as likely as the top one; 0: all")]
# Bounds go on the int itself, before the validator that accepts 5.0: after it, pydantic would apply them as a
# generic check (and write "ge" instead of "minimum" in the schema).
MaxLength = Annotated[int, Strict(), Field(ge=1, description="prompt + reply tokens (the official meaning)"),
                      BeforeValidator(_integral)]
MaxTokens = Annotated[int, Strict(), Field(ge=1, description="cap on generated tokens"), BeforeValidator(_integral)]


# Prompts must hold a non-space character (checked by the ingress, which says "prompt is empty"); the schema says so.
NOT_BLANK = {"pattern": r"\S"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_prompt(value):
    """A prompt, a list of one prompt, token ids, or a list of one list of token ids -> the one prompt."""
    if isinstance(value, list) and not (value and _is_number(value[0])):  # not token ids: a list of prompts
        if len(value) != 1:
            raise ValueError("exactly one prompt per request")
        return value[0]
    return value


def _prompt_kind(value) -> str:
    return "prompt-token-ids" if isinstance(value, list) else "prompt-text"


def _stop_list(value):
    return [] if value is None else [value] if isinstance(value, str) else value


TokenId = Annotated[int, Strict(), Field(ge=0), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
_TOKEN_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# OpenAI fields that take a string or a list: one type for validation (clear errors), the union in the schema.
# A prompt is text or token ids (the whole model input, [gMASK] sop included, as vLLM takes them); the discriminator
# validates only the branch the value's JSON type chose, so an error names the problem, not every branch's.
OnePrompt = Annotated[
    Annotated[Text, Tag("prompt-text")] | Annotated[TokenIds, Tag("prompt-token-ids")], Discriminator(_prompt_kind),
    BeforeValidator(_one_prompt), WithJsonSchema({"anyOf": [
        {"type": "string", **NOT_BLANK}, {"type": "array", "items": {"type": "string", **NOT_BLANK}, "minItems": 1,
                                           "maxItems": 1},
        _TOKEN_IDS_SCHEMA, {"type": "array", "items": _TOKEN_IDS_SCHEMA, "minItems": 1, "maxItems": 1}]})]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]  # the length check before the Unicode check
Stops = Annotated[list[Stop], Field(max_length=4), BeforeValidator(_stop_list),
                  WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}, {
                      "type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]})]
Seed = Annotated[Int, Field(description="fixes sampled output for the same request; any integer")]
# OpenAI's logit_bias: token ids (as JSON object keys, so strings) -> a bias in [-100, 100] added to their logits.
LogitBias = Annotated[
    dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
         Annotated[float, Strict(), Field(ge=-100.0, le=100.0, allow_inf_nan=False)]],
    Field(max_length=MAX_BIAS, description="token id -> bias in [-100, 100], added before sampling")]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS,
                                              description="token ids that end the reply (vLLM's extension)")]
MAX_CHOICES = 16  # n: choices per request
Choices = Annotated[int, Strict(), Field(ge=1, le=MAX_CHOICES, description="choices, sharing the prompt's prefill"),
                    BeforeValidator(_integral)]
TopLogprobs = Annotated[int, Strict(), Field(ge=0, le=MAX_TOP_LOGPROBS, description="most likely tokens shown per "
                                             "token (needs logprobs: true)"), BeforeValidator(_integral)]
LegacyLogprobs = Annotated[int, Strict(), Field(ge=0, le=5, description="the chosen tokens' logprobs and this many "
                                                "most likely tokens' per token"), BeforeValidator(_integral)]
MinTokens = Annotated[int, Strict(), Field(ge=0, le=10**6, description="no stop before this many tokens (vLLM's)"),
                      BeforeValidator(_integral)]


def _only(value, kind: type, json_type: str):
    """A field that accepts one value of one JSON type: `Literal[False]` alone would also take 0 and 0.0."""

    def check(given):
        if given != value:
            raise ValueError(f"only {json.dumps(value)} is supported")
        return given

    return Annotated[kind, Strict(), AfterValidator(check), WithJsonSchema({"type": json_type, "const": value})]


OnlyFalse = _only(False, bool, "boolean")
OnlyOne = Annotated[_only(1, int, "integer"), BeforeValidator(_integral)]


# --- the official api.py, and its /chatglm alias -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiPyRequest(_Strict):
    """POST / : the official api.py body."""

    prompt: Text = Field(description="the new user message", json_schema_extra=NOT_BLANK)
    history: History = Field(default_factory=list, description="previous rounds as [query, response] pairs")
    max_length: MaxLength | None = None
    top_p: TopP | None = None
    temperature: Temperature | None = None
    repetition_penalty: RepetitionPenalty | None = None
    model: Text | None = Field(default=None, description="pool or adapter to use; default: the configured default "
                               "model")


Pairs = list[Annotated[list[str], Field(min_length=2, max_length=2)]]  # History as it is sent back


class ApiPyResponse(BaseModel):
    response: str
    history: Pairs = Field(description="the request's history with this round appended")
    status: int = 200
    time: str = Field(description="YYYY-MM-DD HH:MM:SS")


# --- the explorer's streaming API ------------------------------------------------------------------------------------


class StreamChatRequest(_Strict):
    """POST /chat and POST /stream."""

    query: Text = Field(description="the new user message", json_schema_extra=NOT_BLANK)
    history: History = Field(default_factory=list, description="previous rounds as [query, response] pairs")
    max_length: MaxLength | None = None
    top_p: TopP | None = None
    temperature: Temperature | None = None
    repetition_penalty: RepetitionPenalty | None = None
    model: Text | None = Field(default=None, description="pool or adapter to use; default: the configured default "
                               "model")


class StreamChatResponse(BaseModel):
    """POST /chat: the whole answer. (POST /stream sends the same fields as SSE `delta` events.)"""

    query: str
    response: str
    history: Pairs = Field(description="the kept history with this round appended")
    success: bool


class StreamDeltaEvent(BaseModel):
    """POST /stream `delta` events: the new text and the answer so far; the last has delta "[EOS]", the query,
    the history and finished: true."""

    delta: str
    response: str
    finished: bool
    query: str | None = None
    history: Pairs | None = None


# --- errors and service routes (every API) -------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | overloaded_error | server_error")
    param: str | None = Field(description="the request field at fault, when there is one")
    code: str | None = Field(description="e.g. invalid_request, model_not_found, context_length_exceeded")


class ErrorResponse(BaseModel):
    """Every HTTP error body, OpenAI-style; also the data of an error event that ends an OpenAI stream."""

    error: ErrorDetail


class StreamErrorEvent(BaseModel):
    """POST /stream `error` event: the request failed after its first token."""

    error: ErrorDetail
    finished: Literal[True]


class Health(BaseModel):
    status: Literal["ok"]
    pools: list[str]
    default_model: str


# --- OpenAI -------------------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id ... are accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


SchemaName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: SchemaName
    description: Text | None = None
    schema_: dict | bool = Field(default_factory=dict, alias="schema", description="a JSON Schema")
    strict: Bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type",
                           description="json_object or json_schema: the reply is JSON (of that schema), enforced "
                           "token by token")]


class FunctionSpec(_Strict):
    name: SchemaName
    description: Text | None = None
    parameters: dict | None = Field(default=None, description="a JSON Schema of the arguments; none: no arguments")
    strict: Bool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: SchemaName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice, Field(
    description="required or a named function: the reply is a call of one of `tools`, its arguments their schema "
    "(enforced token by token); auto is refused, ChatGLM2 having no tool-call format of its own to decide with")]
MAX_TOOLS = 128


class StreamOptions(_Strict):
    include_usage: Bool = False


class _OpenAICommon(_Strict):
    model: Text | None = Field(default=None, description="a pool name from GET /v1/models, an adapter's name (or "
                               "<pool>:<adapter>), or 'auto'")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    logit_bias: LogitBias | None = None
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    min_tokens: MinTokens = 0
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = Field(default=None, description="OpenAI's: minus this times each token's "
                                              "count in the reply so far")
    presence_penalty: Penalty | None = Field(default=None, description="OpenAI's: minus this for each token already "
                                             "in the reply")
    max_tokens: MaxTokens | None = None
    stop: Stops = Field(default_factory=list, description="up to 4 non-empty stop strings (or one string)")
    seed: Seed | None = None
    n: Choices = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    ignore_eos: Bool = Field(default=False, description="generate past eos (benchmarks; as in vLLM)")


class ChatCompletionRequest(_OpenAICommon):
    # The conversation must end with a user message, which a JSON Schema cannot say: the example shows it (and gives
    # schema-driven clients and fuzzers one request the service accepts).
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好"}],
         "max_tokens": 16, "temperature": 0}]})

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation; it must end with a user message")
    max_completion_tokens: MaxTokens | None = None
    logprobs: Bool | None = Field(default=None, description="each reply token's logprob, from the model's raw "
                                  "distribution (before temperature, penalties and filters)")
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = Field(default=None, description="accepted; a reply is one call")


class CompletionRequest(_OpenAICommon):
    prompt: OnePrompt = Field(description="the text to continue, or its token ids (a list must hold exactly one)")
    echo: OnlyFalse = False
    logprobs: LegacyLogprobs | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(default=None, description="for an adapter: the pool whose base model it adapts")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV was reused from an earlier request")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens))


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes; null for special tokens")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without `stream` (with it: SSE `chat.completion.chunk`s, then `[DONE]`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the pool that answered")
    choices: list[ChatChoice]
    usage: UsageInfo


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, description="in the first chunk only")
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, description="a tool call, whole, in one chunk")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the usage chunk (stream_options) has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    """POST /v1/completions without `stream` (with it: SSE `text_completion` chunks, then `[DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str = Field(description="the pool that answered")
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion; the usage chunk (stream_options) has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageInfo | None = None


# --- tokens (vLLM's /tokenize and /detokenize) -----------------------------------------------------------------------


# The OpenAPI document lists the pools as the values of `model`; "" is none of them.
PoolName = Annotated[Text, Field(min_length=1)]


class TokenizeCompletionRequest(_Strict):
    """POST /tokenize with a prompt: its ids as /v1/completions counts them."""

    model: PoolName | None = Field(default=None, description="pool whose tokenizer to use; default: the default model")
    prompt: Text
    add_special_tokens: Bool = Field(default=True, description="start with the [gMASK] sop prefix")


class TokenizeChatRequest(_Strict):
    """POST /tokenize with messages: the prompt ids /v1/chat/completions would run (prefix included)."""

    model: PoolName | None = Field(default=None, description="pool whose tokenizer to use; default: the default model")
    messages: list[ChatMessage] = Field(min_length=1)


def _tokenize_kind(value) -> str:
    return "with-messages" if isinstance(value, dict) and "messages" in value else "with-prompt"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("with-prompt")] | Annotated[TokenizeChatRequest, Tag("with-messages")],
    Discriminator(_tokenize_kind)]


class TokenizeResponse(BaseModel):
    count: int = Field(description="number of tokens")
    max_model_len: int = Field(description="the pool's context: prompt plus completion tokens")
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: PoolName | None = Field(default=None, description="pool whose tokenizer to use; default: the default model")
    tokens: list[TokenId] = Field(description="token ids; special ids decode to nothing")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the text of the tokens")


def split_messages(messages: list[ChatMessage]) -> tuple[str | None, History, str]:
    """OpenAI messages -> (system text, [query, response] rounds, new query).

    ChatGLM2's prompt has no system slot: system (and developer) messages are joined and later prepended to the first
    query, as the official OpenAI-style server does. Consecutive messages of one role are joined with a blank line.
    The conversation must end with a user message.
    """
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer")) or None
    runs: list[tuple[str, list[str]]] = []  # (role, texts): joined once at the end, not once per message
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        if runs and runs[-1][0] == message.role:
            runs[-1][1].append(message.text())
        else:
            runs.append((message.role, [message.text()]))
    if not runs or runs[-1][0] != "user":
        raise APIError("invalid_request", "messages must end with a user message", param="messages")
    if runs[0][0] != "user":
        runs.insert(0, ("user", [""]))  # an assistant greeting first: its query is empty
    turns = ["\n\n".join(texts) for _, texts in runs]
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1]


def chat_logprobs(entries: list[LogprobEntry] | None) -> ChoiceLogprobs | None:
    """A choice's LogprobEntry list in the chat shape (None when logprobs were not asked for)."""
    if entries is None:
        return None
    return ChoiceLogprobs(content=[TokenLogprob(
        token=e.token.token, logprob=e.logprob, bytes=e.token.bytes,
        top_logprobs=[TopLogprob(token=t.token, logprob=v, bytes=t.bytes) for t, v in e.top]) for e in entries])


def completion_logprobs(entries: list[LogprobEntry] | None, offset: int = 0) -> CompletionLogprobs | None:
    """The legacy completions shape; `offset`: characters of the reply before these tokens (text_offset)."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token.token) if e.token.bytes is not None else 0
    return CompletionLogprobs(tokens=[e.token.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{t.token: v for t, v in e.top} for e in entries], text_offset=offsets)
