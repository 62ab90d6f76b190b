"""PoolClient: how every front end (HTTP, SSE, WebSocket, gRPC) reaches a pool.

    client = PoolClient(handles, args)
    stream = await client.open(model, request)    # route, start, wait for the first delta (errors raise APIError)
    async for piece in stream.pieces(): ...        # text as it comes; an error delta raises APIError
    answer = await client.collect(model, request)  # the whole answer
    tokens = await client.tokenize(model, request)  # the prompt ids a generation of `request` would run

Errors before the first token raise `APIError` from `open`, so every protocol can still answer with a status; later
ones raise from the iteration, and each protocol ends its stream its own way. Leaving a stream early (a client that
went away) cancels the pool's generation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.api.errors import APIError, internal_error
from serve_app.api.routing import Router
from serve_app.config import AppArgs
from serve_app.server.messages import TextDelta, TextRequest, Tokens, Usage

logger = logging.getLogger("ray.serve")

REPLICA_FAILED = "the replica serving this request failed; retry"


class Stream:
    """One generation in progress on `pool`. Iterate `pieces()` once; `finish_reason` and `usage` are set by the
    final delta."""

    def __init__(self, pool: str, first: TextDelta, rest, router: Router):
        self.pool = pool
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._first, self._rest, self._router = first, rest, router
        self._closed = False

    async def deltas(self) -> AsyncIterator[TextDelta]:
        """Every delta, the first included; an error delta raises APIError."""
        try:
            delta = self._first
            while True:
                if delta.error:
                    raise APIError.from_info(delta.error)
                if delta.finish_reason:
                    self.finish_reason, self.usage = delta.finish_reason, delta.usage
                yield delta
                if delta.finish_reason:
                    return
                try:
                    delta = await self._rest.__anext__()
                except StopAsyncIteration:
                    return
                except RayActorError as exc:  # the replica died mid-stream: an error, not a cut stream
                    logger.warning("pool %s: replica failed mid-stream: %s", self.pool, exc)
                    raise APIError("replica_failed", REPLICA_FAILED) from exc
                except Exception as exc:
                    logger.exception("pool %s: stream failed", self.pool)
                    raise internal_error("internal error while streaming") from exc
        finally:
            self.close()

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it grows, in non-empty pieces."""
        async for delta in self.deltas():
            if delta.text:
                yield delta.text

    async def growing(self) -> AsyncIterator[str]:
        """The whole answer so far each time it grows, and at least once (an empty answer is still an answer)."""
        text, sent = "", False
        async for piece in self.pieces():
            text += piece
            sent = True
            yield text
        if not sent:
            yield text

    def close(self) -> None:
        """Stop the pool's generation (if it still runs) and release the routing slot; idempotent."""
        if not self._closed:
            self._closed = True
            self._router.finished(self.pool)
            self._rest.cancel()


@dataclass
class Answer:
    pool: str
    text: str
    finish_reason: str | None
    usage: Usage | None


class PoolClient:
    def __init__(self, handles: dict, args: AppArgs):
        self.handles = handles
        # Cached once: `options(stream=True)` per request would rebuild the handle's state.
        self.streams = {name: handle.options(stream=True) for name, handle in handles.items()}
        self.router = Router(handles, args.pool_names, args.default_pool, args.routing)

    async def open(self, model: str | None, request: TextRequest) -> Stream:
        """Route and start a generation, and wait for its first delta. Errors before any text raise APIError."""
        pool = self.router.resolve(model)
        rest = None
        self.router.started(pool)
        try:
            rest = self.streams[pool].generate.remote(request)
            first = await rest.__anext__()
        except BackPressureError as exc:  # refused before it started: nothing to cancel
            self.router.finished(pool)
            raise APIError("overloaded", f"pool {pool} is overloaded; retry shortly") from exc
        except RayActorError as exc:  # the replica died (or became unreachable) before the first token
            self._release(pool, rest)
            logger.warning("pool %s: replica failed before the first token: %s", pool, exc)
            raise APIError("replica_failed", REPLICA_FAILED) from exc
        except BaseException:
            self._release(pool, rest)
            raise
        if first.error:
            self._release(pool, rest)
            raise APIError.from_info(first.error)
        return Stream(pool, first, rest, self.router)

    def _release(self, pool: str, rest) -> None:
        self.router.finished(pool)
        if rest is not None:
            rest.cancel()  # a started generation that nobody will read

    async def collect(self, model: str | None, request: TextRequest) -> Answer:
        stream = await self.open(model, request)
        text = "".join([piece async for piece in stream.pieces()])
        return Answer(stream.pool, text, stream.finish_reason, stream.usage)

    async def tokenize(self, model: str | None, request: TextRequest, special_tokens: bool = True) -> Tokens:
        """The prompt ids the pool would run for `request` (a raw prompt without [gMASK] sop if not
        `special_tokens`). Errors raise APIError."""
        return await self._call(model, "tokenize", request, special_tokens)

    async def detokenize(self, model: str | None, ids: list[int]) -> Tokens:
        """The text of `ids` in the pool's tokenizer. Errors raise APIError."""
        return await self._call(model, "detokenize", ids)

    async def _call(self, model: str | None, method: str, *args) -> Tokens:
        pool = self.router.resolve(model)
        try:
            result: Tokens = await getattr(self.handles[pool], method).remote(*args)
        except BackPressureError as exc:
            raise APIError("overloaded", f"pool {pool} is overloaded; retry shortly") from exc
        except RayActorError as exc:
            raise APIError("replica_failed", REPLICA_FAILED) from exc
        if result.error:
            raise APIError.from_info(result.error)
        return result
