#!/usr/bin/env python
"""Bounded soak run against a running chatglm2-serve app (e.g. `serve run configs/local.yaml`).

N async workers loop for --minutes, each request drawn at random from a mix of
  * OpenAI chat completions and text completions, streaming and non-streaming,
  * the official api.py `POST /`, and the explorer's SSE `POST /stream`,
against a pool chosen at random from GET /v1/models (or no model: the default pool), with random
max_tokens (4..200) and prompt lengths. About 10% of streams are abandoned on purpose (the client closes the
connection after a few chunks) and about 5% of all requests are deliberately bad (unknown model -> 404,
temperature 9 -> 400).

Every request is accounted for by (kind, outcome). A request is ok when its status is the expected one and, for
streams, the stream ended properly ([DONE] for OpenAI, the `finished: true` event for /stream) or was abandoned on
purpose; anything else is "unexpected" and listed at the end. Exit code 1 when there is any unexpected outcome
(and, with --fail-on-growth, when a deployment's memory shows a growth trend).

Memory: every --sample-s seconds the RSS of every Serve replica process (found with psutil: command lines containing
"ServeReplica", i.e. Ray's proctitle `ray::ServeReplica:<app>:<deployment>`) is summed per deployment; the Serve
proxy (`ray::ProxyActor`) is sampled too. The server must run on this machine for that part.

Growth criterion: least-squares slope of each deployment's summed RSS over the samples of the second half of the run
(after warm-up), in MB/min. "no growth trend" when slope < 1% of that deployment's mean RSS per minute (a leak of
that rate would double the process in under two hours); a falling slope always passes.

Only httpx, psutil and the standard library are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

from serve_app.client import sse_data

STREAM_KINDS = {"chat_stream", "completion_stream", "sse_stream"}
KIND_WEIGHTS = {
    "chat": 18,
    "chat_stream": 18,
    "completion": 14,
    "completion_stream": 14,
    "api_py": 15,
    "sse_stream": 16,
    "bad_model": 2.5,
    "bad_temperature": 2.5,
}  # bad_* total 5 of 100
ABANDON_P = 0.10
WORDS = ("the quick brown fox jumps over a lazy dog while serving tokens from three pools of chatglm2 "
         "weights in full int8 and int4 precision on a small cpu box with ray serve").split()


# --- request accounting --------------------------------------------------------------------------------------------


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)  # (kind, outcome) -> n
    unexpected: list = field(default_factory=list)  # (elapsed_s, kind, outcome, detail)
    latencies: dict = field(default_factory=dict)  # (kind, outcome) -> [seconds]
    tokens_requested: int = 0

    def record(self, kind: str, outcome: str, ok: bool, detail: str, elapsed: float, started: float) -> None:
        self.counts[(kind, outcome)] += 1
        self.latencies.setdefault((kind, outcome), []).append(elapsed)
        if not ok:
            self.unexpected.append((started, kind, outcome, detail[:300]))


def prompt_text(rng: random.Random) -> str:
    length = rng.choice([1, 3, 8, 20, 40, 80, 150])  # words; ASCII only, so tokens <= chars
    return " ".join(rng.choice(WORDS) for _ in range(length))


def api_max_length(prompt: str, max_tokens: int) -> int:
    """api.py and /stream take max_length = prompt + reply tokens. Characters bound the prompt's tokens from above
    (ASCII text), 48 covers the chat template, so the reply gets max_tokens or somewhat more, never 'no room'."""
    return len(prompt) + 48 + max_tokens


async def one_request(client: httpx.AsyncClient, rng: random.Random, models: list[str], tally: Tally,
                      t0: float) -> None:
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    model = rng.choice(models + [None])  # None: the app's default pool
    max_tokens = rng.randint(4, 200)
    prompt = prompt_text(rng)
    temperature = rng.choice([0.0, 0.7, 0.95, 1.2])
    expected = 200
    abandon = False

    if kind == "bad_model":
        expected = 404
        kind_route = rng.choice(["chat", "chat_stream", "api_py", "sse_stream"])
        model = f"no-such-model-{rng.randint(0, 999)}"
    elif kind == "bad_temperature":
        expected = 400
        kind_route = rng.choice(["chat", "completion_stream", "api_py", "sse_stream"])
        temperature = 9.0
    else:
        kind_route = kind
    if kind in STREAM_KINDS and max_tokens >= 24 and rng.random() < ABANDON_P / 0.85:
        abandon = True  # only streams long enough to abandon; /0.85 keeps it ~10% of all streams

    body: dict
    if kind_route in ("chat", "chat_stream"):
        path = "/v1/chat/completions"
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}] + messages
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "stream": kind_route == "chat_stream"}
    elif kind_route in ("completion", "completion_stream"):
        path = "/v1/completions"
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "stream": kind_route == "completion_stream"}
    elif kind_route == "api_py":
        path = "/"
        body = {"prompt": prompt, "history": [], "max_length": api_max_length(prompt, max_tokens),
                "temperature": temperature}
    else:  # sse_stream
        path = "/stream"
        body = {"query": prompt, "history": [], "max_length": api_max_length(prompt, max_tokens),
                "temperature": temperature}
    if model is not None:
        body["model"] = model
    if temperature == 0.0:
        body.pop("temperature")  # also exercise the server-side default
    streaming = kind_route in STREAM_KINDS
    tally.tokens_requested += max_tokens

    started = time.monotonic()
    rel = started - t0
    outcome, ok, detail = "?", False, ""
    try:
        if not streaming:
            response = await client.post(path, json=body)
            outcome = str(response.status_code)
            ok = response.status_code == expected
            if ok and expected == 200:
                data = response.json()
                good = ("choices" in data and data["choices"]) if path.startswith("/v1") else ("response" in data)
                if not good:
                    ok, outcome = False, f"{outcome}-badbody"
            detail = response.text[:300]
        else:
            async with client.stream("POST", path, json=body) as response:
                outcome = str(response.status_code)
                if response.status_code != expected:
                    await response.aread()
                    detail = response.text[:300]
                elif expected != 200:
                    await response.aread()
                    ok = True
                else:
                    chunks, finished, stop_after = 0, False, rng.randint(1, 4)
                    async for line in response.aiter_lines():
                        data = sse_data(line)
                        if data is None:
                            if line.startswith("event:") and "error" in line:
                                detail = line
                            continue
                        chunks += 1
                        if path == "/stream":
                            event = json.loads(data)
                            if "error" in event:
                                detail = data[:300]
                                break
                            if event.get("finished"):
                                finished = True
                                break
                        else:
                            if data == "[DONE]":
                                finished = True
                                break
                            event = json.loads(data)
                            if "error" in event:
                                detail = data[:300]
                                break
                        if abandon and chunks >= stop_after:
                            break  # leaving the context manager closes the connection mid-stream
                    if finished:
                        outcome, ok = "200-done", True
                    elif abandon and not detail:
                        outcome, ok = "200-abandoned", True
                    else:
                        outcome = "200-cut" if not detail else "200-error-event"
                        detail = detail or f"stream ended after {chunks} chunks without [DONE]/finished"
    except httpx.HTTPError as exc:
        outcome, ok, detail = f"exc:{type(exc).__name__}", False, repr(exc)
    except Exception as exc:  # a malformed body is a finding, not a crash of the soak
        outcome, ok, detail = f"exc:{type(exc).__name__}", False, repr(exc)
    label = kind if kind_route == kind else f"{kind}({kind_route})"
    tally.record(label, outcome, ok, f"{path} model={model} max_tokens={max_tokens}: {detail}",
                 time.monotonic() - started, rel)


async def worker(client: httpx.AsyncClient, seed: int, models: list[str], tally: Tally, t0: float,
                 deadline: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        await one_request(client, rng, models, tally, t0)


# --- memory sampling -----------------------------------------------------------------------------------------------


def replica_rss() -> dict[str, tuple[float, int]]:
    """deployment -> (summed RSS MB, process count), for Serve replicas and the proxy on this machine."""
    out: dict[str, list] = {}
    for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
            if "ServeReplica" in cmd:
                title = cmd.split()[0] if cmd.split() else cmd
                name = title.split(":")[-1] if ":" in title else title  # ray::ServeReplica:<app>:<deployment>
                # while a request runs Ray appends the method: `<deployment>.handle_request_with_rejection`
                head, _, method = name.rpartition(".")
                if head and method.isidentifier():
                    name = head
            elif "ray::ProxyActor" in cmd:
                name = "proxy"
            else:
                continue
            mem = proc.info["memory_info"]
            if mem is None:
                continue
            entry = out.setdefault(name, [0.0, 0])
            entry[0] += mem.rss / 2**20
            entry[1] += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {name: (mb, n) for name, (mb, n) in out.items()}


async def sampler(samples: list, t0: float, stop: asyncio.Event, every: float, tally: Tally) -> None:
    while True:
        rss = await asyncio.to_thread(replica_rss)
        samples.append((time.monotonic() - t0, sum(tally.counts.values()), rss))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            rss = await asyncio.to_thread(replica_rss)
            samples.append((time.monotonic() - t0, sum(tally.counts.values()), rss))
            return
        except asyncio.TimeoutError:
            pass


def slope_per_min(points: list[tuple[float, float]]) -> float:
    xs = [t / 60 for t, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


# --- report --------------------------------------------------------------------------------------------------------


def print_samples(samples: list, names: list[str]) -> None:
    print("\n## Memory samples (RSS MB summed per deployment; [n] = processes when more than one)\n")
    header = ["t_s", "requests"] + names
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for t, done, rss in samples:
        cells = []
        for name in names:
            if name in rss:
                mb, n = rss[name]
                cells.append(f"{mb:.1f}" + (f" [{n}]" if n > 1 else ""))
            else:
                cells.append("-")
        print(f"| {t:.0f} | {done} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="per-request timeout")
    parser.add_argument("--fail-on-growth", action="store_true", help="exit 1 also on a memory growth trend")
    args = parser.parse_args()
    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout_s, limits=limits) as client:
        listing = (await client.get("/v1/models")).raise_for_status().json()
        models = [m["id"] for m in listing["data"]]
        print(f"soak: {args.url} models={models} minutes={args.minutes} concurrency={args.concurrency} "
              f"seed={args.seed}", flush=True)
        tally, samples, stop = Tally(), [], asyncio.Event()
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        sampling = asyncio.create_task(sampler(samples, t0, stop, args.sample_s, tally))
        await asyncio.gather(*(worker(client, args.seed * 1000 + i, models, tally, t0, deadline)
                               for i in range(args.concurrency)))
        wall = time.monotonic() - t0
        stop.set()
        await sampling

    names = sorted({name for _, _, rss in samples for name in rss}, key=lambda n: (n == "proxy", n))
    print_samples(samples, names)

    total = sum(tally.counts.values())
    print(f"\n## Requests: {total} in {wall:.0f} s ({total / wall:.2f} req/s), "
          f"{tally.tokens_requested} max_tokens requested\n")
    print("| kind | outcome | count | p50 s | max s |")
    print("|---|---|---:|---:|---:|")
    for (kind, outcome), n in sorted(tally.counts.items()):
        lat = sorted(tally.latencies[(kind, outcome)])
        print(f"| {kind} | {outcome} | {n} | {statistics.median(lat):.2f} | {lat[-1]:.2f} |")
    print(f"\nunexpected: {len(tally.unexpected)}")
    for started, kind, outcome, detail in tally.unexpected[:50]:
        print(f"  t={started:.1f}s {kind} -> {outcome}: {detail}")

    print("\n## Memory trend over the second half of the run (criterion: slope < 1% of mean RSS per minute)\n")
    print("| deployment | first MB | last MB | mean MB (2nd half) | slope MB/min | limit MB/min | verdict |")
    print("|---|---:|---:|---:|---:|---:|---|")
    growth = False
    half = wall / 2
    for name in names:
        series = [(t, rss[name][0]) for t, _, rss in samples if name in rss]
        second = [(t, mb) for t, mb in series if t >= half]
        if len(second) < 3:
            print(f"| {name} | - | - | - | - | - | too few samples |")
            continue
        counts = {rss[name][1] for t, _, rss in samples if name in rss and t >= half}
        mean = statistics.fmean(mb for _, mb in second)
        slope = slope_per_min(second)
        limit = 0.01 * mean
        if len(counts) > 1:
            verdict = "n/a: replica count changed"
        elif slope < limit:
            verdict = "no growth trend"
        else:
            verdict, growth = "GROWTH", True
        print(f"| {name} | {series[0][1]:.1f} | {series[-1][1]:.1f} | {mean:.1f} | {slope:+.2f} | {limit:.2f} "
              f"| {verdict} |")
    if not names:
        print("(no Serve replica processes found on this machine: memory not sampled)")

    failed = bool(tally.unexpected) or (args.fail_on_growth and growth)
    print(f"\nresult: {'FAIL' if failed else 'PASS'} (unexpected={len(tally.unexpected)}, growth={growth})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
