"""`chatglm2-serve bench --checkpoint DIR --url URL`: the same requests in-process and through a running application.

The prompts are token ids from the served pool's own `/tokenize` (exactly `--prompt-tokens` each), new ones for
every round and level so that neither side's prefix cache holds them; the in-process engine gets the same ids, the
served pool's context (`max_model_len`), `--max-batch-size` slots, and generates the same `--max-new-tokens` greedily
with `ignore_eos`. The two sides run one after the other, never together, and
alternate over `--rounds` (in-process first in odd rounds, served first in even ones) so that drifting load on a
shared machine falls on both. The report gives each side's table, the served/in-process ratio of output tokens/s
and the TTFT difference per concurrency level and round.

What it cannot make equal is stated in the report: the served replica's torch threads, precision and batch size come
from the application's config, which the command does not read; give the same ones here (`--threads`,
`--precision`, `--max-batch-size`). On Linux, Ray starts its workers (Serve's replicas included) at niceness 15
(`RAY_worker_niceness`), so on a machine shared with other work the served side also loses CPU to everything that
runs at the default niceness; the report prints this process's niceness to make that visible.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

from serve_app.bench.engine_bench import LoadSummary, format_table, run_engine_load, summarize
from serve_app.bench.served import http_client, level_result, run_level, token_counts, tokenized_prompts
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.model.loader import load_model


@dataclass
class CompareConfig:
    checkpoint: str
    url: str
    model: str
    precision: str
    device: str
    concurrency: list[int]
    requests: int
    prompt_tokens: int
    max_new_tokens: int
    max_batch_size: int
    rounds: int = 1
    seed: int = 0


def run_comparison(config: CompareConfig, progress=lambda line: print(line, file=sys.stderr)) -> dict:
    """Both sides, every level, every round. Returns a JSON-able dict (see `format_comparison`)."""
    url = config.url.rstrip("/")
    params = SamplingParams(max_new_tokens=config.max_new_tokens, ignore_eos=True)
    loaded = load_model(config.checkpoint, config.precision, config.device)

    async def both() -> dict:
        async with http_client(max(config.concurrency)) as client:
            async def prompts(seed: int) -> tuple[list[list[int]], int]:
                return await tokenized_prompts(client, url, config.model, config.requests, config.prompt_tokens, seed)

            # Fresh prompts for every (round, level), the same on both sides: a prompt seen before would hit the
            # prefix cache of one side only, and time to first token would compare cached with uncached work.
            warmup, max_seq_len = await prompts(config.seed)
            levels = [(round_, level) for round_ in range(config.rounds) for level in config.concurrency]
            sets = {key: (await prompts(config.seed + 1 + i))[0] for i, key in enumerate(levels)}
            engine = Engine(loaded, EngineConfig(config.max_batch_size, max_seq_len,
                                                 max_waiting=config.requests))
            # Warm-up on both sides: the first forward passes and the first connections are slower.
            warm = SamplingParams(max_new_tokens=2, ignore_eos=True)
            await run_engine_load(engine, warmup[:2], warm, 2)
            await run_level(client, url, config.model, warmup[2:4], 2, config.max_new_tokens)
            rows = []
            for round_, level in levels:
                sides = ("engine", "http") if round_ % 2 == 0 else ("http", "engine")
                for side in sides:
                    if side == "engine":
                        records, wall = await run_engine_load(engine, sets[round_, level], params, level)
                        row = {"model": config.model, **asdict(summarize("engine", level, records, wall))}
                    else:
                        served, wall = await run_level(client, url, config.model, sets[round_, level], level,
                                                       config.max_new_tokens)
                        row = level_result(config.model, level, served, wall, config.prompt_tokens,
                                           config.max_new_tokens)
                    rows.append({"round": round_ + 1, **row})
                    progress(f"round {round_ + 1}, concurrency {level}, {side}: "
                             f"{row['output_tokens_per_s']:.1f} output tok/s")
            await engine.shutdown()
            return {"max_model_len": max_seq_len, "rows": rows}

    result = asyncio.run(both())
    return {**asdict(config), "torch_threads": torch.get_num_threads(), "niceness": os.nice(0),
            "loaded_precision": loaded.precision, **result, "ratios": ratios(result["rows"])}


def ratios(rows: list[dict]) -> list[dict]:
    """Per (round, level): served/in-process output tok/s, and served minus in-process TTFT p50."""
    out = []
    for (round_, level) in dict.fromkeys((r["round"], r["concurrency"]) for r in rows):
        pair = {r["mode"]: r for r in rows if r["round"] == round_ and r["concurrency"] == level}
        engine, http = pair["engine"], pair["http"]
        out.append({"round": round_, "concurrency": level,
                    "throughput_ratio": http["output_tokens_per_s"] / engine["output_tokens_per_s"],
                    "ttft_p50_delta_ms": (http["ttft_p50_s"] - engine["ttft_p50_s"]) * 1000})
    return out


def _summary(row: dict) -> LoadSummary:
    return LoadSummary(**{k: row[k] for k in LoadSummary.__dataclass_fields__})


def format_comparison(result: dict) -> str:
    rows = result["rows"]
    lines = [
        (f"{result['url']} pool {result['model']} vs {result['checkpoint']} in-process ({result['loaded_precision']}, "
         f"{result['torch_threads']} torch threads, max batch {result['max_batch_size']}, niceness "
         f"{result['niceness']}): {result['requests']} requests x {result['prompt_tokens']} prompt tokens -> "
         f"{result['max_new_tokens']} output tokens, {result['rounds']} round(s)"),
        format_table([_summary(r) for r in rows]),
        "served " + token_counts([r for r in rows if r["mode"] == "http"]),
        "served / in-process:",
    ]
    for ratio in result["ratios"]:
        lines.append(f"  round {ratio['round']}, concurrency {ratio['concurrency']}: output tok/s "
                     f"{ratio['throughput_ratio'] * 100:.0f}%, TTFT p50 {ratio['ttft_p50_delta_ms']:+.1f} ms")
    for level in dict.fromkeys(r["concurrency"] for r in result["ratios"]):
        mine = [r for r in result["ratios"] if r["concurrency"] == level]
        if len(mine) > 1:
            lines.append(f"  median over rounds, concurrency {level}: output tok/s "
                         f"{statistics.median(r['throughput_ratio'] for r in mine) * 100:.0f}%, TTFT p50 "
                         f"{statistics.median(r['ttft_p50_delta_ms'] for r in mine):+.1f} ms")
    return "\n".join(lines)
