#!/usr/bin/env python
"""Overload benchmark: do streams already admitted keep their pace while a burst past the queue limits is refused?

Against a running app (e.g. `serve run configs/local.yaml`), on one pool:

  baseline  --running streams (default 8, the CPU demo's engine batch) generate --max-tokens each, alone;
  burst     the same streams again, and once every one of them has its first token, --burst more requests
            (non-streaming, same length) are fired at the same pool at once.

For the running streams it reports time to first token and the inter-token gaps (p50 / p95 / max) in each phase;
for the burst, how many were admitted (200) or refused (503/429, with Retry-After) and how long a refusal took.
Admitted burst requests wait for a place (pool queue, then the engine's waiting list), so their own latency is
reported too. Prints Markdown tables; the numbers belong in docs/benchmarks.md. Uses httpx and the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from serve_app.bench.stats import percentile
from serve_app.client import StreamError, aopenai_chunks


def body(model: str, max_tokens: int, text: str, stream: bool) -> dict:
    # ignore_eos: every request generates exactly max_tokens, so the phases do the same work
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def stream(client: httpx.AsyncClient, url: str, payload: dict, started: asyncio.Event) -> dict:
    """One streamed completion: the monotonic time of each content chunk."""
    sent, times = time.monotonic(), []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "sent": sent, "times": times}
        try:
            async for chunk in aopenai_chunks(response.aiter_lines()):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.monotonic())
                    started.set()
        except StreamError:
            return {"status": "error event", "sent": sent, "times": times}
    return {"status": 200, "sent": sent, "times": times}



async def one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    sent = time.monotonic()
    response = await client.post(f"{url}/v1/chat/completions", json=payload)
    return {"status": response.status_code, "seconds": time.monotonic() - sent,
            "retry_after": response.headers.get("retry-after")}


async def phase(url: str, model: str, running: int, burst: int, max_tokens: int) -> tuple[list[dict], list[dict]]:
    limits = httpx.Limits(max_connections=running + burst + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        flags = [asyncio.Event() for _ in range(running)]
        streams = [asyncio.create_task(stream(client, url, body(model, max_tokens, f"running {i}", True), flag))
                   for i, flag in enumerate(flags)]
        extra: list[dict] = []
        if burst:
            await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in flags)), timeout=300)
            extra = await asyncio.gather(*(one(client, url, body(model, max_tokens, f"burst {i}", False))
                                           for i in range(burst)))
        return await asyncio.gather(*streams), extra


def stream_row(name: str, results: list[dict]) -> str:
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] - r["sent"] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    ms = [1000 * percentile(gaps, q) for q in (50, 95)] + [1000 * max(gaps, default=float("nan"))]
    # Chunks can arrive in clumps (a busy proxy flushes several at once), which lowers the median gap: the rate
    # from first to last chunk is the pace a reader sees.
    rate = statistics.median((len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in ok)
    return (f"| {name} | {len(ok)}/{len(results)} | {statistics.median(ttft):.2f} | {max(ttft):.2f} | "
            f"{rate:.1f} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="chatglm2-6b-int4")
    parser.add_argument("--running", type=int, default=8, help="streams admitted before the burst")
    parser.add_argument("--burst", type=int, default=150, help="requests fired at once past the limits")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    print(f"overload: {args.url} model={args.model} running={args.running} burst={args.burst} "
          f"max_tokens={args.max_tokens}\n")
    asyncio.run(phase(args.url, args.model, args.running, 0, 16))  # warm-up: first requests pay one-off costs
    baseline, _ = asyncio.run(phase(args.url, args.model, args.running, 0, args.max_tokens))
    during, extra = asyncio.run(phase(args.url, args.model, args.running, args.burst, args.max_tokens))

    print("## The running streams\n")
    print("| phase | completed | TTFT p50 s | TTFT max s | chunks/s per stream p50 | gap p50 ms | gap p95 ms | "
          "gap max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(stream_row("alone", baseline))
    print(stream_row(f"with a burst of {args.burst}", during))

    print(f"\n## The burst of {args.burst}\n")
    print("| status | count | p50 s | max s | Retry-After |")
    print("|---|---:|---:|---:|---|")
    for status in sorted({r["status"] for r in extra}, key=str):
        rows = [r for r in extra if r["status"] == status]
        seconds = [r["seconds"] for r in rows]
        retry = sorted({r["retry_after"] for r in rows}, key=str)
        print(f"| {status} | {len(rows)} | {statistics.median(seconds):.2f} | {max(seconds):.2f} | "
              f"{', '.join(str(v) for v in retry)} |")


if __name__ == "__main__":
    main()
