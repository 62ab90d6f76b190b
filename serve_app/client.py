"""Client side of the service's streams, shared by the CLI chat, the load testers and the scripts.

An OpenAI stream is Server-Sent Events whose `data:` lines hold JSON chunks and end with `data: [DONE]`; an error
after the first token arrives as a chunk with an `error` object instead.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

DONE = "[DONE]"


class StreamError(RuntimeError):
    """The stream ended with an error event; `error` is its OpenAI-style error object."""

    def __init__(self, error: dict):
        super().__init__(error.get("message", str(error)))
        self.error = error


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for any other line (event names, comments, blank separators)."""
    return line[5:].strip() if line.startswith("data:") else None


def openai_event(line: str) -> dict | str | None:
    """One line of an OpenAI stream -> its JSON chunk, DONE, or None for a line that carries no data."""
    data = sse_data(line)
    if data is None or data == DONE:
        return data
    return json.loads(data)


def _chunk(event: dict) -> dict:
    if "error" in event:
        raise StreamError(event["error"])
    return event


def openai_chunks(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON chunks of an OpenAI stream up to DONE; an error event raises StreamError."""
    for line in lines:
        event = openai_event(line)
        if event == DONE:
            return
        if event is not None:
            yield _chunk(event)


async def aopenai_chunks(lines: AsyncIterable[str]) -> AsyncIterator[dict]:
    """`openai_chunks` for an async line iterator (httpx's `aiter_lines`)."""
    async for line in lines:
        event = openai_event(line)
        if event == DONE:
            return
        if event is not None:
            yield _chunk(event)
