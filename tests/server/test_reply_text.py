"""ReplyText / StopStringMatcher: a reply streamed in any chunking reads as the tokenizer's decode of the whole
reply, cut before the first stop string (OpenAI's `stop`: the stop string itself is not returned)."""

from __future__ import annotations

import random

import pytest

from serve_app.engine.outputs import RequestStats, TokenDelta
from serve_app.server.reply_text import ReplyText, StopStringMatcher


def _reference(full: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (full.find(s) for s in stops if s) if i >= 0]
    return (full[: min(hits)], True) if hits else (full, False)


def _stream(tokenizer, ids: list[int], stops: list[str], chunks: list[int], finish: str = "length"):
    reply = ReplyText(tokenizer, stops, prompt_tokens=7)
    out, at = [], 0
    for size in chunks:
        piece, at = ids[at:at + size], at + size
        last = at >= len(ids)
        stats = RequestStats(7, len(ids), 3, 0.1, 1.0, 1.0) if last else None
        delta = reply.push(TokenDelta(piece, finish if last else None, stats))
        if delta is not None:
            out.append(delta)
        if reply.finished:
            break
    return out, reply


@pytest.mark.parametrize("seed", range(8))
def test_any_chunking_streams_the_decoded_reply_cut_at_the_first_stop(tiny_tokenizer, seed):
    rng = random.Random(seed)
    text = "你好，今天天气很好。Hello world! 第二句话。stop here and more text"
    ids = tiny_tokenizer.encode(text)
    full = tiny_tokenizer.decode(ids)
    stops = rng.choice([[], ["。"], ["world", "天气"], ["zzz"], ["stop here"], ["好。H"]])
    chunks, left = [], len(ids)
    while left > 0:
        chunks.append(min(left, rng.randint(1, 4)))
        left -= chunks[-1]
    deltas, reply = _stream(tiny_tokenizer, ids, stops, chunks)
    expected, hit = _reference(full, stops)
    assert "".join(d.text for d in deltas) == expected
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1  # exactly the last one finishes
    final = deltas[-1]
    assert final.finish_reason == ("stop" if hit else "length")
    assert final.usage.prompt_tokens == 7 and final.usage.cached_prompt_tokens == (0 if hit else 3)
    assert final.usage.completion_tokens == reply.completion_tokens <= len(ids)
    assert all(d.text for d in deltas[:-1])  # nothing empty is sent before the end


def test_a_tail_that_may_become_a_stop_string_is_held_back_then_released():
    matcher = StopStringMatcher(["END"])
    # The last len("END") - 1 characters wait: with what comes next they could still be "END".
    assert matcher.feed("abcE", final=False) == ("ab", False)
    assert matcher.feed("N", final=False) == ("c", False)
    assert matcher.feed("X", final=False) == ("E", False)  # "ENX": no longer a stop, "E" goes out
    assert matcher.feed("", final=True) == ("NX", False)
    assert StopStringMatcher(["END"]).feed("abEND tail", final=False) == ("ab", True)
    assert StopStringMatcher([]).feed("all of it", final=False) == ("all of it", False)


def test_an_engine_stop_keeps_its_reason_and_a_finished_reply_takes_no_more(tiny_tokenizer):
    ids = tiny_tokenizer.encode("你好")
    deltas, reply = _stream(tiny_tokenizer, ids, [], [len(ids)], finish="stop")
    assert deltas[-1].finish_reason == "stop" and deltas[-1].text == tiny_tokenizer.decode(ids)
    with pytest.raises(AssertionError):
        reply.push(TokenDelta([ids[0]]))
