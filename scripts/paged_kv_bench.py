#!/usr/bin/env python
"""The paged KV cache against a slot cache, side by side in one process (issue 25's targets).

    python scripts/paged_kv_bench.py --checkpoint checkpoints/demo-small capacity prefix blocks

One checkpoint (written with the small preset if missing), one engine per setting, run one after another:

- `capacity`: the KV byte budget of --slots slots of --slot-tokens tokens. The slot cache (one block per sequence,
  as long as the context: what the engine had before blocks) against blocks of --block-size. --requests requests of
  --prompt-tokens random tokens and --max-new-tokens new ones are submitted at once; for --window seconds the
  engine is sampled every 0.5 s. Printed: the most sequences running at once, the most of them past their prefill
  (decoding), preemptions and the output tokens/s over the window.
- `prefix`: --chats conversations that share a --system-tokens system prompt, each with its own --user-tokens,
  submitted together, with prefix caching and without. Printed: time to first token p50 / p90, prompt tokens
  computed (the rest came from the cache) and wall time.
- `blocks`: throughput at concurrency --concurrency (--round-requests prompts of --prompt-tokens, --max-new-tokens new,
  greedy and top_p 0.8) for the slot cache and block sizes --sizes, --rounds rounds alternating the order. What the
  CPU default block size is chosen from.

Prints Markdown tables; the numbers belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.bench.engine_bench import (  # noqa: E402
    PromptVocab,
    random_prompts,
    run_engine_load,
    stream_one,
    summarize,
)
from serve_app.bench.stats import percentile  # noqa: E402
from serve_app.engine.engine import Engine, Status  # noqa: E402
from serve_app.engine.engine_config import EngineConfig  # noqa: E402
from serve_app.engine.params import SamplingParams  # noqa: E402
from serve_app.model.demo import write_demo_checkpoint  # noqa: E402
from serve_app.model.loader import load_model  # noqa: E402
from serve_app.model.tokenizer import ChatGLM2Tokenizer  # noqa: E402


def slot_config(max_seq_len: int, **fields) -> EngineConfig:
    """The slot cache: one block per sequence, as long as its context."""
    return EngineConfig(max_seq_len=max_seq_len, block_size=max_seq_len, **fields)


async def capacity(loaded, vocab, args) -> list[str]:
    budget = args.slots * args.slot_tokens * loaded.config.kv_bytes_per_token(loaded.dtype)
    settings = {
        f"slot cache ({args.slots} slots of {args.slot_tokens})":
            slot_config(args.slot_tokens, max_batch_size=args.slots, kv_cache_bytes=budget,
                        max_waiting=args.requests),
        f"blocks of {args.block_size}":
            EngineConfig(max_seq_len=args.slot_tokens, block_size=args.block_size, max_batch_size=args.max_rows,
                         kv_cache_bytes=budget, max_waiting=args.requests),
    }
    if args.paged_only:
        settings.pop(next(iter(settings)))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    rows = [f"KV budget {budget / 2**30:.2f} GiB ({args.slots} x {args.slot_tokens} tokens), {args.requests} requests "
            f"of {args.prompt_tokens} + {args.max_new_tokens} tokens submitted at once, sampled for {args.window:.0f} s",
            "", "| cache | most running at once | most decoding at once | preemptions | output tok/s in the window |",
            "|---|---:|---:|---:|---:|"]
    for name, config in settings.items():
        engine = Engine(loaded, config)
        prompts = random_prompts(vocab, args.requests, args.prompt_tokens, 7)
        generated = [0]

        async def one(prompt):
            async for delta in engine.generate(prompt, params):
                generated[0] += len(delta.token_ids)

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        most_running = most_decoding = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.window:
            await asyncio.sleep(0.5)
            running = list(engine.scheduler.running)  # a benchmark's peek: no lock needed for a count
            most_running = max(most_running, len(running))
            most_decoding = max(most_decoding, sum(1 for s in running if s.status is Status.DECODING))
        rate = generated[0] / (time.perf_counter() - start)
        preemptions = engine.stats().preemptions
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.shutdown()
        rows.append(f"| {name} | {most_running} | {most_decoding} | {preemptions} | {rate:.1f} |")
        print(rows[-1], flush=True)
        del engine
    return rows


async def prefix(loaded, vocab, args) -> list[str]:
    system = random_prompts(vocab, 1, args.system_tokens, 11)[0]
    users = random_prompts(vocab, args.chats, args.user_tokens, 12)
    prompts = [system + user for user in users]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    max_seq_len = args.system_tokens + args.user_tokens + args.max_new_tokens
    rows = [f"{args.chats} chats submitted together: a {args.system_tokens}-token system prompt shared, "
            f"{args.user_tokens} tokens each of their own, {args.max_new_tokens} new tokens, blocks of "
            f"{args.block_size}", "",
            "| prefix caching | TTFT p50 | TTFT p90 | prompt tokens computed | of all prompt tokens | wall |",
            "|---|---:|---:|---:|---:|---:|"]
    for caching in (False, True):
        engine = Engine(loaded, EngineConfig(max_batch_size=args.chats, max_seq_len=max_seq_len,
                                             block_size=args.block_size, prefix_caching=caching))
        await stream_one(engine, random_prompts(vocab, 1, 64, 99)[0], params)  # warm-up, shares nothing
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(engine, p, params) for p in prompts))
        wall = time.perf_counter() - start
        await engine.shutdown()
        ttfts = [record.ttft_s for record, _, _ in results]
        computed = sum(stats.prompt_tokens - stats.cached_prompt_tokens for _, _, stats in results)
        total = sum(len(p) for p in prompts)
        rows.append(f"| {'on' if caching else 'off'} | {percentile(ttfts, 50) * 1000:.0f} ms | "
                    f"{percentile(ttfts, 90) * 1000:.0f} ms | {computed} | {computed / total:.3f} | {wall:.1f} s |")
        print(rows[-1], flush=True)
    return rows


async def blocks(loaded, vocab, args) -> list[str]:
    max_seq_len = args.prompt_tokens + args.max_new_tokens
    configs = {"slot cache": slot_config(max_seq_len, max_batch_size=args.concurrency)}
    for size in args.sizes:
        configs[f"blocks of {size}"] = EngineConfig(max_batch_size=args.concurrency, max_seq_len=max_seq_len,
                                                    block_size=size)
    samplings = {"greedy": SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True),
                 "top_p 0.8": SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, temperature=0.9,
                                             top_p=0.8)}
    engines = {name: Engine(loaded, config) for name, config in configs.items()}
    rates: dict[tuple[str, str], list[float]] = {(e, s): [] for e in engines for s in samplings}
    for engine in engines.values():  # warm-up
        await run_engine_load(engine, random_prompts(vocab, 2, args.prompt_tokens, 3), samplings["greedy"], 2)
    for round_ in range(args.rounds):
        order = list(engines.items())
        order = order if round_ % 2 == 0 else order[::-1]
        for index, (name, engine) in enumerate(order):
            for which, (sampling, params) in enumerate(samplings.items()):
                # Prompts of their own per run: no run finds another's prefix in the cache.
                prompts = random_prompts(vocab, args.round_requests, args.prompt_tokens,
                                         1000 * round_ + 10 * index + which)
                records, wall = await run_engine_load(engine, prompts, params, args.concurrency)
                rates[(name, sampling)].append(summarize("engine", args.concurrency, records, wall).output_tokens_per_s)
    for engine in engines.values():
        await engine.shutdown()
    base = statistics.median(rates[("slot cache", "greedy")])
    rows = [f"concurrency {args.concurrency}, {args.round_requests} requests of {args.prompt_tokens} + "
            f"{args.max_new_tokens} tokens per round, {args.rounds} rounds (order alternating)", "",
            "| cache | greedy tok/s per round | median | vs slot cache | top_p 0.8 median | top_p vs greedy |",
            "|---|---|---:|---:|---:|---:|"]
    for name in engines:
        greedy = rates[(name, "greedy")]
        top_p = statistics.median(rates[(name, "top_p 0.8")])
        median = statistics.median(greedy)
        rows.append(f"| {name} | {' / '.join(f'{r:.1f}' for r in greedy)} | {median:.1f} | {median / base - 1:+.1%} | "
                    f"{top_p:.1f} | {top_p / median - 1:+.1%} |")
    return rows


SECTIONS = {"capacity": capacity, "prefix": prefix, "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=sorted(SECTIONS))
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo-small")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--slot-tokens", type=int, default=8192)
    parser.add_argument("--max-rows", type=int, default=256, help="max_batch_size of the paged engine (capacity)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--paged-only", action="store_true", help="capacity: skip the slot cache")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-requests", type=int, default=32, help="blocks: requests per round and setting")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        write_demo_checkpoint(args.checkpoint, "small")
    loaded = load_model(args.checkpoint, args.precision, "cpu")
    vocab = PromptVocab.of_tokenizer(ChatGLM2Tokenizer(args.checkpoint))
    print(f"{args.checkpoint.name} {args.precision} on CPU ({torch.get_num_threads()} threads)\n")
    for section in args.sections:
        rows = asyncio.run(SECTIONS[section](loaded, vocab, args))
        print(f"\n### {section}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
