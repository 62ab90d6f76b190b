"""The compute thread: the model's torch work runs on one thread whoever asks (serve_app/model/compute.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.sequential import generate
from serve_app.model import compute
from serve_app.model.loader import load_model


def test_jobs_from_any_thread_run_on_the_one_compute_thread():
    seen = []
    callers = [threading.Thread(target=lambda: seen.append(compute.run(threading.current_thread))) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    seen.append(compute.run(threading.current_thread))
    assert len(set(seen)) == 1
    assert seen[0] is not threading.current_thread() and seen[0].name.startswith("torch-compute")
    assert not compute.on_compute_thread()


def test_a_job_that_runs_a_job_does_not_wait_for_itself():
    assert compute.run(lambda: compute.run(lambda: compute.on_compute_thread())) is True


def test_a_jobs_exception_reaches_the_caller_and_the_thread_carries_on():
    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        compute.run(fail)
    assert compute.run(lambda: 42) == 42


def test_loading_engine_steps_and_sequential_generation_all_run_on_the_compute_thread(tiny_checkpoint, monkeypatch):
    from serve_app.model import loader

    load_threads = set()
    pack = loader.pack_linears

    def recording_pack(model):
        load_threads.add(threading.current_thread())
        return pack(model)

    monkeypatch.setattr(loader, "pack_linears", recording_pack)
    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    forward_threads = set()
    forward = loaded.model.forward_packed

    def recording_forward(*args, **kwargs):
        forward_threads.add(threading.current_thread())
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward_packed", recording_forward)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    generate(loaded, [5, 6, 7], params)

    async def through_the_engine():
        engine = Engine(loaded, EngineConfig(2, 32))
        async for _ in engine.generate([5, 6, 7], params):
            pass
        await engine.shutdown()

    asyncio.run(through_the_engine())
    assert load_threads == forward_threads == {compute.run(threading.current_thread)}


def _until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_a_loop_steps_on_the_compute_thread_while_busy_and_sleeps_until_woken():
    calls, threads, busy_for = [], set(), [3]

    def step():
        calls.append(time.monotonic())
        threads.add(threading.current_thread())
        busy_for[0] -= 1
        return busy_for[0] > 0

    loop = compute.serve(step, name="test")
    assert _until(lambda: len(calls) == 3)
    time.sleep(0.05)
    assert len(calls) == 3  # idle: not called again without a wake
    busy_for[0] = 2
    loop.wake()
    assert _until(lambda: len(calls) == 5)
    assert threads == {compute.run(threading.current_thread)} and loop.alive
    loop.stop()
    assert loop.stopped.result(timeout=5) is None and not loop.alive
    loop.wake()
    assert compute.run(lambda: 1) == 1 and len(calls) == 5  # a stopped loop is never called again


def test_jobs_run_between_the_steps_of_a_busy_loop():
    steps = []
    loop = compute.serve(lambda: steps.append(1) or True, name="always-busy")
    try:
        for _ in range(3):
            before = len(steps)
            assert compute.run(lambda: 42) == 42
            assert _until(lambda: len(steps) > before)  # the loop still steps after each job
    finally:
        loop.stop()
    loop.stopped.result(timeout=5)


def test_a_loop_whose_step_raises_is_stopped_and_the_thread_carries_on():
    def step():
        raise ValueError("loop boom")

    loop = compute.serve(step, name="failing")
    with pytest.raises(ValueError, match="loop boom"):
        loop.stopped.result(timeout=5)
    assert not loop.alive
    assert compute.run(lambda: 7) == 7
