"""The engine over a paged KV cache: more sequences than slots would hold, preemption when blocks run out, prefixes
shared across requests, all against the one-at-a-time reference (serve_app.engine.sequential: its own slot cache,
one sequence, no batching, no sharing) and the no-cache reference (plain causal attention over the whole sequence)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from serve_app.engine import sequential
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


async def collect(engine: Engine, prompt: list[int], params: SamplingParams):
    deltas = [delta async for delta in engine.generate(prompt, params)]
    return [t for d in deltas for t in d.token_ids], deltas[-1]


class WatchedModel:
    """Wraps the model: before each packed forward, checks that every position it writes is in a block only its
    own sequence holds and that nobody has published as a shared prefix, and records the running count."""

    def __init__(self, model):
        self.model = model
        self.engine: Engine | None = None
        self.writes_checked = 0
        self.max_running = 0
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_packed(self, plan, cache, *args, **kwargs):
        pool = self.engine.pool
        size = cache.block_size
        for block in sorted({int(i) // size for i in plan.write_index.tolist()}):
            assert pool.refs[block] == 1, f"a write into block {block} held {pool.refs[block]} times"
            assert block not in pool._key_of, f"a write into block {block}, a published prefix"
            self.writes_checked += 1
        self.max_running = max(self.max_running, len(plan.spans))
        self.steps += 1
        return self.model.forward_packed(plan, cache, *args, **kwargs)


def watched_engine(tiny_fp32, **config) -> tuple[Engine, WatchedModel]:
    watched = WatchedModel(tiny_fp32.model)
    engine = Engine(dataclasses.replace(tiny_fp32, model=watched), EngineConfig(**config))
    watched.engine = engine
    return engine, watched


def stop(engine: Engine) -> None:
    asyncio.run(engine.shutdown())


def test_more_sequences_fit_the_same_memory_than_slots_would_hold(tiny_fp32):
    """The budget of 2 slots of 256 tokens holds 16 sequences of 20 + 10 tokens at once in blocks of 8."""
    slot_bytes = tiny_fp32.config.kv_bytes_per_token(torch.float32) * 256
    engine, watched = watched_engine(tiny_fp32, max_batch_size=16, max_seq_len=256, block_size=8,
                                     kv_cache_bytes=2 * slot_bytes)
    prompts = [random_prompt(20, seed) for seed in range(16)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(10)) for p in prompts))

    results = asyncio.run(main())
    for (tokens, last), prompt in zip(results, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(10)).token_ids
        assert last.finish_reason == "length"
    assert watched.max_running == 16  # every one decoding together: 16 x 4 blocks of the 64
    stats = engine.stats()
    assert stats.num_blocks == 64 and stats.preemptions == 0 and stats.used_blocks == 0
    stop(engine)


def test_more_demand_than_blocks_preempts_and_loses_nothing(tiny_fp32):
    """12 sequences that grow to 9 blocks each in a cache of 40: the newest are preempted and recomputed; every
    request completes with the reference's ids, none errors, and they are admitted in order."""
    engine, watched = watched_engine(tiny_fp32, max_batch_size=12, max_seq_len=128, block_size=8,
                                     kv_cache_bytes=tiny_fp32.config.kv_bytes_per_token(torch.float32) * 8 * 40,
                                     prefix_caching=False)
    prompts = [random_prompt(10 + seed, 100 + seed) for seed in range(12)]
    budgets = [60 + 2 * seed for seed in range(12)]
    admitted: list[int] = []
    real_admit = engine.scheduler._admit

    def admit(seq, copies):
        ok = real_admit(seq, copies)
        if ok and seq.preemptions == 0:
            admitted.append(int(seq.request_id))
        return ok

    engine.scheduler._admit = admit

    async def main():
        tasks = []
        for index, (prompt, budget) in enumerate(zip(prompts, budgets)):
            agen = engine.generate(prompt, greedy(budget), request_id=str(index))
            tasks.append(asyncio.create_task(_drain(agen)))
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    stats = engine.stats()
    assert stats.preemptions > 0, "the test's cache should have run out of blocks"
    for (tokens, reasons), prompt, budget in zip(results, prompts, budgets):
        assert reasons == ["length"]
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(budget)).token_ids
    assert admitted == sorted(admitted)  # first admitted in order of arrival
    assert stats.finished == {"length": 12} and stats.used_blocks == 0 and stats.free_blocks == stats.num_blocks
    assert watched.writes_checked > 0
    stop(engine)


async def _drain(agen):
    tokens, reasons = [], []
    async for delta in agen:
        tokens += delta.token_ids
        if delta.finish_reason:
            reasons.append(delta.finish_reason)
    return tokens, reasons


def test_conversations_share_a_system_prompt_and_never_write_its_blocks(tiny_fp32):
    engine, watched = watched_engine(tiny_fp32, max_batch_size=4, max_seq_len=256, block_size=8)
    system = random_prompt(64, 7)
    prompts = [system + random_prompt(5 + i, 20 + i) for i in range(6)]

    async def main():
        first = await collect(engine, prompts[0], greedy(6))  # computes and publishes the system prompt's blocks
        rest = await asyncio.gather(*(collect(engine, p, greedy(6)) for p in prompts[1:]))
        return [first, *rest]

    results = asyncio.run(main())
    for (tokens, last), prompt in zip(results, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(6)).token_ids
    assert results[0][1].stats.cached_prompt_tokens == 0
    assert [last.stats.cached_prompt_tokens for _, last in results[1:]] == [64] * 5
    stats = engine.stats()
    assert stats.prefix_hit_blocks == 5 * 8 and stats.cached_blocks >= 8
    assert watched.writes_checked > 0
    stop(engine)


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token_in_a_block_of_its_own(tiny_fp32):
    engine, watched = watched_engine(tiny_fp32, max_batch_size=2, max_seq_len=128, block_size=8)
    prompt = random_prompt(32, 3)  # exactly 4 blocks

    async def main():
        return [await collect(engine, prompt, greedy(4)) for _ in range(2)]

    (first, _), (second, last) = asyncio.run(main())
    assert first == second == sequential.generate(tiny_fp32, prompt, greedy(4)).token_ids
    assert last.stats.cached_prompt_tokens == 24  # 3 blocks shared; the 4th holds the token that runs
    stop(engine)


def test_preempted_sequences_find_their_own_blocks_in_the_cache(tiny_fp32):
    """With prefix caching a preempted sequence's full blocks stay cached, so its recompute is mostly hits."""
    engine, _ = watched_engine(tiny_fp32, max_batch_size=6, max_seq_len=128, block_size=8,
                               kv_cache_bytes=tiny_fp32.config.kv_bytes_per_token(torch.float32) * 8 * 30)
    prompts = [random_prompt(12, 300 + seed) for seed in range(6)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(50)) for p in prompts))

    results = asyncio.run(main())
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_hit_blocks > 0
    for (tokens, last), prompt in zip(results, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(50)).token_ids
        assert last.stats.cached_prompt_tokens == 0  # hits of its own recompute are not prompt cache hits
    stop(engine)


def test_an_aborted_sequence_gives_its_blocks_back(tiny_fp32):
    engine, _ = watched_engine(tiny_fp32, max_batch_size=2, max_seq_len=128, block_size=8)

    async def main():
        agen = engine.generate(random_prompt(30, 1), greedy(40))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(200):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    stats = engine.stats()
    assert stats.finished == {"abort": 1} and stats.used_blocks == 0
    assert stats.free_blocks + stats.cached_blocks == stats.num_blocks
    stop(engine)


def test_the_flex_backend_over_block_tables_with_preemption(tiny_fp32):
    """The GPU decode path's attention (eager flex here) over 128-token blocks: 4 sequences that grow to 2 blocks
    each in a cache of 6 preempt, and every one ends with the reference's ids."""
    engine, _ = watched_engine(tiny_fp32, max_batch_size=4, max_seq_len=256, attention="flex",
                               kv_cache_bytes=tiny_fp32.config.kv_bytes_per_token(torch.float32) * 128 * 6)
    prompts = [random_prompt(100 + i, 500 + i) for i in range(4)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(60)) for p in prompts))

    results = asyncio.run(main())
    stats = engine.stats()
    assert stats.block_size == 128 and stats.num_blocks == 6 and stats.preemptions > 0
    for (tokens, _), prompt in zip(results, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(60)).token_ids
    stop(engine)


def test_chats_that_arrive_together_compute_their_shared_prefix_once(tiny_fp32):
    """All six submitted at once: the first computes the 64-token system prompt, the others wait for its blocks
    (pending) instead of computing them too, then share them."""
    engine, watched = watched_engine(tiny_fp32, max_batch_size=6, max_seq_len=256, block_size=8, prefill_chunk=16)
    system = random_prompt(64, 8)
    prompts = [system + random_prompt(4 + i, 40 + i) for i in range(6)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, greedy(5)) for p in prompts))

    results = asyncio.run(main())
    for (tokens, _), prompt in zip(results, prompts):
        assert tokens == sequential.generate(tiny_fp32, prompt, greedy(5)).token_ids
    assert sorted(last.stats.cached_prompt_tokens for _, last in results) == [0] + [64] * 5
    assert engine.stats().prefix_hit_blocks == 5 * 8
    stop(engine)
