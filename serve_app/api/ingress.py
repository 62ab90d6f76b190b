"""The ingress deployment: every protocol in, one pool out, text streamed back through the deployment graph.

Routes: the official api.py (`POST /`, alias `POST /chatglm`), the seeds' streaming API (`POST /chat`, `POST /stream`
as Server-Sent Events), the OpenAI API (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`) and
`GET /health`. Every error is OpenAI-style JSON with a 4xx/5xx status; errors that happen before the first token are
reported as a status code even on streaming routes, later ones as a final stream event.
"""


import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.api import security
from serve_app.api.grpc import GrpcMixin
from serve_app.api.http import EventStream, app, errors, json_or_sse, sse, sse_only, use_openapi_for
from serve_app.api.routing import Router
from serve_app.api.schemas import (
    APIError,
    ApiPyRequest,
    ApiPyResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorInfo,
    Health,
    ModelList,
    StreamChatRequest,
    StreamChatResponse,
    StreamDeltaEvent,
    StreamErrorEvent,
    TextDelta,
    TextRequest,
    Usage,
    split_messages,
)
from serve_app.api.websocket import WebSocketMixin
from serve_app.engine.params import SamplingParams

logger = logging.getLogger("ray.serve")
POOL_HEADER = "x-chatglm2-model"
# OpenAPI `responses=` of the generating routes: their answer, and the errors any of them can give.
GENERATION_ERRORS = errors(400, 401, 404, 413, 503)
API_PY_RESPONSES = {200: {"model": ApiPyResponse}} | GENERATION_ERRORS
OPENAI_CHAT_RESPONSES = json_or_sse(ChatCompletion, ChatCompletionChunk, "the answer; chunks with `stream`") \
    | GENERATION_ERRORS
OPENAI_COMPLETION_RESPONSES = json_or_sse(Completion, CompletionChunk, "the answer; chunks with `stream`") \
    | GENERATION_ERRORS
REPLICA_FAILED = ErrorInfo(503, "the replica serving this request failed; retry", "server_error", "replica_failed")


class GenerationDefaults(BaseModel):
    """Used when a request leaves a parameter out (the official api.py's defaults)."""

    temperature: float = Field(default=0.95, ge=0.0, le=2.0)
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    max_length: int = Field(default=2048, ge=1, description="prompt + reply tokens when a request gives no limit")


class IngressConfig(BaseModel):
    """Protocol-level settings of the ingress, built by `build_app`."""

    pools: list[str] = Field(description="pool names, highest precision first")
    default_model: str
    routing: str = Field(default="default", description="'default' or 'auto' for requests that name no model")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    max_history_rounds: int = Field(default=10, ge=0, description="/chat and /stream keep only the last N rounds")
    max_prompt_chars: int = Field(default=32768, ge=1, description="longest accepted user message")
    api_keys_env: str | None = Field(default=None, description="env var with comma-separated API keys (unset: open)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; '*' for any")
    max_body_bytes: int = Field(default=1_048_576, ge=1, description="larger request bodies get 413")


async def _chain(first: TextDelta, rest: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    yield first
    async for delta in rest:
        yield delta


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ChatIngress(WebSocketMixin, GrpcMixin):
    def __init__(self, pools: dict, config: IngressConfig):
        self.config = config
        # Read here, in the replica: the keys come from this process's environment and are never logged.
        security.configure(config.api_keys_env, config.cors_origins, config.max_body_bytes)
        self.streams = {name: handle.options(stream=True) for name, handle in pools.items()}
        self.router = Router(pools, config.pools, config.default_model, config.routing)
        use_openapi_for(config.pools)

    # --- the shared path: params, routing, streaming through the graph ------------------------------------------

    def _params(self, *, temperature=None, top_p=None, max_length=None, max_new_tokens=None, seed=None,
                ignore_eos=False) -> SamplingParams:
        d = self.config.defaults
        if max_length is None and max_new_tokens is None:
            max_length = d.max_length
        return SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            seed=seed,
            ignore_eos=ignore_eos,
        )

    def _check_prompt(self, text: str, param: str) -> None:
        if not text.strip():
            raise APIError(400, f"{param} is empty", param=param)
        if len(text) > self.config.max_prompt_chars:
            raise APIError(400, f"{param} is longer than {self.config.max_prompt_chars} characters", param=param,
                           code="context_length_exceeded")

    async def _open(self, model: str | None, request: TextRequest) -> tuple[str, TextDelta, AsyncIterator[TextDelta]]:
        """Route and start a generation; returns (pool, first delta, the rest). Errors before any text raise."""
        pool = self.router.resolve(model)
        try:
            stream = self.streams[pool].generate.remote(request)
            self.router.started(pool)
            try:
                first = await stream.__anext__()
            except BaseException:
                self.router.finished(pool)
                raise
        except BackPressureError as exc:
            raise APIError(503, f"pool {pool} is overloaded; retry shortly", type="overloaded_error",
                           code="overloaded", headers={"Retry-After": "1"}) from exc
        except RayActorError as exc:  # the replica died (or became unreachable) before the first token
            logger.warning("pool %s: replica failed before the first token: %s", pool, exc)
            raise REPLICA_FAILED.to_api_error() from exc
        if first.error:
            self.router.finished(pool)
            raise first.error.to_api_error()

        async def rest() -> AsyncIterator[TextDelta]:
            try:
                if first.finish_reason:
                    return
                async for delta in stream:
                    yield delta
            except RayActorError as exc:  # the replica died mid-stream: end with an error event, not a cut stream
                logger.warning("pool %s: replica failed mid-stream: %s", pool, exc)
                yield TextDelta(error=REPLICA_FAILED)
            except Exception:
                logger.exception("pool %s: stream failed", pool)
                yield TextDelta(error=ErrorInfo(500, "internal error while streaming", "server_error",
                                                "internal_error"))
            finally:
                self.router.finished(pool)
                stream.cancel()  # a client that went away stops the engine, not just the proxy

        return pool, first, rest()

    async def _collect(self, model: str | None, request: TextRequest) -> tuple[str, str, TextDelta]:
        pool, first, rest = await self._open(model, request)
        parts, last = [first.text], first
        async for delta in rest:
            if delta.error:
                raise delta.error.to_api_error()
            parts.append(delta.text)
            last = delta
        return pool, "".join(parts), last

    # --- the official api.py ---------------------------------------------------------------------------------

    @app.post("/", responses=API_PY_RESPONSES)
    @app.post("/chatglm", responses=API_PY_RESPONSES)
    async def api_py(self, body: ApiPyRequest) -> JSONResponse:
        """The official api.py: one JSON answer with the updated history and a timestamp."""
        self._check_prompt(body.prompt, "prompt")
        request = TextRequest(
            request_id=uuid.uuid4().hex,
            params=self._params(temperature=body.temperature, top_p=body.top_p, max_length=body.max_length),
            query=body.prompt,
            history=list(body.history),
        )
        pool, text, _ = await self._collect(body.model, request)
        answer = {
            "response": text,
            "history": [list(pair) for pair in body.history] + [[body.prompt, text]],
            "status": 200,
            "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        }
        return JSONResponse(answer, headers={POOL_HEADER: pool})

    # --- the seeds' streaming API ----------------------------------------------------------------------------

    def _stream_chat_request(self, body: StreamChatRequest) -> TextRequest:
        self._check_prompt(body.query, "query")
        keep = self.config.max_history_rounds
        history = list(body.history)[-keep:] if keep else []
        return TextRequest(
            request_id=uuid.uuid4().hex,
            params=self._params(temperature=body.temperature, top_p=body.top_p, max_length=body.max_length),
            query=body.query,
            history=history,
        )

    @app.post("/chat", responses={200: {"model": StreamChatResponse}} | GENERATION_ERRORS)
    async def chat(self, body: StreamChatRequest) -> JSONResponse:
        request = self._stream_chat_request(body)
        pool, text, _ = await self._collect(body.model, request)
        history = [list(pair) for pair in request.history] + [[body.query, text]]
        answer = {"query": body.query, "response": text, "history": history, "success": True}
        return JSONResponse(answer, headers={POOL_HEADER: pool})

    @app.post("/stream", response_class=EventStream,
              responses=sse_only("`delta` events with the growing answer; the last has finished: true",
                                 StreamDeltaEvent, StreamErrorEvent)
              | GENERATION_ERRORS)
    async def stream(self, body: StreamChatRequest) -> EventStream:
        """SSE events named `delta`; the last one has delta "[EOS]", the history and finished: true."""
        request = self._stream_chat_request(body)
        pool, first, rest = await self._open(body.model, request)

        async def events() -> AsyncIterator[str]:
            response = ""
            async for delta in _chain(first, rest):
                if delta.error:
                    yield sse({"error": delta.error.to_api_error().body()["error"], "finished": True}, "error")
                    return
                if delta.text:
                    response += delta.text
                    yield sse({"delta": delta.text, "response": response, "finished": False}, "delta")
            history = [list(pair) for pair in request.history] + [[body.query, response]]
            final = {"query": body.query, "delta": "[EOS]", "response": response, "history": history, "finished": True}
            yield sse(final, "delta")

        return EventStream(events(), headers={POOL_HEADER: pool})

    # --- OpenAI ------------------------------------------------------------------------------------------------

    @app.get("/v1/models", responses={200: {"model": ModelList}} | errors(401))
    async def models(self) -> dict:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "chatglm2-serve"}
                for name in self.config.pools]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", responses=OPENAI_CHAT_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest):
        system, history, query = split_messages(body.messages)
        self._check_prompt(query, "messages")
        request = TextRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            params=self._params(temperature=body.temperature, top_p=body.top_p,
                                max_new_tokens=body.max_completion_tokens or body.max_tokens, seed=body.seed,
                                ignore_eos=body.ignore_eos),
            query=query,
            history=history,
            system=system,
            stop=body.stop or [],
        )
        return await self._openai_response(body, request, chat=True)

    @app.post("/v1/completions", responses=OPENAI_COMPLETION_RESPONSES)
    async def completions(self, body: CompletionRequest):
        self._check_prompt(body.prompt, "prompt")
        request = TextRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            params=self._params(temperature=body.temperature, top_p=body.top_p, max_new_tokens=body.max_tokens,
                                seed=body.seed, ignore_eos=body.ignore_eos),
            raw_prompt=body.prompt,
            stop=body.stop or [],
        )
        return await self._openai_response(body, request, chat=False)

    async def _openai_response(self, body, request: TextRequest, *, chat: bool):
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            pool, text, last = await self._collect(body.model, request)
            choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            answer = {"id": request.request_id, "object": kind, "created": created, "model": pool,
                      "choices": [choice], "usage": last.usage.openai() if last.usage else None}
            return JSONResponse(answer, headers={POOL_HEADER: pool})

        pool, first, rest = await self._open(body.model, request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": request.request_id, "object": f"{kind}.chunk" if chat else kind, "created": created,
                "model": pool}

        def chunk(content: str | None, finish_reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": content} if content is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
            return sse(base | {"choices": [choice]})

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk("", None, role=True)
            usage: Usage | None = None
            async for delta in _chain(first, rest):
                if delta.error:
                    yield sse(delta.error.to_api_error().body())
                    return
                if delta.text:
                    yield chunk(delta.text, None)
                if delta.finish_reason:
                    usage = delta.usage
                    yield chunk(None, delta.finish_reason)
            if include_usage and usage:
                yield sse(base | {"choices": [], "usage": usage.openai()})
            yield sse("[DONE]")

        return EventStream(events(), headers={POOL_HEADER: pool})

    @app.get("/health", responses={200: {"model": Health}})
    async def health(self) -> dict:
        return {"status": "ok", "pools": self.config.pools, "default_model": self.config.default_model}
