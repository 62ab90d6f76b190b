"""The explorer's gRPC service (serve_app/api/protos/chatglm2.proto) as methods of the ingress deployment.

Ray Serve's gRPC proxy calls ingress methods by RPC name: `Generate` returns one message, `StreamGenerate` and
`StreamChat` are async generators. Streamed messages carry the whole answer so far (growing text, as the seed did),
sent when it has grown by a share of itself (`limits.resend_divisor`); StreamChat's `new_history` is set on the last
message only (the one with the final answer).
Errors set a status on the Serve gRPC context (streaming methods then raise): INVALID_ARGUMENT for bad input (empty
or too long prompt, out-of-range parameters, a prompt that leaves no room to generate), NOT_FOUND for an unknown model,
RESOURCE_EXHAUSTED when a pool is overloaded or the request message is over `limits.max_body_bytes`,
UNAUTHENTICATED when API keys are configured and the call's metadata has no valid `authorization: Bearer <key>`,
INTERNAL otherwise.

Request bytes that are not a valid message (corrupt wire format, a string field that is not UTF-8) get
INVALID_ARGUMENT too: the proxy decodes them with serve_app.api.grpc_servicer's decoders, which hand such a request on as
an `UndecodableRequest` instead of raising (gRPC would report a raising decoder as UNKNOWN).

A cancelled call that reaches this replica stops generation (the stream is closed, which aborts the engine request).
Ray Serve 2.60's gRPC proxy does not always forward a client's cancel: when it lands while the proxy is writing a
message, the proxy's generator is closed (GeneratorExit in proxy.py `send_request_to_replica`) without cancelling
the replica call, and the request would run to its token limit: a call that sets no `max_length` gets
`limits.grpc_default_max_length` (1,024 tokens) where that is below `defaults.max_length`.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from pydantic import TypeAdapter, ValidationError
from ray.serve.grpc_util import RayServegRPCContext

from serve_app.api.error_table import APIError, validation_error
from serve_app.api.grpc_servicer import UndecodableRequest
from serve_app.api.protos.chatglm2_pb2 import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse, Turn
from serve_app.api.requests import RequestBuilder
from serve_app.api.schemas import MaxLength, Temperature, TopP
from serve_app.api.security import grpc_key_ok, too_large, unauthorized
from serve_app.server.messages import TextRequest

# The bounds of the streaming API's sampling fields: the types of POST /stream's fields, so the same 400s and
# messages. A message's fields already have their types, and its strings are UTF-8 (the decoders refuse others).
_BOUNDED = {"max_length": TypeAdapter(MaxLength), "top_p": TypeAdapter(TopP), "temperature": TypeAdapter(Temperature)}


class GrpcRequestError(Exception):
    """Raised after the status is set on the context. One plain message argument: Serve pickles it to the proxy
    (an APIError, with keyword-only arguments, would not unpickle)."""


def _status(context: RayServegRPCContext, exc: APIError) -> GrpcRequestError:
    """Record `exc` as the call's gRPC status; a streaming method raises the returned error."""
    context.set_code(exc.kind.grpc)
    context.set_details(exc.message)
    return GrpcRequestError(exc.message)


def _check_decoded(request, security) -> None:
    if isinstance(request, UndecodableRequest):
        raise APIError("invalid_request", f"the request is not a valid {request.message_type} message: {request.problem}")
    if request.ByteSize() > security.max_body_bytes:  # the proxy's own cap: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
        raise too_large(security.max_body_bytes, "request message")


def _check_key(security, context: RayServegRPCContext) -> None:
    if not grpc_key_ok(security, context.invocation_metadata()):
        raise unauthorized()


def _bounded(field: str, value):
    try:
        return _BOUNDED[field].validate_python(value)
    except ValidationError as exc:
        raise validation_error(exc, field=field) from None


def _turn(requests: RequestBuilder, query: str, history: list[tuple[str, str]],
          message: GenerateRequest | ChatRequest) -> TextRequest:
    """A request message's chat turn, its fields checked in the order and with the bounds of the streaming API's;
    unset fields (0 max_length) take the defaults, and do_sample=false means greedy."""
    if message.max_length:
        max_length = _bounded("max_length", message.max_length)
    else:  # the server's cap (limits.grpc_default_max_length): a cancel may not reach this replica
        max_length = min(requests.config.defaults.max_length, requests.config.limits.grpc_default_max_length)
    top_p = _bounded("top_p", message.top_p) if message.HasField("top_p") else None
    if message.HasField("do_sample") and not message.do_sample:
        temperature = 0.0
    else:
        temperature = _bounded("temperature", message.temperature) if message.HasField("temperature") else None
    return requests.turn(query, history, temperature=temperature, top_p=top_p, max_length=max_length)


class GrpcMixin:
    """gRPC methods of ChatIngress; they use its `security`, `requests` (RequestBuilder) and `client` (PoolClient)."""

    async def Generate(self, request: GenerateRequest, grpc_context: RayServegRPCContext) -> GenerateResponse:
        """One chat turn with no history; the whole answer in one message."""
        try:
            _check_key(self.security, grpc_context)
            _check_decoded(request, self.security)
            text_request = _turn(self.requests, request.prompt, [], request)
            answer = await self.client.collect(request.model or None, text_request)
        except APIError as exc:
            # A unary call can end with the status alone (the empty message is not sent), which spares the logs
            # Serve's ERROR traceback for a client's mistake. Streaming calls must raise: Serve forwards the status
            # of a stream only with a message or an exception.
            _status(grpc_context, exc)
            return GenerateResponse()
        return GenerateResponse(generated_text=answer.text, model=answer.model)

    async def StreamGenerate(self, request: GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[GenerateResponse]:
        """The same turn as Generate, streamed as the growing answer."""
        async with aclosing(self._grpc_answers(lambda: (request.prompt, []), request, grpc_context)) as answers:
            sent = None
            async for pool, _, text, _ in answers:
                if text != sent:  # the final answer is not re-sent when the finish added no text
                    sent = text
                    yield GenerateResponse(generated_text=text, model=pool)

    async def StreamChat(self, request: ChatRequest, grpc_context: RayServegRPCContext) -> AsyncIterator[ChatResponse]:
        """A chat turn with history; each message has the growing answer, the last one also the history that ends
        with it."""
        def turn() -> tuple[str, list[tuple[str, str]]]:
            return request.query, [(t.query, t.response) for t in request.history]

        async with aclosing(self._grpc_answers(turn, request, grpc_context)) as answers:
            async for pool, text_request, text, last in answers:
                history = text_request.prompt.history_after(text) if last else []
                turns = [Turn(query=q, response=r) for q, r in history]
                yield ChatResponse(generated_text=text, new_history=turns, model=pool)

    async def _grpc_answers(self, turn: Callable[[], tuple[str, list[tuple[str, str]]]],
                            message: GenerateRequest | ChatRequest | UndecodableRequest,
                            context: RayServegRPCContext) -> AsyncIterator[tuple[str, TextRequest, str, bool]]:
        """Yields (pool, request, answer so far, last) as Stream.growing() paces it, at least once. `turn` gives the
        message's (query, history), read once the message is known to have decoded."""
        try:
            _check_key(self.security, context)
            _check_decoded(message, self.security)
            text_request = _turn(self.requests, *turn(), message)
            stream = await self.client.open(message.model or None, text_request)
            async with stream:  # closed however the call ends: a cancelled call stops the engine, not just the proxy
                async for text, last in stream.growing():
                    yield stream.model, text_request, text, last
        except APIError as exc:
            raise _status(context, exc) from None
