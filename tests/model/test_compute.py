"""The compute thread: the model's torch work runs on one thread whoever asks (serve_app/model/compute.py)."""

from __future__ import annotations

import asyncio
import threading

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
