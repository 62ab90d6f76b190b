#!/usr/bin/env python
"""What the proxy's stalled-reader guard (serve_app/api/proxy_guard.py) costs on the streaming path: the same load
with the guard off and on, rounds alternating, in one run.

    python scripts/proxy_guard_ab.py --rounds 2 --concurrency 8 --tokens 400

Each round starts Ray and Serve here with one pool on tests/fake_engine.py (the real ingress and proxies; a token every
--token-delay-ms, every token its own message: no coalescing, the proxy's worst case), with Ray's proxy callback set
(guard on) or empty (off), then sends --concurrency streamed chat completions of --tokens tokens at once, --batches
times. Printed: SSE chunks received per second over all streams, and the median stream's duration. Prints a Markdown
table; the numbers belong in docs/benchmarks.md. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.api.proxy_guard import PROXY_ENV  # noqa: E402
from serve_app.model.demo import write_demo_checkpoint  # noqa: E402
from tests.serving import local_config, running  # noqa: E402

POOL = "chatglm2-6b"


def stream(url: str, tokens: int) -> tuple[int, float]:
    body = {"model": POOL, "messages": [{"role": "user", "content": "你好"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    start, chunks = time.perf_counter(), 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunks += line.startswith("data: {")
    return chunks, time.perf_counter() - start


def one_round(checkpoint: Path, guard: bool, args) -> dict:
    for key, value in PROXY_ENV.items():
        os.environ[key] = value if guard else ""  # empty: Ray's proxy imports no callback
    config = local_config(checkpoint, fake_engine={"token_delay_s": args.token_delay_ms / 1000,
                                                    "max_reply_tokens": args.tokens},
                          pools=[{"model": POOL, "precision": "fp16"}], stream_coalesce_ms=0)
    with running(config) as (url, _):
        stream(url, 8)  # warm
        durations, chunks = [], 0
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for _ in range(args.batches):
                for n, seconds in pool.map(lambda _: stream(url, args.tokens), range(args.concurrency)):
                    chunks += n
                    durations.append(seconds)
        elapsed = time.perf_counter() - start
    return {"guard": "on" if guard else "off", "chunks_per_s": chunks / elapsed,
            "median_s": statistics.median(durations), "chunks": chunks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per variant, alternating off/on")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--token-delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    checkpoint = write_demo_checkpoint(Path(tempfile.mkdtemp(prefix="guard-ab-")), "tiny")
    results = [one_round(checkpoint, guard, args) for _ in range(args.rounds) for guard in (False, True)]
    print(f"\n{args.concurrency} concurrent streams x {args.batches}, {args.tokens} tokens each, a token every "
          f"{args.token_delay_ms:g} ms, no coalescing\n")
    print("| round | guard | SSE chunks/s | median stream s | chunks |")
    print("|---|---|---:|---:|---:|")
    for i, r in enumerate(results):
        print(f"| {i // 2 + 1} | {r['guard']} | {r['chunks_per_s']:.0f} | {r['median_s']:.2f} | {r['chunks']} |")


if __name__ == "__main__":
    main()
