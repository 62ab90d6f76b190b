"""CallerWatch (server/caller_watch.py): streams of a caller found gone are cancelled, the others run on. Fast."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.server.caller_watch import CallerWatch, actor_alive


def test_only_the_streams_of_a_dead_caller_are_cancelled():
    alive = {"ingress-a": True, "ingress-b": True}
    watch = CallerWatch(period_s=0.01, is_alive=lambda name: alive[name])

    async def stream(caller: str | None, steps: int) -> str:
        with watch.watching(caller):
            for _ in range(steps):
                await asyncio.sleep(0.01)
        return "done"

    async def main():
        tasks = [asyncio.create_task(stream(c, 30)) for c in ("ingress-a", "ingress-a", "ingress-b", None)]
        await asyncio.sleep(0.05)
        alive["ingress-a"] = False
        return await asyncio.gather(*tasks, return_exceptions=True)

    a1, a2, b, unwatched = asyncio.run(main())
    assert isinstance(a1, asyncio.CancelledError) and isinstance(a2, asyncio.CancelledError)
    assert b == "done" and unwatched == "done"
    assert not watch._streams  # nothing left registered


def test_a_stream_that_ends_is_forgotten_and_the_watch_stops():
    calls = []
    watch = CallerWatch(period_s=0.01, is_alive=lambda name: calls.append(name) or True)

    async def main():
        with watch.watching("ingress-a"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)
        return watch._loop_task.done()

    assert asyncio.run(main()) and not watch._streams and calls


@pytest.mark.parametrize(("error", "alive"), [(ValueError("Failed to look up actor"), False),
                                              (ConnectionError("GCS unreachable"), True)])
def test_only_a_missing_actor_counts_as_dead(monkeypatch, error, alive):
    import ray

    def get_actor(name, namespace=None):
        raise error

    monkeypatch.setattr(ray, "get_actor", get_actor)
    assert actor_alive("SERVE_REPLICA::chatglm2#ChatIngress#x") is alive
