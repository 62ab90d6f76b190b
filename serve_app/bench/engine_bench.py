"""In-process throughput benchmark: the continuous-batching engine at several concurrency levels, the one-at-a-time
baseline (`generate.generate`, what the official api.py and the explorer's servers do), and the turn-2 TTFT that prefix caching saves.

Prompts are fixed-length random token ids (ordinary ids, fixed seed, after `[gMASK] sop`), fresh for every
concurrency level so no level reuses another's prefixes, and every request generates exactly `max_new_tokens`
(ignore_eos), so runs are comparable. Memory is reported per run: resident set size, and on a GPU the allocator's
allocated and reserved bytes; on a GPU each row also gets a weights-only roofline (see `roofline_tokens_per_s`). `RequestRecord`, `summarize` and
`format_table` do not care where the records come from, so an HTTP load tester can reuse them.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from serve_app.bench.stats import percentile
from serve_app.engine.engine import Engine, EngineConfig, RequestStats
from serve_app.engine.params import SamplingParams
from serve_app.engine.sequential import generate
from serve_app.model.loader import LoadedModel

# Peak memory bandwidth by GPU name (public spec sheets), for the roofline column; --bandwidth-gbs overrides.
GPU_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                 ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12), ("L40S", 0.864e12), ("A10G", 0.6e12))


@dataclass
class RequestRecord:
    ttft_s: float  # request start to first token
    latency_s: float  # request start to last token
    output_tokens: int

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class LoadSummary:
    mode: str  # "engine" | "sequential" | "http"
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    roofline_tokens_per_s: float | None = None  # concurrency x bandwidth / weight bytes (GPU only)


def summarize(mode: str, concurrency: int, records: list[RequestRecord], wall_s: float) -> LoadSummary:
    ttfts = [r.ttft_s for r in records]
    tpots = [r.tpot_s for r in records if r.tpot_s is not None]
    output_tokens = sum(r.output_tokens for r in records)
    return LoadSummary(
        mode=mode,
        concurrency=concurrency,
        requests=len(records),
        wall_s=wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s,
        requests_per_s=len(records) / wall_s,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50) if tpots else None,
        tpot_p99_s=percentile(tpots, 99) if tpots else None,
    )


def format_table(rows: list[LoadSummary]) -> str:
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.1f}"

    def roof(row: LoadSummary) -> tuple[str, ...]:
        if row.roofline_tokens_per_s is None:
            return ("-", "-")
        return (f"{row.roofline_tokens_per_s:.0f}", f"{100 * row.output_tokens_per_s / row.roofline_tokens_per_s:.0f}%")

    header = ("mode", "conc", "reqs", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms")
    with_roofline = any(r.roofline_tokens_per_s is not None for r in rows)
    if with_roofline:
        header += ("roofline tok/s", "of roofline")
    lines = [
        (
            r.mode,
            str(r.concurrency),
            str(r.requests),
            f"{r.output_tokens_per_s:.1f}",
            f"{r.requests_per_s:.2f}",
            ms(r.ttft_p50_s),
            ms(r.ttft_p99_s),
            ms(r.tpot_p50_s),
            ms(r.tpot_p99_s),
        )
        + (roof(r) if with_roofline else ())
        for r in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *lines])


@dataclass
class PromptVocab:
    """What random prompts are made of: the `[gMASK] sop` prefix and the ordinary ids to draw from."""

    prefix: list[int]
    ordinary: list[int]

    @classmethod
    def of_tokenizer(cls, tokenizer) -> PromptVocab:
        return cls(tokenizer.prefix_ids(),
                   [i for i in range(tokenizer.sp_vocab_size) if i not in tokenizer.special_ids])

    @classmethod
    def of_sp_vocab(cls, sp_vocab_size: int) -> PromptVocab:
        """Without a tokenizer: the five specials follow the SentencePiece ids ([gMASK] = +1, sop = +3)."""
        return cls([sp_vocab_size + 1, sp_vocab_size + 3], list(range(3, sp_vocab_size)))


def random_prompts(vocab: PromptVocab, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` ids: [gMASK] sop, then ordinary ids drawn with a fixed seed."""
    if length <= len(vocab.prefix):
        raise ValueError(f"--prompt-tokens must exceed the {len(vocab.prefix)}-token prefix, not {length}")
    ordinary = torch.tensor(vocab.ordinary)
    picks = torch.randint(len(ordinary), (count, length - len(vocab.prefix)),
                          generator=torch.Generator().manual_seed(seed))
    return [vocab.prefix + ordinary[row].tolist() for row in picks]


def memory_report(device: torch.device) -> dict:
    """Resident set size now and at peak, and on CUDA the caching allocator's allocated/reserved bytes and peaks."""
    with open("/proc/self/statm") as handle:
        rss = int(handle.read().split()[1]) * resource.getpagesize()
    report = {"rss_bytes": rss, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        report |= {
            "gpu_allocated_bytes": torch.cuda.memory_allocated(device),
            "gpu_reserved_bytes": torch.cuda.memory_reserved(device),
            "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    return report


def device_bandwidth(device: torch.device, override_gbs: float | None = None) -> float | None:
    """Peak memory bandwidth in bytes/s of a CUDA device (by name), or None (CPU, or a GPU not in the table)."""
    if override_gbs:
        return override_gbs * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in GPU_BANDWIDTH if key in name), None)


def roofline_tokens_per_s(loaded: LoadedModel, concurrency: int, bandwidth: float | None) -> float | None:
    """Decode ceiling when every step reads all weights once: concurrency x bandwidth / weight bytes (KV ignored)."""
    return concurrency * bandwidth / loaded.weight_bytes() if bandwidth else None


async def stream_one(
    engine: Engine, prompt: list[int], params: SamplingParams
) -> tuple[RequestRecord, list[int], RequestStats | None]:
    """One request through the engine: (timings, generated ids, the engine's stats from the final delta)."""
    start = time.perf_counter()
    first, tokens, stats = None, [], None
    async for delta in engine.generate(prompt, params):
        if delta.token_ids and first is None:
            first = time.perf_counter()
        tokens += delta.token_ids
        stats = delta.stats or stats
    end = time.perf_counter()
    return RequestRecord((first or end) - start, end - start, len(tokens)), tokens, stats


async def run_engine_load(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, concurrency: int
) -> tuple[list[RequestRecord], float]:
    """All prompts through the engine, `concurrency` in flight at a time. Returns (records, wall seconds)."""
    pending = iter(prompts)
    records: list[RequestRecord] = []

    async def client() -> None:
        for prompt in pending:  # the clients share one iterator: each takes the next prompt when it is free
            records.append((await stream_one(engine, prompt, params))[0])

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - start


def timed_generate(loaded: LoadedModel, prompt: list[int], params: SamplingParams) -> RequestRecord:
    start = time.perf_counter()
    first: list[float] = []

    def on_token(_: int) -> None:
        if not first:
            first.append(time.perf_counter())

    out = generate(loaded, prompt, params, on_token=on_token)
    end = time.perf_counter()
    return RequestRecord(first[0] - start, end - start, len(out.token_ids))


def run_sequential(
    loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[RequestRecord], float]:
    """The official servers' way: one request at a time through `generate.generate`. Returns (records, wall seconds)."""
    generate(loaded, prompts[0], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up, as for the engine
    start = time.perf_counter()
    records = [timed_generate(loaded, prompt, params) for prompt in prompts]
    return records, time.perf_counter() - start


async def turn2_ttft(engine: Engine, conversations: list[tuple[list[int], list[int]]], params: SamplingParams) -> dict:
    """Median turn-2 TTFT over 2-turn conversations (turn 2 = turn 1 + its reply + a new user message)."""
    ttfts, cached, lengths = [], [], []
    for turn1, user2 in conversations:
        _, reply, _ = await stream_one(engine, turn1, params)
        turn2 = turn1 + reply + user2
        record, _, stats = await stream_one(engine, turn2, params)
        ttfts.append(record.ttft_s)
        cached.append(stats.cached_prompt_tokens)
        lengths.append(len(turn2))
    return {
        "turn2_prompt_tokens": statistics.median(lengths),
        "turn2_ttft_p50_s": statistics.median(ttfts),
        "cached_prompt_tokens_p50": statistics.median(cached),
    }


@dataclass
class BenchConfig:
    concurrency: list[int]
    requests: int
    prompt_tokens: int
    max_new_tokens: int
    max_batch_size: int = EngineConfig.max_batch_size
    compare_sequential: bool = False
    prefix_turns: bool = False
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    attention: str = "auto"
    cuda_graphs: bool | None = None
    bandwidth_gbs: float | None = None


def run_benchmark(
    loaded: LoadedModel, vocab: PromptVocab, bench: BenchConfig, progress: Callable[[str], None] = print
) -> dict:
    """Runs every part the config asks for; returns the figures as one JSON-able dict (see `format_report`)."""
    params = SamplingParams(max_new_tokens=bench.max_new_tokens, ignore_eos=True, temperature=bench.temperature,
                            top_p=bench.top_p)
    bandwidth = device_bandwidth(loaded.device, bench.bandwidth_gbs)

    def level_prompts(level: int) -> list[list[int]]:
        # Fresh prompts per level (and for the warm-up and the baseline): no level hits another's cached prefixes.
        return random_prompts(vocab, bench.requests, bench.prompt_tokens, bench.seed + 7919 * (level + 1))

    prompts = level_prompts(-1)
    user2 = max(16, bench.prompt_tokens // 4)  # the second user message of a --prefix-turns conversation
    longest = bench.prompt_tokens + bench.max_new_tokens
    if bench.prefix_turns:
        longest = 2 * longest + user2
    max_seq_len = min(longest, loaded.config.seq_length)

    async def engine_runs() -> list[LoadSummary]:
        config = EngineConfig(bench.max_batch_size, max_seq_len, max_waiting=max(bench.concurrency),
                              attention=bench.attention, cuda_graphs=bench.cuda_graphs)
        engine = Engine(loaded, config)
        await run_engine_load(engine, prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True), 2)  # warm-up
        rows = []
        for level, concurrency in enumerate(bench.concurrency):
            records, wall = await run_engine_load(engine, level_prompts(level), params, concurrency)
            rows.append(summarize("engine", concurrency, records, wall))
            rows[-1].roofline_tokens_per_s = roofline_tokens_per_s(loaded, min(concurrency, bench.max_batch_size),
                                                                   bandwidth)
            progress(f"engine, concurrency {concurrency}: {rows[-1].output_tokens_per_s:.1f} output tok/s")
        await engine.shutdown()
        return rows

    rows = asyncio.run(engine_runs())
    result: dict = {
        "checkpoint": str(loaded.checkpoint),
        "precision": loaded.precision,
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "requests": bench.requests,
        "prompt_tokens": bench.prompt_tokens,
        "max_new_tokens": bench.max_new_tokens,
        "max_batch_size": bench.max_batch_size,
        "temperature": bench.temperature,
        "top_p": bench.top_p,
        "weight_bytes": loaded.weight_bytes(),
        "bandwidth_bytes_per_s": bandwidth,
        "memory": memory_report(loaded.device),
        "results": [asdict(row) for row in rows],
        "sequential": None,
        "speedup": None,
        "prefix_turns": None,
    }
    if bench.compare_sequential:
        sequential = summarize("sequential", 1, *run_sequential(loaded, level_prompts(len(bench.concurrency)), params))
        sequential.roofline_tokens_per_s = roofline_tokens_per_s(loaded, 1, bandwidth)
        top = max(rows, key=lambda row: row.concurrency)
        result["sequential"] = asdict(sequential)
        result["speedup"] = top.output_tokens_per_s / sequential.output_tokens_per_s
        progress(f"sequential: {sequential.output_tokens_per_s:.1f} output tok/s")
    if bench.prefix_turns:
        prefix = len(vocab.prefix)
        user_messages = [ids[prefix:] for ids in random_prompts(vocab, 4, user2 + prefix, bench.seed + 1)]
        conversations = list(zip(prompts[:4], user_messages))

        async def turns(prefix_caching: bool) -> dict:
            engine = Engine(loaded, EngineConfig(1, max_seq_len, prefix_caching=prefix_caching))
            figures = await turn2_ttft(engine, conversations, params)
            await engine.shutdown()
            return figures

        result["prefix_turns"] = {
            "with_prefix_caching": asyncio.run(turns(True)),
            "without_prefix_caching": asyncio.run(turns(False)),
        }
    return result


def format_memory(memory: dict) -> str:
    line = f"memory: RSS {memory['rss_bytes'] / 1e9:.2f} GB (peak {memory['max_rss_bytes'] / 1e9:.2f} GB)"
    if "gpu_allocated_bytes" in memory:
        line += (f"; GPU allocated {memory['gpu_allocated_bytes'] / 1e9:.2f} GB "
                 f"(peak {memory['gpu_max_allocated_bytes'] / 1e9:.2f}), reserved "
                 f"{memory['gpu_reserved_bytes'] / 1e9:.2f} GB (peak {memory['gpu_max_reserved_bytes'] / 1e9:.2f})")
    return line


def format_report(result: dict) -> str:
    rows = [LoadSummary(**row) for row in result["results"]]
    if result["sequential"]:
        rows.append(LoadSummary(**result["sequential"]))
    lines = [
        (
            f"{result['checkpoint']} ({result['precision']} on {result['device']}, {result['torch_threads']} "
            f"threads): {result['requests']} requests x {result['prompt_tokens']} prompt tokens -> "
            f"{result['max_new_tokens']} output tokens, max batch {result['max_batch_size']}, "
            f"temperature {result['temperature']}, top_p {result['top_p']}"
        ),
        format_table(rows),
        format_memory(result["memory"]),
    ]
    if result["speedup"] is not None:
        top = max(row["concurrency"] for row in result["results"])
        lines.append(f"speedup (engine at concurrency {top} / sequential, output tok/s): {result['speedup']:.2f}x")
    if result["prefix_turns"]:
        cached = result["prefix_turns"]["with_prefix_caching"]
        uncached = result["prefix_turns"]["without_prefix_caching"]
        lines.append(
            f"turn-2 TTFT p50 ({cached['turn2_prompt_tokens']:.0f}-token prompt): "
            f"{cached['turn2_ttft_p50_s'] * 1000:.1f} ms with prefix caching "
            f"({cached['cached_prompt_tokens_p50']:.0f} tokens reused), "
            f"{uncached['turn2_ttft_p50_s'] * 1000:.1f} ms without"
        )
    return "\n".join(lines)
