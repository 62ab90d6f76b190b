"""Which pool serves a request: the one it names, the configured default, or the `auto` policy.

`auto` prefers precision: it walks the pools from highest to lowest precision and takes the first with headroom,
overflowing to the quantized pools while the better ones are saturated. Load comes from each pool's engine stats
(polled in the background, one replica sampled per poll) corrected by the requests this ingress has sent since.
A prompt that does not fit the chosen pool's context goes on to a pool with a longer one (`longer_context`, used
by PoolClient.open when the pool answers `context_length_exceeded`), so a long-context pool takes the prompts that
the others cannot hold.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from serve_app.api.error_table import APIError
from serve_app.server.messages import ReplicaStats

AUTO = "auto"  # the policy's name; also accepted as a request's `model`, so no pool may be called that
ROUTING_POLICIES = Literal["default", "auto"]  # `routing:` of the app args


@dataclass
class PoolLoad:
    free_slots: int = 1
    waiting: int = 0
    in_flight: int = 0  # requests this ingress has open on the pool
    in_flight_at_poll: int = 0
    polled_at: float = 0.0
    reachable: bool = True
    max_seq_len: int = 0  # the pool's context, from its stats; 0 until polled

    def headroom(self) -> int:
        if not self.reachable:
            return 0
        sent_since = max(0, self.in_flight - self.in_flight_at_poll)
        return self.free_slots - self.waiting - sent_since


class Router:
    def __init__(self, handles: dict, order: list[str], default_model: str, policy: str,
                 adapters: dict[str, list[str]] | None = None, poll_interval_s: float = 0.5):
        """`adapters`: adapter name -> the pools it is enabled on, first one first (the app's `adapters:`)."""
        self.handles = handles
        self.adapters = adapters or {}
        self.order = order  # highest precision first
        self.default_model = default_model
        self.policy = policy
        self.poll_interval_s = poll_interval_s
        self.load = {name: PoolLoad() for name in order}
        self._poller: asyncio.Task | None = None

    def target(self, model: str | None) -> tuple[str, str | None]:
        """(pool, adapter) for a request's `model`: a pool, `auto` or nothing (no adapter; the policy or the default
        picks the pool), an adapter's name (on its first enabled pool) or `<pool>:<adapter>`; 404 for anything
        else."""
        if not model:
            model = AUTO if self.policy == AUTO else self.default_model
        if model == AUTO:
            self._ensure_polling()
            return self.pick_auto(), None
        if model in self.handles:
            return model, None
        pool, colon, adapter = model.rpartition(":")
        enabled = self.adapters.get(adapter)
        if enabled and (not colon or pool in enabled):
            return pool or enabled[0], adapter
        raise APIError("model_not_found", f"The model '{model}' does not exist; available: "
                       f"{', '.join(self.model_names())}", param="model")

    def resolve(self, model: str | None) -> str:
        """The pool that serves a request's `model` (an adapter's name gives its pool); 404 for an unknown name."""
        return self.target(model)[0]

    def model_names(self) -> list[str]:
        """Every name a request's `model` may take (GET /v1/models lists them)."""
        names = list(self.order) + [AUTO]
        for adapter, pools in self.adapters.items():
            names += [adapter] + [f"{pool}:{adapter}" for pool in pools]
        return names

    def routes_by_load(self, model: str | None) -> bool:
        """Whether a request's `model` leaves the pool to the auto policy (a named pool is never changed)."""
        return model == AUTO or (not model and self.policy == AUTO)

    async def longer_context(self, tried: list[str]) -> str | None:
        """For a prompt that did not fit the pools in `tried`: the first other pool, by precision (those with headroom
        first), whose context is longer than theirs; None when there is none."""
        if not all(self.load[name].max_seq_len for name in self.order):
            await asyncio.gather(*(self._poll(name) for name in self.order))
        needed = max(self.load[name].max_seq_len for name in tried)
        longer = [name for name in self.order if name not in tried and self.load[name].max_seq_len > needed]
        with_room = [name for name in longer if self.load[name].headroom() > 0]
        return (with_room or longer or [None])[0]

    def largest_context(self) -> tuple[str, int]:
        """The pool with the longest context, as last polled, and that context."""
        name = max(self.order, key=lambda name: self.load[name].max_seq_len)
        return name, self.load[name].max_seq_len

    def pick_auto(self) -> str:
        for name in self.order:
            if self.load[name].headroom() > 0:
                return name
        # Everything is saturated: the pool with the most headroom queues it (Serve's backpressure applies).
        return max(self.order, key=lambda name: self.load[name].headroom())

    def started(self, name: str) -> None:
        self.load[name].in_flight += 1

    def finished(self, name: str) -> None:
        self.load[name].in_flight -= 1

    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(name) for name in self.order))
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, name: str) -> None:
        load = self.load[name]
        try:
            async with asyncio.timeout(2.0):  # not wait_for, which can drop a cancellation on 3.11 (coalescing.py)
                stats: ReplicaStats = await self.handles[name].engine_stats.remote()
        except Exception:  # overloaded (backpressure), restarting or unreachable: no headroom for now
            load.reachable = False
            return
        load.reachable = True
        load.free_slots, load.waiting = stats.engine.free_slots, stats.engine.waiting
        load.max_seq_len = stats.engine.max_seq_len
        load.in_flight_at_poll = load.in_flight
        load.polled_at = time.monotonic()
