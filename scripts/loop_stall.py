"""Does tokenizing large prompts stall a pool replica's other streams? Measured against a served app.

    python scripts/loop_stall.py --url http://127.0.0.1:8000 --model chatglm2-6b

One probe stream (a completion of --probe-tokens tokens with ignore_eos) runs twice: alone, then while --threads
clients send the largest prompt the default limits accept (max_total_prompt_chars, 131,072 characters, in five
messages) to /tokenize and to /v1/chat/completions (max_tokens 1; past a small pool's context that is a 400 after
tokenizing) over and over. Printed for each run: the probe's largest and p99 gap
between chunks, its tokens/s, and how many large requests were answered. The stream and the large requests share one
pool replica when the pool has one (configs/local.yaml's pools start with one).

With --health (run on the machine of the served app's Ray cluster: the script joins it as a driver), the pool's
replicas also get the call Serve's controller makes to check them, `check_health` on the replica actor, every 50 ms
during both runs; printed: its latency's median, p99 and maximum.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

LARGE_CHARS = 131_072


def probe(url: str, model: str, tokens: int) -> dict:
    gaps, last, chunks = [], None, 0
    start = time.perf_counter()
    body = {"model": model, "prompt": "你好", "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last, chunks = now, chunks + 1
    elapsed = time.perf_counter() - start
    gaps.sort()
    return {"max_gap_ms": 1000 * gaps[-1], "p99_gap_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
            "median_gap_ms": 1000 * statistics.median(gaps), "tok_s": tokens / elapsed, "chunks": chunks}


class HealthProbe(threading.Thread):
    """Serve's health check of every replica of `model`, as its controller makes it, every `interval_s`."""

    def __init__(self, model: str, interval_s: float = 0.05):
        import ray

        super().__init__(daemon=True)
        ray.init(address="auto", log_to_driver=False)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and f"#{model}#" in a["name"]]
        if not names:
            raise SystemExit(f"no Serve replica of {model!r} in this Ray cluster")
        self.replicas = [ray.get_actor(name, namespace="serve") for name in names]
        self.interval_s, self.latencies, self.running = interval_s, [], threading.Event()

    def run(self) -> None:
        import ray

        while True:
            self.running.wait()
            for replica in self.replicas:
                start = time.perf_counter()
                ray.get(replica.check_health.remote())
                self.latencies.append(time.perf_counter() - start)
            time.sleep(self.interval_s)

    def measure(self, fn, *args):
        """`fn(*args)` with the probe running; returns its result and the health checks' latencies (ms)."""
        self.latencies = []
        self.running.set()
        try:
            result = fn(*args)
        finally:
            self.running.clear()
        return result, sorted(1000 * x for x in self.latencies)


def summary(latencies_ms: list[float]) -> str:
    if not latencies_ms:
        return "-"
    p99 = latencies_ms[int(0.99 * (len(latencies_ms) - 1))]
    return f"{statistics.median(latencies_ms):.1f} / {p99:.1f} / {latencies_ms[-1]:.1f} ({len(latencies_ms)})"


def load(url: str, model: str, stop: threading.Event, answered: list) -> None:
    # Five messages of 26,214 characters: the whole prompt at max_total_prompt_chars, each under max_prompt_chars.
    text = ("长文本 long text " * (LARGE_CHARS // 14))[: LARGE_CHARS // 5]
    messages = [{"role": role, "content": text} for role in ("user", "assistant", "user", "assistant", "user")]
    requests = [("/tokenize", {"model": model, "messages": messages}),
                ("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 1})]
    with httpx.Client(timeout=600) as client:
        i = 0
        while not stop.is_set():
            path, body = requests[i % 2]
            answered.append((path, client.post(url + path, json=body).status_code))
            i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="chatglm2-6b")
    parser.add_argument("--probe-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--health", action="store_true", help="also time Serve's health check of the replicas")
    args = parser.parse_args()

    health = HealthProbe(args.model) if args.health else None
    if health:
        health.start()

    def timed(fn, *fn_args):
        return health.measure(fn, *fn_args) if health else (fn(*fn_args), [])

    probe(args.url, args.model, 8)  # warm up
    alone, health_alone = timed(probe, args.url, args.model, args.probe_tokens)
    stop, answered = threading.Event(), []
    threads = [threading.Thread(target=load, args=(args.url, args.model, stop, answered)) for _ in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the large requests are under way
    loaded, health_loaded = timed(probe, args.url, args.model, args.probe_tokens)
    stop.set()
    for t in threads:
        t.join()
    statuses = sorted({status for _, status in answered})
    print("| probe | max gap ms | p99 gap ms | median gap ms | tok/s | health check ms: median / p99 / max (checks) "
          "| large requests answered (statuses) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| alone | {alone['max_gap_ms']:.0f} | {alone['p99_gap_ms']:.0f} | {alone['median_gap_ms']:.0f} | "
          f"{alone['tok_s']:.1f} | {summary(health_alone)} | - |")
    print(f"| beside {args.threads} clients of {LARGE_CHARS}-char prompts | {loaded['max_gap_ms']:.0f} | "
          f"{loaded['p99_gap_ms']:.0f} | {loaded['median_gap_ms']:.0f} | {loaded['tok_s']:.1f} | "
          f"{summary(health_loaded)} | {len(answered)} ({statuses}) |")


if __name__ == "__main__":
    main()
