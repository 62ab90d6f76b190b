"""Stream coalescing keeps what clients receive: the first delta at once, the same text, the ending intact, and a
cancelled stream still stops its source (the engine); a fast stream's deltas travel in about one message per window
and a slow stream's are never held. No Ray: the coalescer is plain asyncio.

"At once" is shown by a source that waits for the consumer to have the delta before it goes on (a coalescer that
held the delta would never get it), with a generous deadlock guard. The two pacing tests use windows of 0.2-2 s, so
their bounds hold with wide margins on a loaded machine; nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.server.coalescing import coalesce
from serve_app.server.messages import ErrorInfo, TextDelta, Usage

WINDOW_S = 0.005
GUARD_S = 30.0  # only against a hang; never reached when the coalescer is right


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD_S))


async def collect(stream) -> list[TextDelta]:
    return [delta async for delta in stream]


async def burst(texts: list[str], usage: Usage) -> None:
    """A source whose deltas are all ready together (it never waits), then the final delta with usage."""
    for text in texts:
        yield TextDelta(text)
    yield TextDelta("!", "length", usage)


def test_deltas_ready_together_travel_together_and_concatenate_to_the_same_text():
    usage = Usage(7, 9)
    texts = ["你", "好", " wor", "ld", "\n", "x"] * 4
    out = run(collect(coalesce(burst(texts, usage), WINDOW_S)))
    assert "".join(d.text for d in out) == "".join(texts) + "!"
    assert out[0].text == texts[0]  # the first alone: it was sent before the rest were looked at
    assert len(out) == 2  # the rest were waiting together: one message
    assert out[-1].finish_reason == "length" and out[-1].usage == usage
    assert all(d.finish_reason is None and d.usage is None for d in out[:-1])


def test_a_zero_window_passes_every_delta_through():
    texts = ["a", "b", "c"]
    out = run(collect(coalesce(burst(texts, Usage(1, 4)), 0)))
    assert [d.text for d in out] == [*texts, "!"]


def test_the_first_delta_is_sent_before_the_source_goes_on():
    received = asyncio.Event()

    async def source():
        yield TextDelta("first")
        await received.wait()  # the consumer must already have "first"
        yield TextDelta("second")
        yield TextDelta("", "stop", Usage(1, 2))

    async def consume():
        out = []
        async for delta in coalesce(source(), WINDOW_S):
            out.append(delta)
            received.set()
        return out

    out = run(consume())
    assert out[0].text == "first" and "".join(d.text for d in out) == "firstsecond"
    assert out[-1].finish_reason == "stop"


def test_a_delta_waits_at_most_the_window_for_company():
    """A delta whose successor is not coming is sent after the window, not held for the next one."""
    got_second = asyncio.Event()

    async def source():
        yield TextDelta("a")
        yield TextDelta("b")
        await got_second.wait()  # nothing more until the consumer has "b"
        yield TextDelta("c", "stop", Usage(1, 3))

    async def consume():
        out = []
        async for delta in coalesce(source(), WINDOW_S):
            out.append(delta.text)
            if "b" in delta.text:
                got_second.set()
        return out

    assert "".join(run(consume())) == "abc"


def test_a_delta_a_window_after_the_previous_message_is_not_held():
    """A slow stream's deltas (further apart than the window) go at once: waiting a window for company that is not
    coming only delays them (the coalescer before this held each one for the whole window, here 2 s)."""
    window_s = 2.0
    delays: list[float] = []

    async def source():
        loop = asyncio.get_running_loop()
        yield TextDelta("a")
        for text in "bc":
            await asyncio.sleep(window_s * 1.25)  # more than a window after the previous message
            sent = loop.time()
            yield TextDelta(text)
            while await received.get() != text:  # until the consumer has it
                pass
            delays.append(loop.time() - sent)
        yield TextDelta("", "stop", Usage(1, 3))

    async def consume():
        out = []
        async for delta in coalesce(source(), window_s):
            out.append(delta.text)
            received.put_nowait(delta.text)
        return out

    received: asyncio.Queue = asyncio.Queue()
    assert run(consume()) == ["a", "b", "c", ""]
    assert max(delays) < window_s / 2, delays  # sent at once (ms), not after the window (2 s)


def test_a_fast_stream_travels_in_about_one_message_per_window():
    window_s = 0.2

    async def source():
        for _ in range(40):  # a token every 10 ms: ~0.4 s of tokens
            yield TextDelta("x")
            await asyncio.sleep(0.01)
        yield TextDelta("", "stop", Usage(1, 40))

    out = run(collect(coalesce(source(), window_s)))
    assert "".join(d.text for d in out) == "x" * 40
    assert len(out) <= 6, [d.text for d in out]  # the first alone, then ~one per 0.2 s (a slower machine: fewer)


def test_an_error_comes_last_after_the_text_before_it():
    async def source():
        yield TextDelta("a")
        yield TextDelta("b")
        yield TextDelta("c")
        yield TextDelta(error=ErrorInfo("generation_error", "NaN logits"))

    out = run(collect(coalesce(source(), WINDOW_S)))
    assert "".join(d.text for d in out) == "abc"
    assert out[-1].error.code == "generation_error" and out[-1].text == ""
    assert all(d.error is None for d in out[:-1])


def test_an_exception_from_the_source_is_raised_after_the_deltas_before_it():
    async def source():
        yield TextDelta("a")
        yield TextDelta("b")
        raise RuntimeError("boom")

    async def consume(out):
        async for delta in coalesce(source(), WINDOW_S):
            out.append(delta.text)

    out: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        run(consume(out))
    assert "".join(out) == "ab"


def test_closing_the_coalesced_stream_closes_the_source():
    closed = asyncio.Event()

    async def source():
        try:
            while True:
                yield TextDelta("x")
                await asyncio.sleep(0)
        finally:
            closed.set()

    async def consume():
        stream = coalesce(source(), WINDOW_S)
        async for _ in stream:
            break
        await stream.aclose()
        return closed.is_set()

    assert run(consume())


def test_cancelling_a_coalesced_engine_stream_frees_the_engine(tiny_fp32, tiny_tokenizer):
    """The invariant that matters to a pool: a client that went away stops the engine and frees its slot."""

    async def scenario():
        engine = Engine(tiny_fp32, EngineConfig(max_batch_size=2, max_seq_len=256))
        prompt = tiny_tokenizer.prefix_ids() + tiny_tokenizer.encode("hello")

        async def texts():
            async for delta in engine.generate(prompt, SamplingParams(max_new_tokens=200, ignore_eos=True)):
                yield TextDelta("t" * len(delta.token_ids), delta.finish_reason)

        stream = coalesce(texts(), WINDOW_S)
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):  # the worker finishes an aborted sequence at its next step
            stats = engine.stats()
            if stats.running == 0 and stats.free_slots == 2:
                break
            await asyncio.sleep(0.05)
        await engine.shutdown()
        return stats

    stats = run(scenario())
    assert stats.running == 0 and stats.free_slots == 2 and stats.finished.get("abort") == 1


def test_cancelling_the_consumer_mid_window_is_never_swallowed():
    """A client that goes away cancels the task reading the pool's stream (Serve injects the cancellation); it must
    end that task and close the source whatever the coalescer was awaiting at that moment. The sweep cancels at
    every tick offset of a source that has a delta ready on every tick (so cancellations land while a delta is
    arriving, the race in which Python 3.11's asyncio.wait_for returns the value and drops the cancellation)."""

    async def scenario(ticks: int) -> tuple[bool, bool]:
        closed = asyncio.Event()

        async def source():
            try:
                for _ in range(5_000):
                    yield TextDelta("x")
                    await asyncio.sleep(0)
            finally:
                closed.set()

        async def consume():
            async for _ in coalesce(source(), 0.05):
                pass

        task = asyncio.ensure_future(consume())
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled(), closed.is_set()

    outcomes = {ticks: run(scenario(ticks)) for ticks in range(1, 120)}
    assert {ticks: o for ticks, o in outcomes.items() if o != (True, True)} == {}
