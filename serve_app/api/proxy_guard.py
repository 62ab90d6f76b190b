"""Readers that stop reading are cut off: an ASGI middleware for Ray Serve's HTTP proxy.

Nothing between the engine and the client's socket pushes back in Ray Serve: a pool streams to the ingress, and the
ingress to the proxy, as fast as tokens come, whoever reads them. Only the proxy's uvicorn sees a client that stops
reading (its `send` waits for the socket to drain), and it waits forever: Linux keeps a zero-window connection open
as long as the peer answers its probes, so the reply's remaining messages stay parked in the proxy for good. This
middleware runs inside the proxy (Ray Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names `proxy_middlewares`)
and gives every send on an HTTP or WebSocket connection `send_timeout_s` (`CHATGLM2_SEND_TIMEOUT_S`, default 30 s,
0 turns it off): a send that waits longer marks the client stalled. From then on its sends are dropped and its
`receive` answers a disconnect, which is how Ray's proxy learns that a client went away: it cancels the request, the
ingress closes its pool stream and the engine aborts the generation within one step. uvicorn then closes the
connection (the response is incomplete).

So a client that accepts no bytes for `send_timeout_s` while the proxy has some for it loses its connection and its
generation; one that reads slowly but steadily is never cut off (every send that completes resets the clock). The
clock starts only once the kernel's socket buffers are full: on a stalled connection the first `send_timeout_s`
seconds cost at most those buffers' bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os

logger = logging.getLogger("ray.serve")

SEND_TIMEOUT_ENV = "CHATGLM2_SEND_TIMEOUT_S"
DEFAULT_SEND_TIMEOUT_S = 30.0
# What Ray Serve's proxy is told to import (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the Makefile, tests and the
# Kubernetes manifests set both variables.
PROXY_CALLBACK = "serve_app.api.proxy_guard:proxy_middlewares"
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}


def send_timeout_s() -> float:
    raw = os.environ.get(SEND_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_SEND_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{SEND_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{SEND_TIMEOUT_ENV}={raw!r} must be >= 0 (0 turns the send timeout off)")
    return value


def _disconnect(scope: dict) -> dict:
    if scope["type"] == "websocket":
        return {"type": "websocket.disconnect", "code": 1006}  # abnormal closure: the client did not close it
    return {"type": "http.disconnect"}


class StalledReaderGuard:
    """Pure ASGI middleware (see the module docstring); `send_timeout_s` <= 0 passes everything through."""

    def __init__(self, app, send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S):
        self.app, self.send_timeout_s = app, send_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.send_timeout_s <= 0:
            return await self.app(scope, receive, send)
        stalled = asyncio.Event()

        async def guarded_send(message: dict) -> None:
            if stalled.is_set():
                return  # the client is cut off: nothing more goes to it
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                stalled.set()
                client = scope.get("client") or ("?", "?")
                logger.warning("client %s:%s accepted no bytes for %.0f s: cutting off %s %s", *client,
                               self.send_timeout_s, scope["type"], scope.get("path", ""))

        async def guarded_receive() -> dict:
            if stalled.is_set():
                return _disconnect(scope)
            receiving = asyncio.ensure_future(receive())
            stalling = asyncio.ensure_future(stalled.wait())
            try:
                await asyncio.wait({receiving, stalling}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stalling.cancel()
                if not receiving.done():
                    receiving.cancel()
            if receiving.done() and not receiving.cancelled():
                return receiving.result()
            return _disconnect(scope)

        await self.app(scope, guarded_receive, guarded_send)


def warn_if_unguarded() -> None:
    """A loud line where Ray was started without the guard (a plain `serve run`): stalled readers are not cut off."""
    name, value = next(iter(PROXY_ENV.items()))
    if os.environ.get(name) != value:
        logger.warning("%s is not %s in this node's environment: Serve's HTTP proxy will not cut off clients that "
                       "stop reading (their replies are generated in full and wait in the proxy); set it where Ray "
                       "starts, as `make serve` and k8s/ray-service.gpu.yaml do", name, value)


def proxy_middlewares() -> list:
    """The proxy's middlewares, for `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (Ray Serve calls this in its proxy)."""
    from starlette.middleware import Middleware

    timeout = send_timeout_s()
    logger.info("proxy send timeout: %s", f"{timeout:g} s" if timeout > 0 else "off")
    return [Middleware(StalledReaderGuard, send_timeout_s=timeout)]
