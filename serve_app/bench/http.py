"""`chatglm2-serve bench --url URL`: load-test a running application over HTTP streaming.

For each pool and each concurrency level, `--requests` streaming `/v1/completions` requests run with that many in
flight (fixed random prompts, greedy, `ignore_eos` so every request produces `--max-new-tokens`). The summary is the
in-process benchmark's table (output tok/s, requests/s, TTFT and TPOT p50/p99), and optionally a PNG plot.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import httpx

from serve_app.bench.engine import LoadSummary, RequestRecord, format_table, summarize
from serve_app.client import aopenai_chunks

_WORDS = ("天气", "今天", "我们", "服务", "模型", "问题", "回答", "请", "介绍", "一下", "model", "serve", "chat",
          "token", "stream", "load", "test", "的", "是", "在")


def random_prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """One streaming request; TTFT is the time to the first text chunk, token count from the usage chunk."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for chunk in aopenai_chunks(response.aiter_lines()):  # an error event raises StreamError
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return RequestRecord(ttft_s=ttft if ttft is not None else latency, latency_s=latency, output_tokens=tokens)


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_new_tokens: int,
                    progress: Callable[[int], None]) -> tuple[list[RequestRecord], float]:
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def one(client: httpx.AsyncClient, prompt: str) -> RequestRecord:
        nonlocal done
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        async with semaphore:
            record = await stream_completion(client, url, body)
        done += 1
        progress(done)
        return record

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(one(client, prompt) for prompt in prompts))
        return list(records), time.perf_counter() - start


def run_http_benchmark(url: str, models: list[str], concurrency: list[int], requests: int, prompt_words: int,
                       max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Returns one dict per (pool, concurrency): the LoadSummary fields plus `model`."""
    url = url.rstrip("/")
    if not models:
        listing = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()
        models = [entry["id"] for entry in listing["data"]]
    rng = random.Random(seed)
    prompts = [random_prompt(prompt_words, rng) for _ in range(requests)]
    results = []
    for model in models:
        for level in concurrency:
            def progress(done: int, model=model, level=level) -> None:
                print(f"\r{model} concurrency {level}: {done}/{requests} requests", end="", file=sys.stderr,
                      flush=True)

            records, wall = asyncio.run(run_level(url, model, prompts, level, max_new_tokens, progress))
            print(file=sys.stderr)
            summary = summarize("http", level, records, wall)
            results.append({"model": model, **asdict(summary)})
    return results


def format_http_report(results: list[dict]) -> str:
    blocks = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [LoadSummary(**{k: v for k, v in r.items() if k != "model"}) for r in results if r["model"] == model]
        blocks.append(f"pool {model}\n{format_table(rows)}")
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
