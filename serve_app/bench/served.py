"""`chatglm2-serve bench --url URL`: load-test a running application over HTTP streaming.

For each pool and each concurrency level, `--requests` streaming `/v1/completions` requests run with that many in
flight, greedy, with `ignore_eos` so every request produces `--max-new-tokens`. Prompts are sent as token ids of
exactly `--prompt-tokens` ([gMASK] sop included), cut from random text that the pool's own `/tokenize` encoded, so
the server does the work the report says. Every request's `usage` is checked against what was sent and asked for: a
mismatch raises `UsageMismatch` instead of reporting a throughput for other work. The summary is the in-process
benchmark's table (output tok/s, requests/s, TTFT and TPOT p50/p99), the token counts on both sides, the SSE chunks
per request (fewer than tokens when the pool coalesces deltas), and optionally a PNG plot.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from serve_app.bench.engine_bench import LoadSummary, RequestRecord, format_table, summarize
from serve_app.client import aopenai_chunks

_WORDS = ("天气", "今天", "我们", "服务", "模型", "问题", "回答", "请", "介绍", "一下", "model", "serve", "chat",
          "token", "stream", "load", "test", "的", "是", "在")


class UsageMismatch(RuntimeError):
    """The server's `usage` does not count what the load tester sent or asked for."""


def random_prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def tokenized_prompts(client: httpx.AsyncClient, url: str, model: str, count: int, length: int,
                            seed: int) -> tuple[list[list[int]], int]:
    """`count` prompts of exactly `length` token ids ([gMASK] sop first), from the pool's /tokenize; and the pool's
    context (max_model_len)."""
    rng = random.Random(seed)
    prompts, max_seq_len = [], 0
    for _ in range(count):
        words = length
        while True:
            response = await client.post(f"{url}/tokenize", json={"model": model, "prompt": random_prompt(words, rng)})
            if response.status_code != 200:
                raise RuntimeError(f"/tokenize: HTTP {response.status_code}: {response.text[:200]}")
            body = response.json()
            if body["count"] >= length:
                break
            words *= 2
        prompts.append(body["tokens"][:length])
        max_seq_len = body["max_model_len"]
    return prompts, max_seq_len


@dataclass
class Served:
    """One request as the client saw it: its timings, the server's usage, and the SSE chunks that carried text."""

    record: RequestRecord
    prompt_tokens: int
    text_chunks: int


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> Served:
    """One streaming request; TTFT is the time to the first text chunk, token counts from the usage chunk."""
    start = time.perf_counter()
    ttft = None
    usage = None
    chunks = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for chunk in aopenai_chunks(response.aiter_lines()):  # an error event raises StreamError
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    latency = time.perf_counter() - start
    if usage is None:
        raise UsageMismatch("the stream ended without a usage chunk")
    record = RequestRecord(ttft_s=ttft if ttft is not None else latency, latency_s=latency,
                           output_tokens=usage["completion_tokens"])
    return Served(record, usage["prompt_tokens"], chunks)


def check_usage(served: Served, prompt: list[int], max_new_tokens: int) -> None:
    """The server must have run exactly the prompt that was sent and generated exactly the tokens asked for."""
    if served.prompt_tokens != len(prompt) or served.record.output_tokens != max_new_tokens:
        raise UsageMismatch(
            f"sent {len(prompt)} prompt tokens and asked for {max_new_tokens} (ignore_eos), but the server's usage "
            f"says {served.prompt_tokens} prompt and {served.record.output_tokens} completion tokens")


async def run_level(client: httpx.AsyncClient, url: str, model: str, prompts: list[list[int]], concurrency: int,
                    max_new_tokens: int, progress: Callable[[int], None] = lambda done: None,
                    ) -> tuple[list[Served], float]:
    """All prompts through the application, `concurrency` in flight at a time. Returns (requests, wall seconds).

    Each client takes the next prompt when it is free, as the in-process benchmark's clients do."""
    pending = iter(prompts)
    served: list[Served] = []

    async def one_client() -> None:
        for prompt in pending:
            body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            result = await stream_completion(client, url, body)
            check_usage(result, prompt, max_new_tokens)
            served.append(result)
            progress(len(served))

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return served, time.perf_counter() - start


def http_client(concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency + 4))


def level_result(model: str, level: int, served: list[Served], wall: float, prompt_tokens: int,
                 max_new_tokens: int) -> dict:
    """The LoadSummary fields plus the pool and both sides' token counts per request."""
    summary = summarize("http", level, [s.record for s in served], wall)
    return {"model": model, **asdict(summary),
            "prompt_tokens_sent": prompt_tokens,
            "prompt_tokens_usage": sum(s.prompt_tokens for s in served) / len(served),
            "output_tokens_asked": max_new_tokens,
            "output_tokens_usage": sum(s.record.output_tokens for s in served) / len(served),
            "text_chunks_per_request": sum(s.text_chunks for s in served) / len(served)}


def models_of(url: str) -> list[str]:
    listing = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()
    return [entry["id"] for entry in listing["data"]]


def run_http_benchmark(url: str, models: list[str], concurrency: list[int], requests: int, prompt_tokens: int,
                       max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Returns one dict per (pool, concurrency): see `level_result`. Raises UsageMismatch (see the module)."""
    url = url.rstrip("/")
    models = models or models_of(url)

    async def sweep(model: str) -> list[dict]:
        results = []
        async with http_client(max(concurrency)) as client:
            for index, level in enumerate(concurrency):
                # New prompts per level: a prompt seen before would be served from the prefix cache.
                prompts, _ = await tokenized_prompts(client, url, model, requests, prompt_tokens, seed + index)

                def progress(done: int, level=level) -> None:
                    print(f"\r{model} concurrency {level}: {done}/{requests} requests", end="", file=sys.stderr,
                          flush=True)

                served, wall = await run_level(client, url, model, prompts, level, max_new_tokens, progress)
                print(file=sys.stderr)
                results.append(level_result(model, level, served, wall, prompt_tokens, max_new_tokens))
        return results

    return [row for model in models for row in asyncio.run(sweep(model))]


def _summary(row: dict) -> LoadSummary:
    return LoadSummary(**{k: row[k] for k in LoadSummary.__dataclass_fields__})


def token_counts(rows: list[dict]) -> str:
    """The load tester's counts next to the server's, per request (they are checked equal on every request)."""
    row = rows[0]
    chunks = ", ".join(f"{r['text_chunks_per_request']:.1f}" for r in rows)
    return (f"per request: prompt tokens sent {row['prompt_tokens_sent']}, usage {row['prompt_tokens_usage']:.0f}; "
            f"output tokens asked {row['output_tokens_asked']}, usage {row['output_tokens_usage']:.0f}; "
            f"SSE text chunks {chunks} (per run, in order)")


def format_http_report(results: list[dict]) -> str:
    blocks = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        blocks.append(f"pool {model}\n{format_table([_summary(r) for r in rows])}\n{token_counts(rows)}")
    return "\n\n".join(blocks)


def plot(results: list[dict], path: str) -> None:
    """Throughput and TTFT/TPOT percentiles against concurrency, one line per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft, ax_tpot) = plt.subplots(1, 3, figsize=(15, 4.5))
    for index, model in enumerate(dict.fromkeys(r["model"] for r in results)):
        color = f"C{index}"  # one colour per pool in every panel; solid p50, dashed p99
        rows = [r for r in results if r["model"] == model]
        levels = [r["concurrency"] for r in rows]
        ax_tput.plot(levels, [r["output_tokens_per_s"] for r in rows], marker="o", color=color, label=model)
        for ax, key in ((ax_ttft, "ttft"), (ax_tpot, "tpot")):
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [(r[f"{key}_{q}_s"] or 0) * 1000 for r in rows]
                ax.plot(levels, values, style, marker="o", color=color, label=f"{model} {q}")
    for ax, title, unit in ((ax_tput, "output throughput", "tokens/s"), (ax_ttft, "time to first token", "ms"),
                            (ax_tpot, "time per output token", "ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
