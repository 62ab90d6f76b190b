"""Stream coalescing: text deltas that come close together travel together from a pool to the ingress.

Every item a pool yields is one message replica -> ingress (and the ingress's SSE chunk one more, ingress -> proxy),
and that path's cost per message, not the model, bounds a fast pool (docs/benchmarks.md, "A fast engine"). So a
delta that comes within `window_s` of the stream's previous message waits up to `window_s` for the ones that follow
it and travels with them. A delta that comes later than that is sent at once, with any others already waiting: a
slow stream (a token per engine step, steps longer than the window) is never delayed, where waiting would only add
the window to every token. No delta waits longer than `window_s`.

What clients receive does not change: the merged deltas concatenate to the same text, the final delta keeps its
finish_reason and usage, and an error still comes last, after the text before it. The first delta is sent the moment
it is ready (time to first token is never traded for fewer messages), and so is the final one. Closing the coalesced
stream (a client that went away) closes the source at once, which is what stops the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve_app.server.messages import TextDelta

_END = object()  # the source is exhausted


def merge(deltas: list[TextDelta]) -> TextDelta:
    """Text deltas of one choice (none but the last may be final or an error) as one: their text and logprobs, the
    last one's ending."""
    last = deltas[-1]
    if len(deltas) == 1:
        return last
    logprobs = [entry for delta in deltas for entry in delta.logprobs or []] if last.logprobs is not None or any(
        delta.logprobs for delta in deltas) else None
    return TextDelta("".join(delta.text for delta in deltas), last.finish_reason, last.usage, last.error, logprobs,
                     last.index)


def _ends(delta: TextDelta) -> bool:
    return bool(delta.finish_reason or delta.error)


async def coalesce(source: AsyncIterator[TextDelta], window_s: float) -> AsyncIterator[TextDelta]:
    """`source`'s deltas, merged where they come within `window_s` of each other (see the module docstring).

    With `window_s <= 0` the source passes through untouched. An exception raised by the source is raised here
    after the deltas that came before it.
    """
    if window_s <= 0:
        async for delta in source:
            yield delta
        return
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for delta in source:
                ready.put_nowait(delta)
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, in order)
            ready.put_nowait(exc)
        finally:
            ready.put_nowait(_END)

    pumping = loop.create_task(pump())
    first, held, last_sent = True, None, 0.0
    try:
        while True:
            item, held = (held, None) if held is not None else (await ready.get(), None)
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            batch = [item]
            now = loop.time()
            # A window for company, unless the stream's previous message is a window old (then only what is waiting).
            deadline = now + window_s if now - last_sent < window_s else now
            # Gather more unless this is the first delta or the last one; stop at an ending, an error or the deadline.
            while not first and not _ends(batch[-1]):
                try:
                    nxt = ready.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns a value that arrives
                        # together with a cancellation and drops the cancellation, and the engine runs on for a
                        # client that went away (tests/server/test_coalescing.py).
                        async with asyncio.timeout(remaining):
                            nxt = await ready.get()
                    except TimeoutError:
                        break
                if nxt is _END or isinstance(nxt, Exception) or nxt.error or nxt.index != batch[0].index:
                    held = nxt  # sent after this batch's text, as it came (another choice's: in its own message)
                    break
                batch.append(nxt)
            first = False
            last_sent = loop.time()
            yield merge(batch)
    finally:
        pumping.cancel()  # closes `source`: the engine stops generating for a client that went away
        await asyncio.wait({pumping})  # unlike awaiting it, keeps a cancellation of this task itself
