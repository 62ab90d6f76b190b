"""The continuous-batching engine on the tiny checkpoint (CPU): batched tokens equal one-at-a-time tokens, a seed
fixes a request's tokens whatever shares the batch, cancellation and errors leave the engine clean, limits raise
their documented errors, and prefix caching reuses KV without changing tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from serve_app.engine import sequential
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.errors import (
    ContextLengthExceeded,
    EngineOverloaded,
    GenerationError,
    InvalidRequest,
    ReplicaFailed,
)
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner
from serve_app.model.attention import CompileLimitHit


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_new_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **fields)


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, request_id: str | None = None):
    """(all token ids, every delta)."""
    deltas = [delta async for delta in engine.generate(prompt, params, request_id)]
    return [token for delta in deltas for token in delta.token_ids], deltas


async def wait_until_empty(engine: Engine, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats()).running or stats.waiting:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    return stats


@pytest.fixture
def make_engine(tiny_fp32):
    engines = []

    def make(loaded=None, **config) -> Engine:
        config.setdefault("max_seq_len", 256)
        if config.get("attention") != "flex":  # small blocks, so that sequences here span several
            config.setdefault("block_size", 8)
        engine = Engine(loaded or tiny_fp32, EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.shutdown())


class GatedModel:
    """Wraps the model: each packed forward waits for `gate`; the first one of `fail_tokens` tokens raises `error`."""

    def __init__(self, model, fail_tokens: int | None = None, error: Exception | None = None):
        self.model = model
        self.gate = threading.Event()
        self.gate.set()
        self.fail_tokens = fail_tokens
        self.error = error or RuntimeError("simulated device failure")

    def __getattr__(self, name):  # parameters(), buffers() ...: the wrapped model's
        return getattr(self.model, name)

    def forward_packed(self, plan, *args, **kwargs):
        self.gate.wait(timeout=10)
        if plan.num_tokens == self.fail_tokens:
            self.fail_tokens = None
            raise self.error
        return self.model.forward_packed(plan, *args, **kwargs)


def test_concurrent_greedy_equals_one_at_a_time(make_engine, tiny_fp32):
    # 4 slots for 8 requests: later requests join mid-run; a 16-token prefill chunk splits the long prompts.
    engine = make_engine(max_batch_size=4, prefill_chunk=16)
    lengths, budgets = (3, 9, 17, 33, 5, 60, 21, 12), (5, 12, 7, 20, 3, 16, 9, 11)
    prompts = [random_prompt(n, seed) for seed, n in enumerate(lengths)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(n)) for p, n in zip(prompts, budgets)))

    for (tokens, deltas), prompt, budget in zip(asyncio.run(main()), prompts, budgets):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(budget)).token_ids
        assert all(len(delta.token_ids) == 1 for delta in deltas)
        assert [d.finish_reason for d in deltas] == [None] * (budget - 1) + ["length"]
        stats = deltas[-1].stats
        assert (stats.prompt_tokens, stats.completion_tokens) == (len(prompt), budget)
        assert stats.ttft_s > 0 and stats.total_s >= stats.ttft_s
    stats = engine.stats()
    assert stats.finished == {"length": 8} and stats.running == 0 and stats.total_requests == 8


def test_stop_token_and_max_length(make_engine, tiny_fp32):
    engine = make_engine()
    prompt = random_prompt(10, 1)
    reference = sequential.generate(tiny_fp32, prompt, greedy(12)).token_ids
    stop = reference[4]
    tokens, deltas = asyncio.run(collect(engine, prompt, greedy(12, stop_token_ids=(stop,))))
    assert tokens == reference[: reference.index(stop) + 1] and deltas[-1].finish_reason == "stop"
    # max_length counts the prompt too (the official meaning).
    tokens, deltas = asyncio.run(collect(engine, prompt, SamplingParams(max_length=13, ignore_eos=True)))
    assert tokens == reference[:3] and deltas[-1].finish_reason == "length"


def test_seeded_sampling_is_independent_of_the_batch(make_engine):
    engine = make_engine(max_batch_size=8)
    prompt = random_prompt(12, 7)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_new_tokens=16, ignore_eos=True)

    async def busy():
        others = [
            collect(engine, random_prompt(5 + i, 100 + i), SamplingParams(temperature=1.0, seed=i, max_new_tokens=20))
            for i in range(4)
        ] + [collect(engine, random_prompt(30, 200 + i), greedy(10)) for i in range(2)]
        results = await asyncio.gather(collect(engine, prompt, params), *others)
        return results[0][0]

    alone = asyncio.run(collect(engine, prompt, params))[0]
    assert asyncio.run(busy()) == alone
    other_seed = asyncio.run(collect(engine, prompt, dataclasses.replace(params, seed=99)))[0]
    assert other_seed != alone


def test_cancellation_frees_the_slot_within_a_step(make_engine):
    engine = make_engine(max_batch_size=4, max_seq_len=512)
    long = greedy(500)

    async def main():
        async def break_after_three():
            count = 0
            async for _ in engine.generate(random_prompt(8, 1), long):
                count += 1
                if count == 3:
                    break

        async def aborted_by_id():
            deltas = []
            async for delta in engine.generate(random_prompt(9, 2), long, "to-abort"):
                deltas.append(delta)
                if len(deltas) == 3:
                    engine.abort("to-abort")
            return deltas

        async def consume_forever():
            async for _ in engine.generate(random_prompt(10, 3), long):
                pass

        task = asyncio.create_task(consume_forever())
        deltas = await aborted_by_id()
        await break_after_three()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return deltas, await wait_until_empty(engine)

    deltas, stats = asyncio.run(main())
    assert deltas[-1].finish_reason == "abort" and len(deltas) < 50
    assert stats.running == 0 and stats.waiting == 0
    assert stats.kv_tokens_in_use == 0 and stats.free_slots == stats.num_slots == 4
    assert stats.finished == {"abort": 3}


class PoisonedParams(SamplingParams):
    """Marks the request whose logits turn to NaN after its second token."""


def test_an_error_in_one_request_leaves_the_others_intact(make_engine, tiny_fp32, monkeypatch):
    real_forward = ModelRunner._forward
    calls: dict[int, int] = {}

    def forward(self, work):
        """The poisoned request's logits row turns to NaN from its third token on; sampling must notice."""
        logits, positions = real_forward(self, work)
        logits = logits.clone()
        for row, item in enumerate(w for w in work if w.params is not None):
            if isinstance(item.params, PoisonedParams):
                calls[id(item.params)] = calls.get(id(item.params), 0) + 1
                if calls[id(item.params)] > 2:
                    logits[row] = float("nan")
        return logits, positions

    monkeypatch.setattr(ModelRunner, "_forward", forward)
    engine = make_engine()
    prompts = [random_prompt(6 + 5 * i, 300 + i) for i in range(3)]

    async def poisoned():
        tokens = []
        with pytest.raises(GenerationError) as info:
            async for delta in engine.generate(random_prompt(7, 9), PoisonedParams(max_new_tokens=20, ignore_eos=True)):
                tokens += delta.token_ids
        assert info.value.code == "generation_error" and "NaN" in str(info.value)
        return tokens

    async def main():
        return await asyncio.gather(poisoned(), *(collect(engine, p, greedy(15)) for p in prompts))

    poisoned_tokens, *others = asyncio.run(main())
    assert len(poisoned_tokens) == 2
    for (tokens, _), prompt in zip(others, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(15)).token_ids
    stats = engine.stats()
    assert stats.finished == {"error": 1, "length": 3} and stats.free_slots == stats.num_slots


def test_a_failed_batched_step_is_run_again_one_sequence_at_a_time(make_engine, tiny_fp32):
    # The first decode step that batches both requests (two tokens) fails once: each sequence then runs alone.
    engine = make_engine(dataclasses.replace(tiny_fp32, model=GatedModel(tiny_fp32.model, fail_tokens=2)))
    prompt = random_prompt(11, 4)

    async def main():
        return await asyncio.gather(*(collect(engine, prompt, greedy(10)) for _ in range(2)))

    reference = sequential.generate(tiny_fp32, prompt, greedy(10)).token_ids
    assert [tokens for tokens, _ in asyncio.run(main())] == [reference, reference]
    assert engine.healthy() and engine.stats().free_slots == engine.stats().num_slots


class PoisonModel(GatedModel):
    """Every forward whose input holds `poison` raises; with `device_error_after` forwards, every later one raises a
    CUDA-style error (sticky, as a device fault is); with `always`, every forward raises."""

    def __init__(self, model, poison: int | None = None, error: Exception | None = None, always: bool = False):
        super().__init__(model, error=error)
        self.poison, self.always = poison, always

    def forward_packed(self, plan, *args, **kwargs):
        if self.always or (self.poison is not None and self.poison in plan.input_ids.tolist()):
            raise self.error
        return self.model.forward_packed(plan, *args, **kwargs)


def test_a_request_that_fails_the_model_fails_alone_with_a_generic_message(make_engine, tiny_fp32):
    poison = 7
    engine = make_engine(dataclasses.replace(tiny_fp32, model=PoisonModel(
        tiny_fp32.model, poison, RuntimeError("simulated kernel failure: secret internals"))), max_batch_size=4)
    prompts = [[p for p in random_prompt(9, seed) if p != poison] for seed in range(3)]
    poisoned = [*prompts[0][:4], poison, *prompts[0][4:]]

    async def bad():
        with pytest.raises(GenerationError) as info:
            await collect(engine, poisoned, greedy(8), request_id="req-poisoned")
        return info.value

    async def main():
        return await asyncio.gather(bad(), *(collect(engine, p, greedy(8)) for p in prompts))

    error, *others = asyncio.run(main())
    assert "req-poisoned" in str(error) and "secret internals" not in str(error) and error.code == "generation_error"
    for (tokens, _), prompt in zip(others, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(8)).token_ids
    stats = engine.stats()
    assert engine.healthy() and stats.finished == {"error": 1, "length": 3} and stats.free_slots == stats.num_slots


@pytest.mark.parametrize(("error", "says"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "illegal memory access"),
    (RuntimeError("simulated: every step fails"), "steps in a row failed"),
], ids=["device-error", "every-step-fails"])
def test_a_broken_device_stops_the_engine_so_the_replica_is_replaced(make_engine, tiny_fp32, error, says):
    """A device error at once, other errors after MAX_FAILED_STEPS steps in which every request failed: every
    request fails with ReplicaFailed (503, retry), healthy() turns False with the reason for check_health, and
    clients are not shown the exception."""
    model = PoisonModel(tiny_fp32.model, error=error, always=True)
    engine = make_engine(dataclasses.replace(tiny_fp32, model=model), max_batch_size=2)

    async def main():
        return await asyncio.gather(*(collect(engine, random_prompt(5, seed), greedy(4)) for seed in range(8)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, ReplicaFailed)]
    assert failed and all(isinstance(r, (ReplicaFailed, GenerationError)) for r in results), results
    assert all(str(error) not in str(r) for r in results)
    assert not engine.healthy() and says in engine.failure
    with pytest.raises(ReplicaFailed):
        asyncio.run(collect(engine, random_prompt(5, 0), greedy(1)))


def test_a_compile_past_the_recompile_limit_stops_the_engine_for_good(make_engine, tiny_fp32):
    """A CompileLimitHit leaves the process unfit (see its docstring): every request, running or waiting, fails with
    ReplicaFailed (503, retry), new ones are refused, and healthy() turns False so that Serve replaces the replica."""
    error = CompileLimitHit("simulated: a shape past dynamo's recompile limit")
    model = GatedModel(tiny_fp32.model, fail_tokens=2, error=error)
    engine = make_engine(dataclasses.replace(tiny_fp32, model=model), max_batch_size=2)
    prompt = random_prompt(11, 4)

    async def main():
        # Two requests decode together (the failing 2-token step); a third waits for a slot.
        streams = [collect(engine, prompt, greedy(10)) for _ in range(3)]
        return await asyncio.gather(*streams, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, ReplicaFailed) for result in results), results
    assert results[0].code == "replica_failed" and "recompile limit" not in str(results[0])
    assert not engine.healthy() and "recompile limit" in engine.failure
    stats = engine.stats()
    assert stats.running == stats.waiting == 0 and stats.finished == {"error": 3}
    with pytest.raises(ReplicaFailed):  # at the first iteration, like the other submission errors
        asyncio.run(collect(engine, prompt, greedy(1)))


def test_limits_raise_documented_errors(make_engine, tiny_fp32):
    engine = make_engine(max_seq_len=64)
    with pytest.raises(ContextLengthExceeded) as info:
        engine.generate(random_prompt(64, 1), greedy(1))  # raised at call time, before any compute
    assert info.value.code == "context_length_exceeded"
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(ContextLengthExceeded):
        engine.generate(random_prompt(10, 1), SamplingParams(max_length=10))
    with pytest.raises(InvalidRequest) as info:
        engine.generate([], greedy(1))
    assert info.value.code == "invalid_request"

    slot_bytes = tiny_fp32.config.kv_bytes_per_token(torch.float32) * 256
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(tiny_fp32, EngineConfig(max_seq_len=256, kv_cache_bytes=slot_bytes - 1))
    stats = make_engine(kv_cache_bytes=int(2.5 * slot_bytes)).stats()
    assert stats.num_blocks == int(2.5 * slot_bytes) // (slot_bytes // 256 * 8) == 80  # blocks of 8 tokens
    assert stats.num_slots == 16 and stats.free_blocks == 80


def test_a_full_waiting_queue_is_overloaded(make_engine, tiny_fp32):
    gated = GatedModel(tiny_fp32.model)
    engine = make_engine(dataclasses.replace(tiny_fp32, model=gated), max_batch_size=1, max_waiting=1)

    async def main():
        gated.gate.clear()
        running = asyncio.create_task(collect(engine, random_prompt(5, 1), greedy(3)))
        while engine.stats().running == 0:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(collect(engine, random_prompt(5, 2), greedy(3)))
        while engine.stats().waiting == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded) as info:
            await collect(engine, random_prompt(5, 3), greedy(3))
        gated.gate.set()
        await asyncio.gather(running, waiting)  # the held requests still complete
        return info.value

    error = asyncio.run(main())
    assert error.code == "overloaded"
    assert engine.stats().finished == {"length": 2}


def test_prefix_caching_reuses_the_previous_turn(make_engine, tiny_fp32):
    turn1 = random_prompt(30, 5)

    def conversation(engine: Engine):
        async def main():
            reply, _ = await collect(engine, turn1, greedy(10))
            turn2 = turn1 + reply + random_prompt(12, 6)
            tokens, deltas = await collect(engine, turn2, greedy(10))
            return turn2, tokens, deltas[-1].stats

        return asyncio.run(main())

    cached_engine = make_engine(max_batch_size=2)
    turn2, tokens, stats = conversation(cached_engine)
    # Turn 1 and its reply but the reply's last token (never run) were computed: their full blocks of 8 are reused.
    assert stats.cached_prompt_tokens == (30 + 9) // 8 * 8
    assert tokens == sequential.generate(tiny_fp32, turn2, greedy(10)).token_ids
    after = cached_engine.stats()
    assert after.cached_blocks >= 4 and after.kv_tokens_in_use == 0 and after.used_blocks == 0

    _, uncached_tokens, uncached_stats = conversation(make_engine(max_batch_size=2, prefix_caching=False))
    assert uncached_stats.cached_prompt_tokens == 0 and uncached_tokens == tokens


def test_stats_report_the_kernels_and_the_memory_held(make_engine, tiny_checkpoint):
    from serve_app.model import cpu_linear
    from serve_app.model.loader import load_model

    stats = make_engine().stats()
    assert stats.kernels == {}  # fp32: nothing quantized
    if cpu_linear.packable(torch.float32):
        assert stats.dense_kernels == {"onednn-packed": 9}  # 2 layers x 4 linears + the output layer
    assert stats.memory_bytes["kv_cache"] == stats.kv_cache_bytes > 0
    assert stats.memory_bytes["weights"] > 0 and stats.memory_bytes["resident"] > 0  # CPU: RSS from /proc
    int4 = make_engine(load_model(tiny_checkpoint, "int4", "cpu"), max_batch_size=1, max_seq_len=64)
    assert int4.stats().kernels == {"int4pack_mm_cpu": 8}  # 2 layers x 4 linears


def test_greedy_ids_equal_the_no_cache_reference(make_engine, tiny_fp32):
    """fp32 greedy through packed steps (chunked prefill, mixed batches) = recomputing the whole sequence each token
    with plain causal attention, the path the old per-sequence engine was checked against."""
    engine = make_engine(max_batch_size=3, prefill_chunk=8)
    prompts = [random_prompt(n, 40 + n) for n in (5, 19, 12, 30)]

    def reference(prompt: list[int], count: int) -> list[int]:
        tokens = list(prompt)
        for _ in range(count):
            logits = tiny_fp32.model(torch.tensor([tokens]), torch.arange(len(tokens))[None], last_only=True)
            tokens.append(int(logits[0, -1].argmax()))
        return tokens[len(prompt) :]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(10)) for p in prompts))

    for (tokens, _), prompt in zip(asyncio.run(main()), prompts):
        assert tokens == reference(prompt, 10)


def test_steps_run_on_the_compute_thread_itself_with_no_hand_over(make_engine, monkeypatch):
    """The engine's loop runs on the compute thread: each step (scheduling, the runner's step, postprocessing) is a
    plain call there, with no compute job (a Future and two thread switches) per step."""
    from serve_app.model import compute

    engine = make_engine(max_batch_size=2)
    compute_thread = compute.run(threading.current_thread)
    step_threads, runner_threads, jobs = set(), set(), []
    engine_step, runner_step = engine.step, engine.runner.step_logprobs
    monkeypatch.setattr(engine, "step", lambda: step_threads.add(threading.current_thread()) or engine_step())
    monkeypatch.setattr(engine.runner, "step_logprobs",
                        lambda work: runner_threads.add(threading.current_thread()) or runner_step(work))
    submit = compute.submit
    monkeypatch.setattr(compute, "submit", lambda *args, **kwargs: jobs.append(args) or submit(*args, **kwargs))

    async def main():
        return await asyncio.gather(*(collect(engine, random_prompt(7 + i, 60 + i), greedy(12)) for i in range(2)))

    results = asyncio.run(main())
    assert [len(tokens) for tokens, _ in results] == [12, 12] and engine.stats().steps >= 12
    assert step_threads == runner_threads == {compute_thread}
    assert jobs == []


def test_a_fault_in_scheduling_fails_the_waiting_requests_instead_of_leaving_them_waiting(make_engine):
    engine = make_engine(max_batch_size=2)
    real_admit = engine.scheduler._admit
    faults = iter([RuntimeError("simulated scheduler bug")])

    def admit(seq, copies):
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return real_admit(seq, copies)

    engine.scheduler._admit = admit

    async def main():
        with pytest.raises(GenerationError):
            await asyncio.wait_for(collect(engine, random_prompt(9, 1), greedy(4)), timeout=10)
        return await asyncio.wait_for(collect(engine, random_prompt(9, 2), greedy(4)), timeout=10)

    tokens, _ = asyncio.run(main())
    assert len(tokens) == 4  # the engine serves on
