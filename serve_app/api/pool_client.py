"""PoolClient: how every front end (HTTP, SSE, WebSocket, gRPC) reaches a pool.

    client = PoolClient(handles, config)
    async with await client.open(model, request) as stream:  # route, start, wait for the first delta
        async for piece in stream.pieces(): ...                # text as it comes; an error delta raises APIError
    answer = await client.collect(model, request)  # the whole answer
    tokens = await client.tokenize(model, request)  # the prompt ids a generation of `request` would run

Errors before the first token raise `APIError` from `open`, so every protocol can still answer with a status; later
ones raise from the iteration, and each protocol ends its stream its own way. Errors cross Ray one way each: a pool's
own errors travel as data (`ErrorInfo` in the final `TextDelta`, or in `Tokens`), and what Ray raises instead
(Serve's backpressure, a replica that died, anything else) becomes an `APIError` in `pool_call_error`, the one place
for it. A `Stream` closes itself: when its iteration ends, however it ends, and when a caller that may stop reading
early (a client that went away) leaves the `async with` it holds the stream in. Closing cancels the pool's generation.
"""

from __future__ import annotations

import dataclasses

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.api.error_table import APIError, internal_error
from serve_app.api.pool_choice import Router
from serve_app.api.ingress_config import IngressConfig
from serve_app.server.messages import LogprobEntry, TextDelta, TextRequest, Tokens, Usage

logger = logging.getLogger("ray.serve")

REPLICA_FAILED = "the replica serving this request failed; retry"
BEFORE_FIRST_TOKEN, MID_STREAM = "before the first token", "mid-stream"  # when a call failed, for pool_call_error


def pool_call_error(exc: Exception, pool: str, when: str) -> APIError:
    """The APIError for what a call to `pool` raised: the one place Ray's exceptions are mapped. `when` is
    BEFORE_FIRST_TOKEN, MID_STREAM or the method called ("in tokenize"), for the log."""
    if isinstance(exc, BackPressureError):  # Serve refused the request before it started
        return APIError("overloaded", f"pool {pool} is overloaded; retry shortly")
    if isinstance(exc, RayActorError):  # the replica died (or became unreachable): an error, not a cut stream
        logger.warning("pool %s: replica failed %s: %s", pool, when, exc)
        return APIError("replica_failed", REPLICA_FAILED)
    logger.error("pool %s: call failed %s", pool, when, exc_info=exc)
    return internal_error("internal error while streaming" if when == MID_STREAM else "internal server error")


class Stream:
    """One generation in progress on `pool`. Iterate `deltas()`, `pieces()` or `growing()` once; `finish_reason`
    and `usage` are set by the final delta. The stream is closed when that iteration ends, however it ends, and on
    leaving `async with stream:`, which a caller that may abandon the iteration half-way holds it in."""

    def __init__(self, pool: str, first: TextDelta, rest, router: Router, resend_divisor: int = 0, n: int = 1,
                 model: str | None = None):
        self.pool = pool
        self.model = model or pool  # what the replies name: the pool, or the adapter as the request named it
        self._resend_divisor = resend_divisor
        self.n = n  # choices: the stream ends when each has had its final delta
        self.finish_reasons: dict[int, str] = {}  # choice index -> finish_reason
        self.usage: Usage | None = None  # the prompt's tokens once, every choice's completion tokens
        self._first, self._rest, self._router = first, rest, router
        self._closed = False

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._close()

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons.get(0)

    def _finished(self, delta: TextDelta) -> bool:
        """Note a choice's final delta; whether every choice has ended."""
        self.finish_reasons[delta.index] = delta.finish_reason
        if delta.usage is not None:
            if self.usage is None:
                self.usage = dataclasses.replace(delta.usage)
            else:  # the prompt is counted once
                self.usage.completion_tokens += delta.usage.completion_tokens
        return len(self.finish_reasons) >= self.n

    async def deltas(self) -> AsyncIterator[TextDelta]:
        """Every delta, the first included; an error delta raises APIError."""
        async with self:
            delta = self._first
            while True:
                if delta.error:
                    raise APIError.from_info(delta.error)
                done = bool(delta.finish_reason) and self._finished(delta)
                yield delta
                if done:
                    return
                try:
                    delta = await self._rest.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise pool_call_error(exc, self.pool, MID_STREAM) from exc

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it grows, in non-empty pieces."""
        async with self:
            async for delta in self.deltas():
                if delta.text:
                    yield delta.text

    async def growing(self) -> AsyncIterator[tuple[str, bool]]:
        """`(answer so far, last)` pairs for protocols that re-send the whole answer: at least one pair (an empty
        answer is still an answer), the last one the final answer with `last` true. The answer is sent when it has
        grown by at least len(answer last sent) // resend_divisor characters (at least one), so an answer of L
        characters costs about (divisor + 1) * L characters in all instead of L * L / 2 (0: every piece)."""
        async with self:
            text, sent = "", ""
            async for delta in self.deltas():
                text += delta.text
                last = bool(delta.finish_reason)
                step = max(1, len(sent) // self._resend_divisor) if self._resend_divisor else 1
                if last or (delta.text and len(text) - len(sent) >= step):
                    sent = text
                    yield text, last
                    if last:
                        return
            yield text, True

    def __del__(self) -> None:
        # The last resort for a stream its handler opened but that nothing came to read or close (the handler
        # cancelled between `open()` and its response, a response object dropped unsent): the pool stops generating.
        if not getattr(self, "_closed", True):
            logger.warning("pool %s: a stream was dropped unread; stopping its generation", self.pool)
            self._close()

    def _close(self) -> None:
        """Stop the pool's generation (if it still runs) and release the routing slot; idempotent."""
        if not self._closed:
            self._closed = True
            self._router.finished(self.pool)
            self._rest.cancel()


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[LogprobEntry] | None = None


@dataclass
class Answer:
    pool: str
    choices: list[Choice]
    usage: Usage | None
    model: str = ""  # the pool, or the adapter as the request named it

    def __post_init__(self):
        self.model = self.model or self.pool

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


class PoolClient:
    def __init__(self, handles: dict, config: IngressConfig, caller: str | None = None):
        """`caller`: this ingress replica's Ray actor name, sent with each generation so that the pool stops it if
        this replica dies mid-stream (server/caller_watch.py)."""
        self.handles, self.caller = handles, caller
        # Cached once: `options(stream=True)` per request would rebuild the handle's state.
        self.streams = {(name, None): handle.options(stream=True) for name, handle in handles.items()}
        self.router = Router(handles, config.pool_names, config.default_pool, config.routing, config.adapters)
        self.resend_divisor = config.limits.resend_divisor

    async def open(self, model: str | None, request: TextRequest) -> Stream:
        """Route and start a generation, and wait for its first delta. Errors before any text raise APIError.

        Routed by the auto policy, a prompt that does not fit the pool's context is sent on to a pool with a longer
        one; when none is left, the 400 names the largest context there is."""
        pool, adapter = self.router.target(model)
        if adapter is not None:
            request = dataclasses.replace(request, adapter=adapter)
        tried: list[str] = []
        while True:
            try:
                return await self._open_on(pool, request, model if adapter is not None else None)
            except APIError as error:
                if error.code != "context_length_exceeded" or not self.router.routes_by_load(model):
                    raise
                tried.append(pool)
                longer = await self.router.longer_context(tried)
                if longer is None:
                    name, context = self.router.largest_context()
                    raise APIError("context_length_exceeded", f"{error.message} No model here holds it: the "
                                   f"longest context is {context} tokens ({name}).", param=error.param) from error
                pool = longer

    def _stream_handle(self, pool: str, adapter: str | None):
        """The pool's streaming handle; for an adapter, one that sets Serve's multiplexed model id, so that Serve
        routes to replicas that hold it (one per configured adapter and pool, made on first use)."""
        key = (pool, adapter)
        if key not in self.streams:
            self.streams[key] = self.handles[pool].options(stream=True, multiplexed_model_id=adapter)
        return self.streams[key]

    async def _open_on(self, pool: str, request: TextRequest, model: str | None = None) -> Stream:
        rest = None
        self.router.started(pool)
        try:
            handle = self._stream_handle(pool, request.adapter)
            rest = handle.generate.remote(dataclasses.replace(request, caller=self.caller))
            first = await rest.__anext__()
        except Exception as exc:
            error = pool_call_error(exc, pool, BEFORE_FIRST_TOKEN)
            # refused by backpressure before it started: nothing to cancel
            self._release(pool, None if isinstance(exc, BackPressureError) else rest)
            raise error from exc
        except BaseException:
            self._release(pool, rest)
            raise
        if first.error:
            self._release(pool, rest)
            raise APIError.from_info(first.error)
        return Stream(pool, first, rest, self.router, self.resend_divisor, request.n, model)

    def _release(self, pool: str, rest) -> None:
        self.router.finished(pool)
        if rest is not None:
            rest.cancel()  # a started generation that nobody will read

    async def collect(self, model: str | None, request: TextRequest) -> Answer:
        """The whole answer: each choice's text, finish_reason and (when asked for) logprobs."""
        choices = [Choice() for _ in range(request.n)]
        async with await self.open(model, request) as stream:
            pieces: list[list[str]] = [[] for _ in choices]
            async for delta in stream.deltas():
                pieces[delta.index].append(delta.text)
                if delta.logprobs is not None:
                    choice = choices[delta.index]
                    choice.logprobs = (choice.logprobs or []) + delta.logprobs
        for index, choice in enumerate(choices):
            choice.text, choice.finish_reason = "".join(pieces[index]), stream.finish_reasons.get(index)
            if request.params.logprobs is not None and choice.logprobs is None:
                choice.logprobs = []
        return Answer(stream.pool, choices, stream.usage, stream.model)

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
        except Exception as exc:
            raise pool_call_error(exc, pool, f"in {method}") from exc
        if result.error:  # the pool's own error, as data
            raise APIError.from_info(result.error)
        return result
