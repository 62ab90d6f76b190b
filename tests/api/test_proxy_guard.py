"""The proxy's stalled-reader guard (serve_app/api/proxy_guard.py) as an ASGI middleware, against a server `send`
that blocks as uvicorn's does for a client that stops reading. tests/api/test_stalled_readers.py runs it inside
Ray Serve's proxy."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.api import proxy_guard
from serve_app.api.proxy_guard import StalledReaderGuard, proxy_middlewares, send_timeout_s


class Server:
    """The server side of one connection: `send` blocks once `accepts` messages went out (a full socket); the
    client's own messages come from `client`."""

    def __init__(self, accepts: int, client: list[dict] | None = None):
        self.accepts, self.sent, self.client = accepts, [], asyncio.Queue()
        for message in client or []:
            self.client.put_nowait(message)

    async def send(self, message: dict) -> None:
        if len(self.sent) >= self.accepts:
            await asyncio.Event().wait()  # never drains
        self.sent.append(message)

    async def receive(self) -> dict:
        return await self.client.get()


def streaming_app(chunks: int, seen: list):
    """A response of `chunks` body messages that, like Ray's proxy, watches `receive` for a disconnect meanwhile."""
    async def app(scope, receive, send):
        async def watch():
            while (message := await receive())["type"] not in ("http.disconnect", "websocket.disconnect"):
                pass
            seen.append(message)

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(chunks):
            await send({"type": "http.response.body", "body": b"x", "more_body": i < chunks - 1})
            await asyncio.sleep(0)
        await asyncio.wait({watcher}, timeout=1)
        watcher.cancel()
    return app


HTTP = {"type": "http", "path": "/stream", "client": ("127.0.0.1", 5000)}


def test_a_reader_that_stops_reading_is_cut_off_and_its_disconnect_reported():
    async def run():
        seen, server = [], Server(accepts=3)
        guard = StalledReaderGuard(streaming_app(10, seen), send_timeout_s=0.05)
        await asyncio.wait_for(guard(HTTP, server.receive, server.send), 5)
        return seen, server.sent

    seen, sent = asyncio.run(run())
    assert len(sent) == 3  # the start and two chunks went out; the rest were dropped, not queued
    assert seen == [{"type": "http.disconnect"}]


def test_a_websocket_reader_that_stops_reading_gets_an_abnormal_closure():
    async def run():
        seen, server = [], Server(accepts=1)
        guard = StalledReaderGuard(streaming_app(5, seen), send_timeout_s=0.05)
        await asyncio.wait_for(guard({**HTTP, "type": "websocket"}, server.receive, server.send), 5)
        return seen

    assert asyncio.run(run()) == [{"type": "websocket.disconnect", "code": 1006}]


def test_a_reader_that_keeps_reading_is_never_cut_off():
    async def run():
        seen, server = [], Server(accepts=1_000)
        guard = StalledReaderGuard(streaming_app(50, seen), send_timeout_s=0.05)
        await guard(HTTP, server.receive, server.send)
        return seen, server.sent

    seen, sent = asyncio.run(run())
    assert len(sent) == 51 and sent[-1]["more_body"] is False and seen == []


def test_the_clients_own_messages_pass_through_unchanged():
    async def run():
        received, server = [], Server(accepts=10, client=[{"type": "http.request", "body": b"{}", "more_body": False},
                                                          {"type": "http.disconnect"}])

        async def app(scope, receive, send):
            received.extend([await receive(), await receive()])

        await StalledReaderGuard(app, send_timeout_s=1)(HTTP, server.receive, server.send)
        return received

    assert asyncio.run(run()) == [{"type": "http.request", "body": b"{}", "more_body": False},
                                  {"type": "http.disconnect"}]


def test_off_and_lifespan_pass_through():
    calls = []

    async def app(scope, receive, send):
        calls.append((scope["type"], receive, send))

    async def run():
        receive, send = object(), object()
        await StalledReaderGuard(app, send_timeout_s=0)(HTTP, receive, send)
        await StalledReaderGuard(app, send_timeout_s=1)({"type": "lifespan"}, receive, send)
        return receive, send

    receive, send = asyncio.run(run())
    assert calls == [("http", receive, send), ("lifespan", receive, send)]


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(proxy_guard.SEND_TIMEOUT_ENV, raising=False)
    assert send_timeout_s() == proxy_guard.DEFAULT_SEND_TIMEOUT_S
    monkeypatch.setenv(proxy_guard.SEND_TIMEOUT_ENV, "2.5")
    (middleware,) = proxy_middlewares()
    assert middleware.cls is StalledReaderGuard and middleware.kwargs == {"send_timeout_s": 2.5}
    for bad in ("soon", "-1"):
        monkeypatch.setenv(proxy_guard.SEND_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=proxy_guard.SEND_TIMEOUT_ENV):
            send_timeout_s()


def test_ray_serve_accepts_the_callback():
    """What Ray's proxy does with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: import, call, validate."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    (middleware,) = validate_http_proxy_callback_return(call_function_from_import_path(proxy_guard.PROXY_CALLBACK))
    assert middleware.cls is StalledReaderGuard
