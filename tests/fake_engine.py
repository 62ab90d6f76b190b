"""A fake engine for the tests of the Serve graph (routing, backpressure, error mapping over Ray, resilience,
placement and autoscaling): everything the pool deployment does around its engine stays real (the tokenizer, prompt
building, stop strings, coalescing, metrics, Ray, the proxies), only the model is not there.

    config = local_config(checkpoint, fake_engine={"token_delay_s": 0.005})   # tests/serving.py
    # import_path tests.fake_engine:build_fake_app: `build_graph` with `engine_factory=FakeFactory(settings)`

`FakeEngine` keeps the real engine's contract (serve_app/engine/engine.py): the same token budget and errors raised at
once (`token_budget`), `max_batch_size` sequences at a time with up to `max_waiting` more queued and `EngineOverloaded`
past that, one `TokenDelta` per token with the last carrying `finish_reason` and `RequestStats`, and closing the
iterator frees the sequence. Its reply is the prompt's own token ids (past the [gMASK] sop prefix), one every
`token_delay_s`, repeated until the request's budget: a streamed text a test can predict, at a pace a test can set.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from serve_app.app import build_graph
from serve_app.config import AppArgs, PoolConfig
from serve_app.engine.engine import REPLICA_FAILED_MESSAGE
from serve_app.engine.errors import EngineOverloaded, InvalidRequest, ReplicaFailed
from serve_app.engine.outputs import EngineStats, RequestStats, TokenDelta
from serve_app.engine.params import SamplingParams, token_budget
from serve_app.model.checkpoint import read_config
from serve_app.model.tokenizer import ChatGLM2Tokenizer
from serve_app.server.engine_factory import ReplicaEngine, ensure_checkpoint

PREFIX_TOKENS = 2  # [gMASK] sop


@dataclass(frozen=True)
class FakeSettings:
    token_delay_s: float = 0.002  # between two tokens of a sequence
    max_reply_tokens: int | None = None  # end with "stop" after this many tokens (default: run to the budget)
    # A prompt holding this token id breaks the engine for good, as a device fault does (serve_app/engine/engine.py
    # `_stop_for_good`): the request fails with ReplicaFailed and healthy() turns False, so Serve replaces the replica.
    unfit_token: int | None = None


class FakeEngine:
    def __init__(self, config: PoolConfig, settings: FakeSettings):
        model = read_config(config.checkpoint)
        self.engine_config, self.settings = config.engine, settings
        self.max_seq_len = config.engine.max_seq_len_for(model.seq_length)
        self.failure: str | None = None
        self._slots = asyncio.Semaphore(config.engine.max_batch_size)
        self._running = self._waiting = self._total = 0
        self._in_use_tokens = 0
        self._finished: Counter[str] = Counter()

    def healthy(self) -> bool:
        return self.failure is None

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        if self.failure is None and self.settings.unfit_token in prompt_ids:
            self.failure = "simulated device fault"
        if self.failure is not None:
            raise ReplicaFailed(REPLICA_FAILED_MESSAGE)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        budget = token_budget(len(prompt_ids), params, self.max_seq_len)  # raises ContextLengthExceeded
        return self._stream(list(prompt_ids), budget)

    async def _stream(self, prompt_ids: list[int], budget: int):
        free = self.engine_config.max_batch_size - self._running
        if self._waiting - max(free, 0) >= self.engine_config.max_waiting:
            raise EngineOverloaded(f"{self._waiting} requests are waiting; retry later")
        arrival, reason, first_at, sent = time.perf_counter(), "abort", None, 0
        self._total += 1
        self._waiting += 1
        admitted = False
        try:
            await self._slots.acquire()
            admitted = True
            self._waiting -= 1
            self._running += 1
            self._in_use_tokens += len(prompt_ids)
            reply = prompt_ids[PREFIX_TOKENS:] or prompt_ids
            limit = min(budget, self.settings.max_reply_tokens or budget)
            while sent < limit:
                await asyncio.sleep(self.settings.token_delay_s)
                sent += 1
                self._in_use_tokens += 1
                first_at = first_at or time.perf_counter()
                if sent < limit:
                    yield TokenDelta([reply[(sent - 1) % len(reply)]])
            reason = "length" if limit == budget else "stop"
            now = time.perf_counter()
            yield TokenDelta([reply[(sent - 1) % len(reply)]], reason, RequestStats(
                len(prompt_ids), sent, 0, first_at - arrival if first_at else None,
                (sent - 1) / (now - first_at) if sent > 1 and now > first_at else 0.0, now - arrival))
        finally:
            if admitted:
                self._running -= 1
                self._in_use_tokens -= len(prompt_ids) + sent
                self._slots.release()
            else:
                self._waiting -= 1
            self._finished[reason] += 1

    def stats(self) -> EngineStats:
        slots = self.engine_config.max_batch_size
        return EngineStats(
            running=self._running, waiting=self._waiting, free_slots=slots - self._running, num_slots=slots,
            max_seq_len=self.max_seq_len, kv_tokens_in_use=self._in_use_tokens,
            kv_capacity_tokens=slots * self.max_seq_len, kv_cache_bytes=0, cached_blocks=0,
            total_requests=self._total, finished=dict(self._finished), steps=0, decode_path="fake")


@dataclass(frozen=True)
class FakeFactory:
    """The `engine_factory` a fake app's pools get (picklable: Ray sends it to every replica)."""

    settings: FakeSettings

    def __call__(self, config: PoolConfig) -> ReplicaEngine:
        ensure_checkpoint(config.checkpoint, config.demo_preset)
        return ReplicaEngine(FakeEngine(config, self.settings), ChatGLM2Tokenizer(config.checkpoint))


def build_fake_app(args: dict[str, Any]):
    """The Serve `import_path` target of a fake-engine config: the app's args plus `fake_engine:` (FakeSettings)."""
    args = dict(args)
    settings = FakeSettings(**(args.pop("fake_engine", None) or {}))
    return build_graph(AppArgs.model_validate(args), engine_factory=FakeFactory(settings))
