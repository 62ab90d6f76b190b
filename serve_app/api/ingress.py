"""The ingress deployment: every protocol in, one pool out, text streamed back through the deployment graph.

Routes: the official api.py (`POST /`, alias `POST /chatglm`), the explorer's streaming API (`POST /chat`, `POST /stream`
as Server-Sent Events), the OpenAI API (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`) and
`GET /health`, vLLM's `POST /tokenize` and `POST /detokenize` (answered by a pool: the ingress has no tokenizer);
WebSocket and the web page (api/websocket.py) and gRPC (api/grpc.py) are mixed in. Every handler
builds its pool request with `RequestBuilder` and reaches the pool through `PoolClient`. Every error is OpenAI-style
JSON with a 4xx/5xx status (api/error_table.py); errors that happen before the first token are reported as a status code
even on streaming routes, later ones as a final stream event. Responses are built from the models in api/schemas.py,
so the OpenAPI document is the response shape.
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations at import.
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar
from datetime import datetime

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from serve_app.api import proxy_guard, tools
from serve_app.api.error_table import APIError
from serve_app.api.grpc import GrpcMixin
from serve_app.api.http import EventStream, app, configure, errors, json_or_sse, sse, sse_only
from serve_app.api.pool_client import PoolClient
from serve_app.api.requests import RequestBuilder
from serve_app.api.schemas import (
    ApiPyRequest,
    ApiPyResponse,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    StreamChatRequest,
    StreamChatResponse,
    StreamDeltaEvent,
    StreamErrorEvent,
    ToolCallDelta,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)
from serve_app.api.security import SecuritySettings
from serve_app.api.websocket import WebSocketMixin
from serve_app.api.ingress_config import IngressConfig
from serve_app.server.messages import TextDelta, TextRequest

POOL_HEADER = "x-chatglm2-model"


def calls_tools(body: ChatCompletionRequest) -> bool:
    """Whether the reply is constrained to a tool call (the builder has checked tool_choice against tools)."""
    return bool(body.tools) and body.tool_choice != "none"

# OpenAPI `responses=` of the generating routes: their answer, and the errors any of them can give.
GENERATION_ERRORS = errors(400, 401, 404, 413, 503)
API_PY_RESPONSES = {200: {"model": ApiPyResponse}} | GENERATION_ERRORS
OPENAI_CHAT_RESPONSES = json_or_sse(ChatCompletion, ChatCompletionChunk, "the answer; chunks with `stream`") \
    | GENERATION_ERRORS
OPENAI_COMPLETION_RESPONSES = json_or_sse(Completion, CompletionChunk, "the answer; chunks with `stream`") \
    | GENERATION_ERRORS


def _json(model: BaseModel, pool: str) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), headers={POOL_HEADER: pool})


def _event(model: BaseModel, event: str | None = None) -> str:
    # exclude_unset: a field the handler did not set is left out (OpenAI's chunks have no `usage` until the last)
    return sse(model.model_dump_json(exclude_unset=True), event)


@dataclass
class _Chunks:
    """The chunk events of one OpenAI stream: `start(index)` (None when there is none), `piece(delta)` for a delta's
    text and logprobs, `finish(index, reason)`, `usage(usage)`. A subclass says which chunk model and `object`."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    offsets: dict[int, int] = field(default_factory=dict)  # choice -> characters sent (legacy text_offset)
    chunk_model: ClassVar[type[BaseModel]]
    object: ClassVar[str]

    def _chunk(self, **fields) -> BaseModel:
        return self.chunk_model(id=self.id, object=self.object, created=self.created, model=self.model, **fields)

    def usage(self, usage: UsageInfo) -> BaseModel:
        return self._chunk(choices=[], usage=usage)


class ChatChunks(_Chunks):
    """chat.completion.chunk events (an empty assistant delta first for each choice, as OpenAI sends)."""

    chunk_model, object = ChatCompletionChunk, "chat.completion.chunk"

    def _choice(self, index: int, delta: ChunkDelta, finish_reason: str | None, logprobs=None) -> BaseModel:
        return self._chunk(choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                                    logprobs=logprobs)])

    def start(self, index: int) -> BaseModel:
        return self._choice(index, ChunkDelta(role="assistant", content=""), None)

    def piece(self, delta: TextDelta) -> BaseModel:
        return self._choice(delta.index, ChunkDelta(content=delta.text), None, chat_logprobs(delta.logprobs))

    def finish(self, index: int, finish_reason: str | None) -> BaseModel:
        return self._choice(index, ChunkDelta(), finish_reason)

    def message(self, index: int, message: AssistantMessage) -> BaseModel:
        """A whole message's content or tool calls in one chunk."""
        calls = [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(message.tool_calls or [])]
        return self._choice(index, ChunkDelta(content=message.content, tool_calls=calls or None), None)


class CompletionChunks(_Chunks):
    """text_completion chunk events."""

    chunk_model, object = CompletionChunk, "text_completion"

    def start(self, index: int) -> None:
        return None

    def _choice(self, index: int, text: str, finish_reason: str | None, logprobs=None) -> BaseModel:
        return self._chunk(choices=[CompletionChunkChoice(index=index, text=text, finish_reason=finish_reason,
                                                          logprobs=logprobs)])

    def piece(self, delta: TextDelta) -> BaseModel:
        offset = self.offsets.get(delta.index, 0)
        self.offsets[delta.index] = offset + len(delta.text)
        return self._choice(delta.index, delta.text, None, completion_logprobs(delta.logprobs, offset))

    def finish(self, index: int, finish_reason: str | None) -> BaseModel:
        return self._choice(index, "", finish_reason)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ChatIngress(WebSocketMixin, GrpcMixin):
    def __init__(self, pools: dict, config: IngressConfig):
        self.config = config
        # Read here, in the replica: the keys come from this process's environment and are never logged.
        self.security = SecuritySettings.from_env(
            config.api_keys_env, config.limits.max_body_bytes, require_api_keys=config.require_api_keys,
            cors_origins=config.cors_origins, request_timeout_s=config.limits.request_timeout_s)
        self.client = PoolClient(pools, config, caller=serve.get_replica_context().replica_id.to_full_id_str())
        self.requests = RequestBuilder(config)
        proxy_guard.warn_if_unguarded()  # this node's proxy shares this replica's environment

    def __serve_build_asgi_app__(self):
        """Serve calls this once the replica is built: this replica's copy of the app gets its settings."""
        return configure(self.app, self.security, self.config.cors_origins, self.config.pool_names)

    # --- the official api.py ---------------------------------------------------------------------------------

    @app.post("/", responses=API_PY_RESPONSES)
    @app.post("/chatglm", responses=API_PY_RESPONSES)
    async def api_py(self, body: ApiPyRequest) -> JSONResponse:
        """The official api.py: one JSON answer with the updated history and a timestamp."""
        request = self.requests.api_py(body)
        answer = await self.client.collect(body.model, request)
        return _json(ApiPyResponse(response=answer.text, history=request.prompt.history_after(answer.text),
                                   time=datetime.now().strftime("%Y-%m-%d %H:%M:%S")), answer.pool)

    # --- the explorer's streaming API ----------------------------------------------------------------------------

    @app.post("/chat", responses={200: {"model": StreamChatResponse}} | GENERATION_ERRORS)
    async def chat(self, body: StreamChatRequest) -> JSONResponse:
        request = self.requests.chat_turn(body)
        answer = await self.client.collect(body.model, request)
        history = request.prompt.history_after(answer.text)
        return _json(StreamChatResponse(query=body.query, response=answer.text, history=history, success=True),
                     answer.pool)

    @app.post("/stream", response_class=EventStream,
              responses=sse_only("`delta` events with the growing answer; the last has finished: true",
                                 StreamDeltaEvent, StreamErrorEvent)
              | GENERATION_ERRORS)
    async def stream(self, body: StreamChatRequest) -> EventStream:
        """SSE events named `delta`; the last one has delta "[EOS]", the history and finished: true."""
        request = self.requests.chat_turn(body)
        stream = await self.client.open(body.model, request)

        async def events() -> AsyncIterator[str]:
            response = ""
            try:  # paced: each event re-sends the whole answer in `response`
                async for text, _ in stream.growing():
                    if len(text) > len(response):
                        piece, response = text[len(response):], text
                        yield _event(StreamDeltaEvent(delta=piece, response=response, finished=False), "delta")
            except APIError as exc:
                yield _event(StreamErrorEvent.model_validate(exc.body() | {"finished": True}), "error")
                return
            history = request.prompt.history_after(response)
            yield _event(StreamDeltaEvent(query=body.query, delta="[EOS]", response=response, history=history,
                                          finished=True), "delta")

        return EventStream(events(), headers={POOL_HEADER: stream.pool}, source=stream)

    # --- OpenAI ------------------------------------------------------------------------------------------------

    @app.get("/v1/models", responses={200: {"model": ModelList}} | errors(401))
    async def models(self) -> dict:
        created = int(time.time())
        cards = [ModelCard(id=name, object="model", created=created, owned_by="chatglm2-serve")
                 for name in self.config.pool_names]
        for adapter, pools in self.config.adapters.items():  # by its name (on its first pool) and per pool
            for name, parent in [(adapter, pools[0])] + [(f"{pool}:{adapter}", pool) for pool in pools]:
                cards.append(ModelCard(id=name, object="model", created=created, owned_by="chatglm2-serve",
                                       parent=parent))
        return ModelList(object="list", data=cards).model_dump(mode="json")

    @app.post("/v1/chat/completions", responses=OPENAI_CHAT_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest):
        request = self.requests.chat_completion(body)
        if not body.stream:
            answer = await self.client.collect(body.model, request)
            choices = [ChatChoice(index=i, message=self._message(body, c.text, c.finish_reason),
                                  finish_reason=c.finish_reason, logprobs=chat_logprobs(c.logprobs))
                       for i, c in enumerate(answer.choices)]
            for choice in choices:
                if choice.message.tool_calls:
                    choice.finish_reason = "tool_calls"
            return _json(ChatCompletion(id=request.request_id, object="chat.completion", created=int(time.time()),
                                        model=answer.model, choices=choices, usage=UsageInfo.of(answer.usage)),
                         answer.pool)
        return await self._openai_stream(body, request, ChatChunks, calls_tools(body))

    @staticmethod
    def _message(body: ChatCompletionRequest, text: str, finish_reason: str | None) -> AssistantMessage:
        """The assistant message of a reply: a tool call when the request asked for one and the reply finished."""
        if calls_tools(body) and finish_reason == "stop" and (call := tools.tool_call(text)) is not None:
            return AssistantMessage(role="assistant", content=None, tool_calls=[call])
        return AssistantMessage(role="assistant", content=text)

    @app.post("/v1/completions", responses=OPENAI_COMPLETION_RESPONSES)
    async def completions(self, body: CompletionRequest):
        request = self.requests.completion(body)
        if not body.stream:
            answer = await self.client.collect(body.model, request)
            choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                        logprobs=completion_logprobs(c.logprobs)) for i, c in enumerate(answer.choices)]
            return _json(Completion(id=request.request_id, object="text_completion", created=int(time.time()),
                                    model=answer.model, choices=choices, usage=UsageInfo.of(answer.usage)), answer.pool)
        return await self._openai_stream(body, request, CompletionChunks)

    async def _openai_stream(self, body, request: TextRequest, chunks: type[_Chunks], calling: bool = False):
        """Both OpenAI streams: the builder's first chunk (if any), a chunk per piece of text, a chunk with the
        finish_reason, the usage (with include_usage) and `[DONE]`; an error after the first token is an error event
        instead of the rest. A tool call (`calling`) is sent whole, in one chunk when its choice finishes."""
        stream = await self.client.open(body.model, request)
        build = chunks(request.request_id, stream.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            for index in range(request.n):
                if (start := build.start(index)) is not None:
                    yield _event(start)
            held: dict[int, str] = {}  # a tool-calling choice's reply so far
            try:
                async for delta in stream.deltas():
                    if calling:
                        held[delta.index] = held.get(delta.index, "") + delta.text
                        delta = dataclasses.replace(delta, text="")
                    if delta.text or delta.logprobs:
                        yield _event(build.piece(delta))
                    if delta.finish_reason:
                        reason = delta.finish_reason
                        if calling:
                            message = self._message(body, held.pop(delta.index, ""), reason)
                            yield _event(build.message(delta.index, message))
                            reason = "tool_calls" if message.tool_calls else reason
                        yield _event(build.finish(delta.index, reason))
            except APIError as exc:
                yield sse(ErrorResponse.model_validate(exc.body()).model_dump_json())
                return
            if include_usage and stream.usage:
                yield _event(build.usage(UsageInfo.of(stream.usage)))
            yield sse("[DONE]")

        return EventStream(events(), headers={POOL_HEADER: stream.pool}, source=stream)

    # --- tokens (vLLM's routes, for clients that count tokens) ----------------------------------------------------

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}} | GENERATION_ERRORS)
    async def tokenize(self, body: TokenizeRequest) -> dict:
        """The prompt ids of a completion (`prompt`) or chat completion (`messages`), as `usage` counts them."""
        special_tokens = getattr(body, "add_special_tokens", True)
        tokens = await self.client.tokenize(body.model, self.requests.tokenize(body), special_tokens)
        return TokenizeResponse(count=len(tokens.ids), max_model_len=tokens.max_seq_len,
                                tokens=tokens.ids).model_dump()

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}} | GENERATION_ERRORS)
    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.requests.check_token_ids(body.tokens, "tokens")
        tokens = await self.client.detokenize(body.model, body.tokens)
        return DetokenizeResponse(prompt=tokens.text).model_dump()

    @app.get("/health", responses={200: {"model": Health}})
    async def health(self) -> dict:
        return Health(status="ok", pools=self.config.pool_names, default_model=self.config.default_pool).model_dump()
