"""How the front ends reach a pool (serve_app/api/pool_client.py), against fake Serve handles. Fast: no Ray started.

Errors cross Ray one way each: a pool's own errors as data (`ErrorInfo`), Ray's exceptions through
`pool_call_error`, at every place a pool is called. A `Stream` closes itself (the generation is cancelled, the routing
slot released) however its iteration ends, and its holders (`async with`, an SSE response, the WebSocket and gRPC
methods) close it when they stop early.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from contextlib import aclosing

import pytest
from ray.exceptions import ActorDiedError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

from serve_app.api import pool_client
from serve_app.api.error_table import APIError
from serve_app.api.http import EventStream
from serve_app.api.ingress_config import IngressConfig
from serve_app.api.pool_client import BEFORE_FIRST_TOKEN, MID_STREAM, REPLICA_FAILED, PoolClient, Stream
from serve_app.api.requests import RequestBuilder
from serve_app.api.security import SecuritySettings
from serve_app.api.websocket import WebSocketMixin
from serve_app.server.messages import ErrorInfo, TextDelta, Tokens, Usage
from tests.api.fake_pools import CONFIG, DONE, POOL, REQUEST, Handle, client_of, in_flight

@pytest.fixture
def mapped(monkeypatch) -> list[tuple]:
    """The calls of pool_call_error: (exception type, pool, when)."""
    calls, original = [], pool_client.pool_call_error

    def spy(exc, pool, when):
        calls.append((type(exc), pool, when))
        return original(exc, pool, when)

    monkeypatch.setattr(pool_client, "pool_call_error", spy)
    return calls


# ---- the one mapping of Ray's exceptions ---------------------------------------------------------------------------

RAY_ERRORS = [
    (BackPressureError(num_queued_requests=3, max_queued_requests=2), "overloaded", f"pool {POOL} is overloaded; "
     "retry shortly"),
    (ActorDiedError(), "replica_failed", REPLICA_FAILED),
    (RayActorError(), "replica_failed", REPLICA_FAILED),
    (ValueError("something else"), "internal_error", None),
]
IDS = ["backpressure", "actor-died", "actor-error", "other"]


@pytest.mark.parametrize(("exc", "code", "message"), RAY_ERRORS, ids=IDS)
def test_open_maps_rays_exceptions_through_the_one_function(mapped, exc, code, message):
    handle = Handle([exc])
    client = client_of(handle)
    with pytest.raises(APIError) as caught:
        asyncio.run(client.open(None, REQUEST))
    assert (caught.value.code, caught.value.message) == (code, message or "internal server error")
    assert caught.value.__cause__ is exc
    assert mapped == [(type(exc), POOL, BEFORE_FIRST_TOKEN)]
    assert in_flight(client) == 0
    # a request that backpressure refused never started: there is nothing to cancel
    assert handle.generations[0].cancelled == (code != "overloaded")


@pytest.mark.parametrize(("exc", "code", "message"), RAY_ERRORS, ids=IDS)
def test_the_iteration_maps_rays_exceptions_through_the_one_function(mapped, exc, code, message):
    handle = Handle([TextDelta(text="a"), TextDelta(text="b"), exc])
    client = client_of(handle)

    async def read() -> list[str]:
        stream, pieces = await client.open(None, REQUEST), []
        with pytest.raises(APIError) as caught:
            async for piece in stream.pieces():
                pieces.append(piece)
        assert (caught.value.code, caught.value.message) == (code, message or "internal error while streaming")
        return pieces

    assert asyncio.run(read()) == ["a", "b"]
    assert mapped == [(type(exc), POOL, MID_STREAM)]
    assert in_flight(client) == 0 and handle.generations[0].cancelled


@pytest.mark.parametrize("method", ["tokenize", "detokenize"])
@pytest.mark.parametrize(("exc", "code", "message"), RAY_ERRORS, ids=IDS)
def test_calls_map_rays_exceptions_through_the_one_function(mapped, method, exc, code, message):
    client = client_of(Handle(tokens=exc))
    with pytest.raises(APIError) as caught:
        call = client.tokenize(None, REQUEST) if method == "tokenize" else client.detokenize(None, [1, 2])
        asyncio.run(call)
    assert (caught.value.code, caught.value.message) == (code, message or "internal server error")
    assert mapped == [(type(exc), POOL, f"in {method}")]


def test_a_pools_own_errors_travel_as_data(mapped):
    overloaded = ErrorInfo("overloaded", "the engine's queue is full")
    for handle, call in [
        (Handle([TextDelta(error=overloaded)]), lambda c: c.open(None, REQUEST)),
        (Handle([TextDelta(text="a"), TextDelta(error=overloaded)]), lambda c: c.collect(None, REQUEST)),
        (Handle(tokens=Tokens(error=overloaded)), lambda c: c.tokenize(None, REQUEST)),
    ]:
        client = client_of(handle)
        with pytest.raises(APIError) as caught:
            asyncio.run(call(client))
        assert (caught.value.code, caught.value.message, caught.value.headers) == (
            "overloaded", "the engine's queue is full", {"Retry-After": "1"})
        assert in_flight(client) == 0
    assert mapped == []  # none of them went through the mapping of Ray's exceptions


# ---- a Stream closes itself ----------------------------------------------------------------------------------------


def test_collect_and_a_finished_iteration_close_the_stream():
    handle = Handle([TextDelta(text="a"), TextDelta(text="b"), DONE])
    client = client_of(handle)
    answer = asyncio.run(client.collect(None, REQUEST))
    assert (answer.pool, answer.text, answer.finish_reason, answer.usage) == (POOL, "ab!", "stop", Usage(3, 2))
    assert in_flight(client) == 0 and handle.generations[0].cancelled


@pytest.mark.parametrize("iterate", ["deltas", "pieces", "growing"])
def test_a_stream_held_in_async_with_closes_when_its_reader_stops_early(iterate):
    handle = Handle([TextDelta(text="a")], hold=True)
    client = client_of(handle)

    async def read_one():
        async with await client.open(None, REQUEST) as stream:
            async for _ in getattr(stream, iterate)():
                break  # the generator is left suspended; leaving `async with` closes the stream
        return in_flight(client), handle.generations[0].cancelled

    assert asyncio.run(read_one()) == (0, True)


def test_a_stream_dropped_unread_stops_its_generation():
    """A handler cancelled after `open()` and before its response ran leaves a Stream nobody reads or closes."""
    import gc

    handle = Handle([TextDelta(text="a")], hold=True)
    client = client_of(handle)

    async def open_and_drop():
        await client.open(None, REQUEST)  # the Stream is dropped at once
        gc.collect()
        return in_flight(client), handle.generations[0].cancelled

    assert asyncio.run(open_and_drop()) == (0, True)


def test_closing_an_iteration_closes_the_stream():
    handle = Handle([TextDelta(text="a")], hold=True)
    client = client_of(handle)

    async def read_one():
        stream = await client.open(None, REQUEST)
        async with aclosing(stream.growing()) as texts:
            async for _ in texts:
                break
        return in_flight(client), handle.generations[0].cancelled

    assert asyncio.run(read_one()) == (0, True)


def test_an_sse_response_closes_its_source_when_the_client_goes_away():
    """The ingress's SSE routes hand the stream to the response (`source=`): a client that goes away mid-stream
    (the send fails) stops the generation, though the events generator is left suspended."""
    handle = Handle([TextDelta(text="a"), TextDelta(text="b")], hold=True)
    client = client_of(handle)

    async def serve_and_disconnect():
        stream = await client.open(None, REQUEST)

        async def events():
            async for piece in stream.pieces():
                yield piece

        sent = []

        async def send(message):
            if len(sent) == 2:  # the start and one event went out, then the connection broke
                raise OSError("connection reset")
            sent.append(message)

        async def receive():
            await asyncio.Event().wait()

        response = EventStream(events(), source=stream)
        with pytest.raises(ClientDisconnect):
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        return in_flight(client), handle.generations[0].cancelled

    assert asyncio.run(serve_and_disconnect()) == (0, True)


# ---- the WebSocket's holder ----------------------------------------------------------------------------------------


class ChatSocket:
    """A client that sends one request, then goes away while the first answer message is being sent to it."""

    scope = {"type": "websocket", "headers": [], "query_string": b""}

    def __init__(self, request: dict):
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(request)})
        self.sent: list[dict] = []

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})
        await asyncio.Event().wait()  # the send never completes: the answer is cancelled here, not in the stream

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


class WebSocketIngress(WebSocketMixin):
    def __init__(self, client: PoolClient):
        self.security = SecuritySettings(api_keys=(), max_body_bytes=1 << 20)
        self.requests = RequestBuilder(CONFIG)
        self.client = client


def test_a_websocket_client_that_goes_away_mid_answer_closes_the_stream(monkeypatch):
    # The iteration is kept referenced, as a traceback may keep it: only its holder closes the stream, not the
    # event loop finalizing an abandoned generator.
    kept, growing = [], Stream.growing
    monkeypatch.setattr(Stream, "growing", lambda self: kept.append(growing(self)) or kept[-1])
    handle = Handle([TextDelta(text="a")], hold=True)
    client = client_of(handle)
    socket = ChatSocket({"query": "hi", "history": [["q", "r"]]})

    async def chat():
        await asyncio.wait_for(WebSocketIngress(client).websocket_chat(socket), 10)
        return in_flight(client), handle.generations[0].cancelled  # before the loop finalizes the generators

    assert asyncio.run(chat()) == (0, True)
    assert socket.sent == [{"resp": "a"}]  # not the final answer: no history


def _grown(deltas: list[TextDelta], divisor: int) -> list[tuple[str, bool]]:
    client = PoolClient({POOL: Handle(deltas)}, IngressConfig(pool_names=[POOL], limits={"resend_divisor": divisor}))

    async def read():
        return [pair async for pair in (await client.open(None, REQUEST)).growing()]

    return asyncio.run(read())


def test_growing_re_sends_the_answer_as_it_grows_by_a_share_of_itself():
    deltas = [TextDelta(text="字") for _ in range(999)] + [DONE]
    pairs = _grown(deltas, divisor=8)
    texts = [text for text, _ in pairs]
    assert texts[-1] == "字" * 999 + "!" and [last for _, last in pairs] == [False] * (len(pairs) - 1) + [True]
    for before, after in zip(texts, texts[1:-1]):  # every step but the final one is at least len(before) // 8
        assert after.startswith(before) and len(after) - len(before) >= max(1, len(before) // 8)
    assert texts[:8] == ["字" * n for n in range(1, 9)]  # a short answer still streams piece by piece
    # Geometric growth: about 8 * ln(1000 / 8) + 8 messages, and about (8 + 1) * 1000 characters in all, where
    # every piece (below) costs 1000 * 1000 / 2.
    assert len(pairs) < 60 and sum(map(len, texts)) < 10 * 1000
    every_piece = _grown(deltas, divisor=0)
    assert [text for text, _ in every_piece] == ["字" * n for n in range(1, 1000)] + [texts[-1]]


def test_growing_yields_once_for_an_empty_answer_and_the_final_text_with_the_finish():
    assert _grown([TextDelta(finish_reason="stop", usage=Usage(3, 0))], divisor=32) == [("", True)]
    assert _grown([TextDelta(text="ab"), TextDelta(text="c", finish_reason="length", usage=Usage(3, 2))],
                  divisor=32) == [("ab", False), ("abc", True)]


# ---- a prompt longer than the chosen pool's context ----------------------------------------------------------


class ContextPool(Handle):
    """A pool of context `max_seq_len` whose generations refuse prompts of more than that many tokens."""

    def __init__(self, max_seq_len: int, prompt_tokens: int):
        too_long = TextDelta(error=ErrorInfo("context_length_exceeded", f"The prompt has {prompt_tokens} tokens; "
                                             f"this model's context is {max_seq_len}."))
        super().__init__([too_long] if prompt_tokens >= max_seq_len else [DONE])
        self.max_seq_len = max_seq_len

    @property
    def engine_stats(self):
        async def stats():
            return SimpleNamespace(engine=SimpleNamespace(free_slots=4, waiting=0, max_seq_len=self.max_seq_len))

        return SimpleNamespace(remote=stats)


def context_pools(prompt_tokens: int, routing: str = "auto") -> tuple[PoolClient, dict]:
    # Highest precision first, as configs list them: two short-context pools, then a long-context one.
    handles = {"fp16": ContextPool(2048, prompt_tokens), "int4": ContextPool(2048, prompt_tokens),
               "int4-32k": ContextPool(32768, prompt_tokens)}
    return PoolClient(handles, IngressConfig(pool_names=list(handles), routing=routing)), handles


async def _open_pool(client: PoolClient, model: str | None) -> str:
    async with await client.open(model, REQUEST) as stream:
        [piece async for piece in stream.pieces()]
    return stream.pool


@pytest.mark.parametrize("model", ["auto", None])
def test_auto_sends_a_prompt_past_the_pools_context_to_a_pool_that_holds_it(model):
    client, handles = context_pools(prompt_tokens=5000)
    assert asyncio.run(_open_pool(client, model)) == "int4-32k"
    # The first pool refused it; the other short one was skipped: its context is no longer.
    assert [len(handles[name].generations) for name in handles] == [1, 0, 1]
    assert all(g.cancelled for g in handles["fp16"].generations)
    assert all(load.in_flight == 0 for load in client.router.load.values())


def test_auto_keeps_a_prompt_that_fits_on_the_first_pool():
    client, handles = context_pools(prompt_tokens=100)
    assert asyncio.run(_open_pool(client, "auto")) == "fp16"
    assert [len(handles[name].generations) for name in handles] == [1, 0, 0]


def test_a_prompt_no_pool_holds_is_a_400_naming_the_longest_context():
    client, handles = context_pools(prompt_tokens=40_000)
    with pytest.raises(APIError) as raised:
        asyncio.run(_open_pool(client, "auto"))
    assert raised.value.code == "context_length_exceeded" and raised.value.status == 400
    assert "longest context is 32768 tokens (int4-32k)" in raised.value.message
    assert "The prompt has 40000 tokens" in raised.value.message
    assert [len(handles[name].generations) for name in handles] == [1, 0, 1]
    assert all(load.in_flight == 0 for load in client.router.load.values())


@pytest.mark.parametrize("model,routing", [("fp16", "auto"), (None, "default")])
def test_a_named_or_default_pool_is_never_changed(model, routing):
    client, handles = context_pools(prompt_tokens=5000, routing=routing)
    with pytest.raises(APIError) as raised:
        asyncio.run(_open_pool(client, model))
    assert raised.value.code == "context_length_exceeded" and "longest context" not in raised.value.message
    assert [len(handles[name].generations) for name in handles] == [1, 0, 0]
