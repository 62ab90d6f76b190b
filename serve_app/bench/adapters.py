"""Adapters' cost, side by side in one run: a mix of adapters and the base model against the base model alone.

For a checkpoint it writes demo adapters (half P-tuning v2, half LoRA on all four modules, unless given), then
alternates rounds of the same requests (random prompts, greedy, ignore_eos) on one engine:

- `base`: every request on the base model, on an engine (and a model of its own) without adapter layers;
- `base, adapters loaded`: the same on the engine with the adapters loaded (the LoRA layers' cost when no row uses
  them);
- `mixed`: requests spread over the adapters and the base model (round robin), all at once.

It also reports each adapter's load time and memory, and the first-request latency with a cold adapter (loading it
included) against a warm one. `chatglm2-serve bench --checkpoint DIR --adapter-mix N` runs it.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class AdapterBenchResult:
    throughput: dict[str, list[float]] = field(default_factory=dict)  # case -> tok/s per round
    adapters: list[dict] = field(default_factory=list)  # name, kind, load_s, bytes
    cold_ttft_s: float = 0.0
    warm_ttft_s: float = 0.0
    requests: int = 0
    kinds: list[str] = field(default_factory=list)


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]


async def _run(engine, jobs, params) -> tuple[int, float]:
    async def one(prompt, adapter):
        return sum([len(d.token_ids) async for d in engine.generate(prompt, params, adapter=adapter)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(prompt, adapter) for prompt, adapter in jobs))
    return sum(counts), time.perf_counter() - start


async def _ttft(engine, prompt, params, adapter=None) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params, adapter=adapter):
        return time.perf_counter() - start
    return time.perf_counter() - start


def run_adapter_bench(checkpoint: Path, *, adapters: int = 4, requests: int = 16, prompt_tokens: int = 128,
                      max_new_tokens: int = 32, rounds: int = 3, precision: str = "auto", max_batch_size: int = 16,
                      seed: int = 0, log=print) -> AdapterBenchResult:
    from serve_app.engine.engine import Engine, EngineConfig
    from serve_app.engine.params import SamplingParams
    from serve_app.model.adapters import read_adapter, write_demo_adapter
    from serve_app.model.loader import load_model

    loaded = load_model(checkpoint, precision, "auto")
    plain_loaded = load_model(checkpoint, precision, "auto")  # a model of its own: no LoRA layers wrapped around it
    vocab = min(loaded.config.padded_vocab_size, 60000)
    kinds = ["ptuning" if i % 2 == 0 else "lora-all" for i in range(adapters)]
    folder = Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    paths = [write_demo_adapter(folder / f"{kind}-{i}", kind, checkpoint) for i, kind in enumerate(kinds)]
    limits = dict(max_batch_size=max_batch_size, max_seq_len=prompt_tokens + max_new_tokens + 64)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    result = AdapterBenchResult(requests=requests, kinds=kinds)
    plain = Engine(plain_loaded, EngineConfig(**limits))
    prompts = _prompts(requests, prompt_tokens, vocab, seed)
    names = [None] + [f"a{i}" for i in range(adapters)]
    mixed_jobs = [(prompt, names[i % len(names)]) for i, prompt in enumerate(prompts)]
    base_jobs = [(prompt, None) for prompt in prompts]
    engine = Engine(loaded, EngineConfig(**limits, max_adapters=adapters + 1, max_lora_rank=8))
    cold_prompt = _prompts(1, prompt_tokens, vocab, seed + 1)[0]
    for i, path in enumerate(paths):
        adapter = read_adapter(path, loaded.config)
        start = time.perf_counter()
        held = engine.add_adapter(f"a{i}", adapter)
        load_s = time.perf_counter() - start
        kv = len(held.blocks) * engine.pool.block_size * loaded.config.kv_bytes_per_token(loaded.dtype)
        lora = 0
        if held.lora:  # its slot's share of the LoRA layers' buffers
            lora = sum(layer.nbytes for layer in engine.lora.layers.values()) // engine.lora.slots
        result.adapters.append({"name": f"a{i}", "kind": adapter.kind, "load_s": load_s,
                                "bytes": kv + lora, "kv_bytes": kv, "lora_bytes": lora})
    # cold: loading the adapter and its first request; warm: the same request again
    path = write_demo_adapter(folder / "cold", "lora-all", checkpoint)
    start = time.perf_counter()
    engine.add_adapter("cold", read_adapter(path, loaded.config))
    result.cold_ttft_s = time.perf_counter() - start + asyncio.run(_ttft(engine, cold_prompt, params, "cold"))
    result.warm_ttft_s = asyncio.run(_ttft(engine, cold_prompt[::-1], params, "cold"))
    engine.remove_adapter("cold")
    asyncio.run(_run(engine, mixed_jobs[:len(names)], params))  # warm-up
    asyncio.run(_run(plain, base_jobs[:2], params))
    base_rounds, loaded_rounds, mixed_rounds = [], [], []
    for index in range(rounds):  # the three cases alternate, round by round
        tokens, seconds = asyncio.run(_run(plain, base_jobs, params))
        base_rounds.append(tokens / seconds)
        tokens, seconds = asyncio.run(_run(engine, base_jobs, params))
        loaded_rounds.append(tokens / seconds)
        tokens, seconds = asyncio.run(_run(engine, mixed_jobs, params))
        mixed_rounds.append(tokens / seconds)
        log(f"round {index + 1}: base {base_rounds[index]:.1f}, base with adapters loaded {loaded_rounds[-1]:.1f}, "
            f"mixed {mixed_rounds[-1]:.1f} tok/s")
    asyncio.run(engine.shutdown())
    asyncio.run(plain.shutdown())
    result.throughput = {"base": base_rounds, "base, adapters loaded": loaded_rounds, "mixed": mixed_rounds}
    return result


def format_adapter_report(result: AdapterBenchResult) -> str:
    base = statistics.median(result.throughput["base"])
    lines = [f"{result.requests} concurrent requests; mixed = round robin over the base model and "
             f"{len(result.kinds)} adapters ({', '.join(result.kinds)})", "",
             "| case | tok/s (median) | rounds | vs base |", "|---|---|---|---|"]
    for case, rounds in result.throughput.items():
        median = statistics.median(rounds)
        lines.append(f"| {case} | {median:.1f} | {' / '.join(f'{r:.1f}' for r in rounds)} | {median / base:.2f} |")
    lines += ["", "| adapter | kind | load (ms) | memory (MB) |", "|---|---|---|---|"]
    for adapter in result.adapters:
        lines.append(f"| {adapter['name']} | {adapter['kind']} | {adapter['load_s'] * 1000:.1f} | "
                     f"{adapter['bytes'] / 1e6:.2f} |")
    lines += ["", f"first request with a cold LoRA adapter (load + TTFT): {result.cold_ttft_s * 1000:.0f} ms; warm "
              f"TTFT: {result.warm_ttft_s * 1000:.0f} ms"]
    return "\n".join(lines)
