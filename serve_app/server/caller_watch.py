"""Generations whose reader died are stopped: a pool replica watches the ingress replicas that call it.

Ray does not cancel an actor task when the actor that called it dies: a pool replica streaming to an ingress replica
that was killed (its node lost, OOM, a crash) would go on generating to the request's token budget, holding a batch
slot and KV for nobody. Each `TextRequest` names its caller (the ingress replica's actor name, `caller`); while a
stream runs, `CallerWatch` looks its caller up every `period_s` (one lookup per distinct caller, off the event loop)
and cancels the streams of a caller that is gone, which closes their engine streams (the engine aborts them).

A lookup that fails for another reason than "no such actor" (the GCS briefly unreachable, as while the head node
restarts) counts as alive: only a caller known to be gone stops anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator

logger = logging.getLogger("ray.serve")

SERVE_NAMESPACE = "serve"  # the Ray namespace Serve's replica actors are named in


def actor_alive(name: str) -> bool:
    """Whether the named Serve replica actor exists (a dead actor's name is released)."""
    import ray

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:  # "Failed to look up actor with name ..."
        return False
    except Exception:  # noqa: BLE001 (any other failure of the lookup says nothing about the caller)
        logger.warning("could not look up caller %s; taking it as alive", name, exc_info=True)
    return True


class CallerWatch:
    def __init__(self, period_s: float = 2.0, is_alive: Callable[[str], bool] = actor_alive):
        self.period_s, self.is_alive = period_s, is_alive
        self._streams: dict[str, set[asyncio.Task]] = defaultdict(set)
        self._loop_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def watching(self, caller: str | None) -> Iterator[None]:
        """Within this block the current task is cancelled if `caller` is found gone (None: not watched)."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield
            return
        self._streams[caller].add(task)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            streams = self._streams.get(caller)
            if streams is not None:
                streams.discard(task)
                if not streams:
                    del self._streams[caller]

    async def _watch(self) -> None:
        while self._streams:
            await asyncio.sleep(self.period_s)
            for caller in list(self._streams):
                if await asyncio.to_thread(self.is_alive, caller):
                    continue
                streams = self._streams.pop(caller, set())
                logger.warning("caller %s is gone: stopping its %d stream(s)", caller, len(streams))
                for task in streams:
                    task.cancel()
