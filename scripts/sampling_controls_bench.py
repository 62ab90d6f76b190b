#!/usr/bin/env python
"""Throughput of the sampling controls against plain top_p, side by side in one run (issue 27's targets: penalties
and logprobs within 10%, json_schema within 25%).

    python scripts/sampling_controls_bench.py --checkpoint checkpoints/demo-small --rounds 3

One engine on the checkpoint (written with `chatglm2-serve demo-checkpoint ... --preset small` if missing), then
--requests requests of --prompt-tokens random tokens and --max-new-tokens new ones (ignore_eos) at --concurrency,
with rounds alternating between the settings below. Printed: output tokens/s per round and setting, and each
setting's median against plain top_p. Prints a Markdown table; the numbers belong in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.bench.engine_bench import PromptVocab, random_prompts, run_engine_load, summarize  # noqa: E402
from serve_app.engine.engine import Engine  # noqa: E402
from serve_app.engine.engine_config import EngineConfig  # noqa: E402
from serve_app.engine.params import SamplingParams  # noqa: E402
from serve_app.engine.structured import Grammars, canonical_schema  # noqa: E402
from serve_app.model.demo import write_demo_checkpoint  # noqa: E402
from serve_app.model.loader import load_model  # noqa: E402
from serve_app.model.tokenizer import ChatGLM2Tokenizer  # noqa: E402


def settings(max_new_tokens: int) -> dict[str, SamplingParams]:
    base = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.9}
    bias = tuple((100 + 37 * i, (-1.0) ** i * 2.0) for i in range(20))
    return {
        "greedy": SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        "top_p 0.8": SamplingParams(**base, top_p=0.8),
        "top_p 0.8 + top_k 40 + min_p 0.05": SamplingParams(**base, top_p=0.8, top_k=40, min_p=0.05),
        "+ logit_bias (20 ids) + min_tokens 16": SamplingParams(**base, top_p=0.8, top_k=40, min_p=0.05,
                                                                logit_bias=bias, min_tokens=16),
        "top_p 0.8 + top_k 40 + penalties (repetition 1.1, presence 0.5, frequency 0.5)": SamplingParams(
            **base, top_p=0.8, top_k=40, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
        "top_p 0.8 + logprobs (top 5)": SamplingParams(**base, top_p=0.8, logprobs=5),
        # an array of strings: the random weights fill it to max_new_tokens, so every request runs as long
        "top_p 0.8 + json_schema (array of strings)": SamplingParams(**base, top_p=0.8, json_schema=canonical_schema(
            {"type": "array", "items": {"type": "string"}})),
    }


async def measure(engine: Engine, prompts, params: SamplingParams, concurrency: int) -> float:
    records, wall = await run_engine_load(engine, prompts, params, concurrency)
    return summarize("engine", concurrency, records, wall).output_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo-small")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        write_demo_checkpoint(args.checkpoint, "small")
    loaded = load_model(args.checkpoint, args.precision, "cpu")
    tokenizer = ChatGLM2Tokenizer(args.checkpoint)
    vocab = PromptVocab.of_tokenizer(tokenizer)
    variants = settings(args.max_new_tokens)
    results: dict[str, list[float]] = {name: [] for name in variants}

    async def run() -> None:
        config = EngineConfig(max_batch_size=args.concurrency, max_seq_len=args.prompt_tokens + args.max_new_tokens,
                              max_waiting=args.concurrency)
        engine = Engine(loaded, config, Grammars(tokenizer, loaded.config.padded_vocab_size))
        warm = random_prompts(vocab, 2, args.prompt_tokens, 1)
        for params in variants.values():
            await run_engine_load(engine, warm, SamplingParams(**{**params.__dict__, "max_new_tokens": 2}), 2)
        for round_ in range(args.rounds):
            for i, (name, params) in enumerate(variants.items()):
                prompts = random_prompts(vocab, args.requests, args.prompt_tokens, 1000 * round_ + i)
                results[name].append(await measure(engine, prompts, params, args.concurrency))
        await engine.shutdown()

    asyncio.run(run())
    plain = statistics.median(results["top_p 0.8"])
    print(f"\n{args.checkpoint.name} {args.precision} on CPU ({torch.get_num_threads()} threads), concurrency "
          f"{args.concurrency}, {args.requests} requests x {args.prompt_tokens} prompt + {args.max_new_tokens} new "
          f"tokens, temperature 0.9\n")
    print("| setting | output tok/s per round | median | vs top_p 0.8 |")
    print("|---|---|---:|---:|")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates)} | {median:.1f} | {median / plain - 1:+.1%} |")


if __name__ == "__main__":
    main()
