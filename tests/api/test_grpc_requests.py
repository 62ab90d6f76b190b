"""gRPC request messages -> the pool's TextRequest (serve_app/api/grpc.py), and the gRPC methods' statuses and
stream closing, against fake pools. Fast: no Ray started.

A message's fields are checked with the bounds of the streaming API's (POST /stream), field by field, without the HTTP
body model: the reference below is what the service did before, a dict validated as that model, and every answer
(the request built, or the 400 with its message and param) must be the same.
"""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import pytest
from pydantic import ValidationError

from serve_app.api import grpc as grpc_api
from serve_app.api.error_table import APIError, validation_error
from serve_app.api.grpc import GrpcMixin, GrpcRequestError
from serve_app.api.grpc_servicer import UndecodableRequest
from serve_app.api.pool_client import PoolClient
from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.requests import RequestBuilder
from serve_app.api.schemas import StreamChatRequest
from serve_app.api.security import SecuritySettings
from serve_app.server.messages import TextDelta, Usage
from tests.api.fake_pools import CONFIG, POOL, Handle, in_flight

REQUESTS = RequestBuilder(CONFIG)


def reference(query: str, history: list, message) -> tuple:
    """The former way: message -> dict -> StreamChatRequest -> chat_turn."""
    fields = {"query": query, "history": history, "model": message.model or None,
              "max_length": message.max_length or min(CONFIG.defaults.max_length, CONFIG.limits.grpc_default_max_length)}
    if message.HasField("top_p"):
        fields["top_p"] = message.top_p
    if message.HasField("do_sample") and not message.do_sample:
        fields["temperature"] = 0.0
    elif message.HasField("temperature"):
        fields["temperature"] = message.temperature
    try:
        return answer(lambda: REQUESTS.chat_turn(StreamChatRequest.model_validate(fields)))
    except ValidationError as exc:
        error = validation_error(exc)
        return "error", error.code, error.status, error.message, error.param


def answer(build) -> tuple:
    try:
        request = build()
    except APIError as exc:
        return "error", exc.code, exc.status, exc.message, exc.param
    return "request", request.prompt.query, request.prompt.history, request.params


FIELDS = [
    {}, {"max_length": 64}, {"max_length": -3}, {"max_length": 1},
    {"top_p": 0.9}, {"top_p": 1.0}, {"top_p": 1.5}, {"top_p": 0.0}, {"top_p": -1.0}, {"top_p": math.inf},
    {"top_p": math.nan},
    {"temperature": 0.0}, {"temperature": 0.8}, {"temperature": 2.0}, {"temperature": 5.0}, {"temperature": -0.5},
    {"temperature": math.nan}, {"temperature": -math.inf},
    {"do_sample": False}, {"do_sample": True}, {"do_sample": False, "temperature": 5.0},
    {"do_sample": True, "temperature": 5.0},
    {"max_length": -1, "top_p": 2.0, "temperature": 9.0},  # the first bad field in the model's order is reported
    {"top_p": 2.0, "temperature": 9.0}, {"max_length": 16, "temperature": 0.0, "top_p": 0.5, "model": "x"},
]
PROMPTS = ["hi", "", "  \n", "x" * (CONFIG.limits.max_prompt_chars + 1), "x" * CONFIG.limits.max_prompt_chars]


@pytest.mark.parametrize("fields", FIELDS, ids=str)
@pytest.mark.parametrize("prompt", PROMPTS, ids=["hi", "empty", "blank", "too-long", "longest"])
def test_generate_requests_are_checked_as_before(prompt, fields):
    message = pb.GenerateRequest(prompt=prompt, **fields)
    assert answer(lambda: grpc_api._turn(REQUESTS, prompt, [], message)) == reference(prompt, [], message)


@pytest.mark.parametrize("fields", FIELDS, ids=str)
@pytest.mark.parametrize("rounds", [0, 1, 12])
def test_chat_requests_are_checked_as_before(rounds, fields):
    history = [(f"q{i}", f"r{i}") for i in range(rounds)]
    message = pb.ChatRequest(query="hi", history=[pb.Turn(query=q, response=r) for q, r in history], **fields)
    got = answer(lambda: grpc_api._turn(REQUESTS, "hi", history, message))
    assert got == reference("hi", history, message)


def test_the_messages_a_client_sees():
    def refused(**fields) -> tuple:
        message = pb.GenerateRequest(prompt="hi", **fields)
        return answer(lambda: grpc_api._turn(REQUESTS, "hi", [], message))[3:]

    assert refused(temperature=math.nan) == ("temperature: Input should be a finite number", "temperature")
    assert refused(top_p=math.inf) == ("top_p: Input should be a finite number", "top_p")
    assert refused(max_length=-3) == ("max_length: Input should be greater than or equal to 1", "max_length")
    assert refused(temperature=5.0) == ("temperature: Input should be less than or equal to 2", "temperature")


# ---- the methods: statuses, and the stream closed however a call ends -------------------------------------------


class Context:
    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self):
        return ()


class Ingress(GrpcMixin):
    def __init__(self, handle: Handle):
        self.security = SecuritySettings(api_keys=(), max_body_bytes=1 << 20)
        self.requests = REQUESTS
        self.client = PoolClient({POOL: handle}, CONFIG)


DELTAS = [TextDelta(text="a"), TextDelta(text="b"), TextDelta(finish_reason="stop", usage=Usage(1, 2))]


def test_generate_and_stream_generate_answer():
    ingress, context = Ingress(Handle(DELTAS)), Context()
    reply = asyncio.run(ingress.Generate(pb.GenerateRequest(prompt="hi"), context))
    assert (reply.generated_text, reply.model, context.code) == ("ab", POOL, None)

    async def stream():
        return [m.generated_text async for m in ingress.StreamGenerate(pb.GenerateRequest(prompt="hi"), context)]

    assert asyncio.run(stream()) == ["a", "ab"]
    assert in_flight(ingress.client) == 0


@pytest.mark.parametrize(("message", "code", "says"), [
    (pb.GenerateRequest(prompt="hi", temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature: Input should be a finite number"),
    (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
    (pb.GenerateRequest(prompt="hi", model="nope"), grpc.StatusCode.NOT_FOUND, "The model 'nope' does not exist"),
    (UndecodableRequest("chatglm2.GenerateRequest", "bad"), grpc.StatusCode.INVALID_ARGUMENT,
     "not a valid chatglm2.GenerateRequest message: bad"),
])
def test_bad_requests_get_their_status(message, code, says):
    ingress = Ingress(Handle(DELTAS))
    unary = Context()
    assert asyncio.run(ingress.Generate(message, unary)) == pb.GenerateResponse()
    assert unary.code == code and says in unary.details

    async def stream(context):
        return [m async for m in ingress.StreamGenerate(message, context)]

    streamed = Context()
    with pytest.raises(GrpcRequestError, match=re.escape(says)):
        asyncio.run(stream(streamed))
    assert streamed.code == code and says in streamed.details


def test_a_pool_failure_mid_stream_is_its_status():
    ingress, context = Ingress(Handle([TextDelta(text="a"), RuntimeError("lost")])), Context()

    async def stream():
        return [m async for m in ingress.StreamChat(pb.ChatRequest(query="hi"), context)]

    with pytest.raises(GrpcRequestError):
        asyncio.run(stream())
    assert (context.code, context.details) == (grpc.StatusCode.INTERNAL, "internal error while streaming")
    assert in_flight(ingress.client) == 0


def test_a_call_closed_early_closes_the_stream():
    """Serve closes the method's generator when the call is cancelled: the pool's generation stops."""
    handle = Handle([TextDelta(text="a")], hold=True)
    ingress = Ingress(handle)

    async def first_then_close():
        calls = ingress.StreamChat(pb.ChatRequest(query="hi", history=[pb.Turn(query="q", response="r")]), Context())
        first = await calls.__anext__()
        await calls.aclose()
        return (first.generated_text, len(first.new_history), in_flight(ingress.client),
                handle.generations[0].cancelled)

    assert asyncio.run(first_then_close()) == ("a", 0, 0, True)  # not the last message: no history yet


def test_no_request_goes_through_the_http_body_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the gRPC path validated the HTTP body model")

    monkeypatch.setattr(StreamChatRequest, "model_validate", refuse)
    monkeypatch.setattr(RequestBuilder, "chat_turn", refuse)
    ingress = Ingress(Handle(DELTAS))
    assert asyncio.run(ingress.Generate(pb.GenerateRequest(prompt="hi", top_p=0.5), Context())).generated_text == "ab"


def test_a_call_without_max_length_gets_the_servers_cap():
    """HTTP's default is defaults.max_length (2048); a gRPC call, whose cancel may not arrive, gets the lower cap."""
    assert CONFIG.defaults.max_length == 2048 and CONFIG.limits.grpc_default_max_length == 1024
    request = grpc_api._turn(REQUESTS, "hi", [], pb.GenerateRequest(prompt="hi"))
    assert request.params.max_length == 1024
    assert grpc_api._turn(REQUESTS, "hi", [], pb.GenerateRequest(prompt="hi", max_length=4096)).params.max_length == 4096
