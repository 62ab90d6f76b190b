#!/usr/bin/env python
"""n = 4 against 4 separate requests, side by side in one run (issue 27's target: n=4 faster).

    python scripts/choices_bench.py --checkpoint checkpoints/demo-small --rounds 3

One engine on the checkpoint (written with the small preset if missing). Each round runs both ways, alternating:
- n=4: per prompt, its 4 choices submitted together, as a pool replica runs a request with n=4 (server/deployment.py
  `_choices`), --concurrency sequences in flight (concurrency / 4 requests);
- separate: the same 4 * --prompts requests one by one (shuffled, so that one prompt's four arrive apart), at the same
  concurrency: what a client that cannot send n does.
Printed per way: output tokens/s, prompt tokens computed (the rest came from the prefix cache) and median TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.bench.engine_bench import PromptVocab, random_prompts  # noqa: E402
from serve_app.engine.engine import Engine  # noqa: E402
from serve_app.engine.engine_config import EngineConfig  # noqa: E402
from serve_app.engine.params import SamplingParams  # noqa: E402
from serve_app.model.demo import write_demo_checkpoint  # noqa: E402
from serve_app.model.loader import load_model  # noqa: E402
from serve_app.model.tokenizer import ChatGLM2Tokenizer  # noqa: E402

CHOICES = 4


async def one(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[int, int, float]:
    """(output tokens, prompt tokens computed, TTFT s)."""
    start, first, tokens, stats = time.perf_counter(), None, 0, None
    async for delta in engine.generate(prompt, params):
        if first is None and delta.token_ids:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
        stats = delta.stats or stats
    return tokens, stats.prompt_tokens - stats.cached_prompt_tokens, first or 0.0


async def together(engine, prompts, params, concurrency):
    jobs = iter(prompts)

    async def client():
        out = []
        for prompt in jobs:
            out += await asyncio.gather(*(one(engine, prompt, p) for p in params))
        return out

    groups = await asyncio.gather(*(client() for _ in range(max(1, concurrency // CHOICES))))
    return [r for group in groups for r in group]


async def separate(engine, prompts, params, concurrency, seed):
    jobs = [(prompt, p) for prompt in prompts for p in params]
    random.Random(seed).shuffle(jobs)
    pending = iter(jobs)

    async def client():
        return [await one(engine, prompt, p) for prompt, p in pending]

    return [r for rs in await asyncio.gather(*(client() for _ in range(concurrency))) for r in rs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo-small")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        write_demo_checkpoint(args.checkpoint, "small")
    loaded = load_model(args.checkpoint, args.precision, "cpu")
    vocab = PromptVocab.of_tokenizer(ChatGLM2Tokenizer(args.checkpoint))
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, temperature=0.9, seed=7 + i)
              for i in range(CHOICES)]
    rows: dict[str, list[tuple[float, int, float]]] = {"n=4": [], "4 separate requests": []}

    async def run() -> None:
        config = EngineConfig(max_batch_size=args.concurrency, max_seq_len=args.prompt_tokens + args.max_new_tokens,
                              max_waiting=4 * args.concurrency)
        engine = Engine(loaded, config)
        await together(engine, random_prompts(vocab, 1, args.prompt_tokens, 99), params, 4)  # warm-up
        for round_ in range(args.rounds):
            for name in (rows if round_ % 2 == 0 else reversed(list(rows))):
                prompts = random_prompts(vocab, args.prompts, args.prompt_tokens, 1000 * round_ + len(name))
                start = time.perf_counter()
                if name == "n=4":
                    results = await together(engine, prompts, params, args.concurrency)
                else:
                    results = await separate(engine, prompts, params, args.concurrency, round_)
                wall = time.perf_counter() - start
                rows[name].append((sum(r[0] for r in results) / wall, sum(r[1] for r in results),
                                   statistics.median(r[2] for r in results)))
        await engine.shutdown()

    asyncio.run(run())
    print(f"\n{args.checkpoint.name} {args.precision} on CPU ({torch.get_num_threads()} threads), {args.prompts} prompts "
          f"x {CHOICES} choices, {args.prompt_tokens} prompt + {args.max_new_tokens} new tokens, concurrency "
          f"{args.concurrency}, temperature 0.9, prefix caching on\n")
    print("| way | output tok/s per round | median | prompt tokens computed per round | median TTFT (ms) |")
    print("|---|---|---:|---|---:|")
    for name, rs in rows.items():
        rates = [r[0] for r in rs]
        print(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} | "
              f"{' / '.join(str(r[1]) for r in rs)} | {statistics.median(r[2] for r in rs) * 1000:.0f} |")


if __name__ == "__main__":
    main()
