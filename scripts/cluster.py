#!/usr/bin/env python
"""Measurements on a real multi-node Ray cluster on this machine (a head and a worker, separate `ray start`
processes started by tests/serving.py's LocalCluster, the app submitted with `serve run --address`).

  affinity   Two pools of the same precision with two replicas each, spread over the two nodes: one routed by
             ConversationAffinityRouter, one by Serve's default power-of-two-choices router. Two-turn chats, one
             at a time, alternating between the pools; turn 2 is streamed and its time to first token measured,
             with the prompt tokens whose KV was reused (usage.prompt_tokens_details.cached_tokens).
  node-loss  One pool with a replica on each node and long streams on both; the worker node is SIGKILLed (every
             process of it at once, as when a machine or pod vanishes). Reports when the lost streams ended and how,
             whether the others finished, when the GCS declared the node dead, what short requests sent every
             0.25 s from the kill on got, and when the pool was back to full strength on the head.

Prints Markdown tables; the numbers belong in docs/benchmarks.md and docs/kubernetes.md. Run from the repository
root: `python scripts/cluster.py affinity` / `python scripts/cluster.py node-loss`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.bench.stats import percentile
from serve_app.client import openai_chunks
from serve_app.local_ray import (  # the one way to start a cluster (the tests use it too)
    app_status,
    free_port,
    local_cluster,
    local_config,
    replicas,
    wait_for,
)

APP = "chatglm2"
ROUTER = "serve_app.server.router.ConversationAffinityRouter"


def start(args, pools: list[dict], deployments: list[dict]):
    """The cluster (a context manager) and the head proxy's URL, once the app runs."""
    cluster_cm = local_cluster()
    cluster = cluster_cm.__enter__()
    try:
        head = cluster.start_head(num_cpus=4, num_gpus=2, resources={"head": 1})
        worker = cluster.add_worker("worker", num_cpus=4, num_gpus=2, http_port=free_port())
        port = free_port()
        engine = {"max_batch_size": 4, "max_seq_len": 2048, "max_waiting": 16}
        config = local_config(Path(args.checkpoint).resolve(), engine=engine, pools=pools,
                              demo_preset=args.preset, torch_threads=1)
        config.pop("grpc_options")
        config["proxy_location"] = "EveryNode"
        config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 300}
        ingress = {"name": "ChatIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 1}}}
        config["applications"][0]["deployments"] = [ingress, *deployments]
        started = time.monotonic()
        cluster.serve_run(config)
        wait_for(lambda: app_status(APP) == "RUNNING", 600, "the application to be RUNNING", 2.0)
        print(f"cluster up, app RUNNING after {time.monotonic() - started:.0f} s of deploying", file=sys.stderr)
        return cluster_cm, cluster, head, worker, f"http://127.0.0.1:{port}"
    except BaseException:
        cluster_cm.__exit__(*sys.exc_info())
        raise


# --- affinity --------------------------------------------------------------------------------------------------


def words(n: int, rng: random.Random) -> str:
    corpus = (ROOT / "serve_app" / "data" / "corpus.txt").read_text().split()
    start = rng.randrange(len(corpus) - n)
    return " ".join(corpus[start:start + n])


def turn_two(client: httpx.Client, url: str, pool: str, first: str, answer_tokens: int) -> dict:
    messages = [{"role": "user", "content": first}]
    reply = client.post(f"{url}/v1/chat/completions", json={
        "model": pool, "messages": messages, "temperature": 0, "max_tokens": answer_tokens})
    reply.raise_for_status()
    messages += [{"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Please go on."}]
    body = {"model": pool, "messages": messages, "temperature": 0, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, ttft, usage = time.monotonic(), None, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for chunk in openai_chunks(response.iter_lines()):
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.monotonic() - sent
    return {"ttft": ttft, "prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def affinity(args) -> None:
    on, off = "affinity-on", "affinity-off"
    pools = [{"model": on, "precision": args.precision}, {"model": off, "precision": args.precision}]
    pool = {"num_replicas": 2, "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}
    deployments = [{"name": on, **pool, "request_router_config": {"request_router_class": ROUTER}},
                   {"name": off, **pool}]
    cluster_cm, *_, url = start(args, pools, deployments)
    try:
        rng = random.Random(0)
        results = {on: [], off: []}
        with httpx.Client(timeout=300) as client:
            for warm in (on, off):  # first requests pay one-off costs (connections, lazy inits) on each replica
                for _ in range(4):
                    turn_two(client, url, warm, words(16, rng), 4)
            for i in range(args.conversations):
                first = words(args.first_words, rng)
                for pool_name in ((on, off) if i % 2 == 0 else (off, on)):
                    results[pool_name].append(turn_two(client, url, pool_name, first + f" ({pool_name} {i})",
                                                       args.answer_tokens))
                print(f"conversation {i + 1}/{args.conversations}", file=sys.stderr)
    finally:
        cluster_cm.__exit__(None, None, None)
    print(f"\n{args.preset} preset, {args.precision}, 2 replicas per pool on 2 nodes, "
          f"{args.conversations} two-turn chats per pool, turn 1 answers up to {args.answer_tokens} tokens\n")
    print("| router | turn-2 prompt tokens (mean) | reused (mean) | turns 2 with reuse | TTFT p50 ms | TTFT mean ms "
          "| TTFT p90 ms | TTFT p50 ms, turns with reuse | TTFT p50 ms, turns without |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label in ((on, "ConversationAffinityRouter"), (off, "Serve default (power of two choices)")):
        rows = results[name]
        ttfts = [r["ttft"] * 1000 for r in rows]
        hit = [r["ttft"] * 1000 for r in rows if r["cached"] > 0]
        miss = [r["ttft"] * 1000 for r in rows if r["cached"] == 0]
        print(f"| {label} | {statistics.mean(r['prompt'] for r in rows):.0f} "
              f"| {statistics.mean(r['cached'] for r in rows):.0f} | {len(hit)}/{len(rows)} "
              f"| {percentile(ttfts, 50):.0f} | {statistics.mean(ttfts):.0f} | {percentile(ttfts, 90):.0f} "
              f"| {percentile(hit, 50):.0f} | {percentile(miss, 50):.0f} |")
    print(f"\n(load average of the machine at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())})")


# --- node loss -------------------------------------------------------------------------------------------------


def node_loss(args) -> None:
    import ray
    from ray import serve

    pool_name = "chatglm2-6b-int8"
    pools = [{"model": pool_name, "precision": "int8"}]
    deployments = [{"name": pool_name, "num_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 64,
                    "health_check_period_s": args.health_check_period_s,
                    "health_check_timeout_s": args.health_check_timeout_s,
                    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5}}]
    cluster_cm, cluster, head, worker, url = start(args, pools, deployments)
    try:
        streams = [{"events": 0} for _ in range(args.streams)]
        streaming = threading.Semaphore(0)

        def run_stream(stream: dict, i: int) -> None:
            body = {"model": pool_name, "messages": [{"role": "user", "content": f"stream {i}"}], "stream": True,
                    "temperature": 0, "max_tokens": args.stream_tokens, "ignore_eos": True}
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        stream["events"] += 1
                        stream["last"] = line[6:]
                        if stream["events"] == 3:
                            streaming.release()
            except httpx.HTTPError as exc:
                stream["last"] = repr(exc)
            stream["ended"] = time.monotonic()

        threads = [threading.Thread(target=run_stream, args=(s, i), daemon=True) for i, s in enumerate(streams)]
        for thread in threads:
            thread.start()
            if not streaming.acquire(timeout=120):
                raise RuntimeError("a stream did not start")
        handle = serve.get_deployment_handle(pool_name, app_name=APP)
        placed = {}
        for _ in range(40):
            stats = handle.engine_stats.remote().result(timeout_s=30)
            placed[stats.replica_id] = stats
            if len(placed) == 2:
                break
        on_worker = sum(s.engine.running for s in placed.values() if s.node_id == worker.node_id)
        on_head = sum(s.engine.running for s in placed.values() if s.node_id == head.node_id)

        probes: list[dict] = []

        def probe() -> None:
            sent = time.monotonic()
            record = {"sent": sent - killed}
            try:
                reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                    "model": pool_name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4})
                record["status"] = reply.status_code
            except httpx.HTTPError as exc:
                record["status"] = type(exc).__name__
            record["seconds"] = time.monotonic() - sent
            probes.append(record)

        killed = time.monotonic()
        cluster.kill(worker)
        probers = []
        node_dead = replaced = None
        while time.monotonic() - killed < args.observe_s:
            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            probers.append(thread)
            now = time.monotonic() - killed
            if node_dead is None and not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == worker.node_id):
                node_dead = now
            if node_dead is not None and replaced is None and replicas(APP, pool_name) == 2:
                replaced = now
            if replaced is not None and now > replaced + 5 and all(s.get("ended") for s in streams):
                break
            time.sleep(0.25)
        for thread in threads + probers:
            thread.join(timeout=180)
    finally:
        cluster_cm.__exit__(None, None, None)

    failed = [s for s in streams if s.get("last") != "[DONE]"]
    whole = [s for s in streams if s.get("last") == "[DONE]"]
    fail_times = [s["ended"] - killed for s in failed if "ended" in s]
    errors = sorted({s.get("last", "")[:80] for s in failed})
    bad = [p for p in probes if p["status"] != 200]
    print(f"\nnode loss: {args.streams} streams of {args.stream_tokens} tokens on a pool of 2 replicas "
          f"({on_head} running on the head, {on_worker} on the worker at the kill); "
          f"health_check_period_s={args.health_check_period_s}, health_check_timeout_s={args.health_check_timeout_s}; "
          f"Ray's defaults for node health (RAY_health_check_period_ms 3000, failure threshold 5)\n")
    print("| event | seconds after the kill |")
    print("|---|---|")
    print(f"| streams on the lost node ended ({len(failed)}, with {errors}) | "
          f"{min(fail_times, default=float('nan')):.1f} - {max(fail_times, default=float('nan')):.1f} |")
    print(f"| streams on the head finished whole ({len(whole)}/{len(streams) - len(failed)}) | "
          f"{max((s['ended'] - killed for s in whole), default=float('nan')):.1f} |")
    print(f"| GCS marks the worker node dead | {node_dead if node_dead is not None else float('nan'):.1f} |")
    print(f"| pool back at 2 running replicas (on the head) | {replaced if replaced is not None else float('nan'):.1f} |")
    ok = [p for p in probes if p["status"] == 200]
    print(f"| short requests sent every 0.25 s: {len(ok)}/{len(probes)} served, "
          f"slowest {max((p['seconds'] for p in ok), default=float('nan')):.1f} s, "
          f"failures {sorted({str(p['status']) for p in bad}) or 'none'} | "
          f"first sent {min((p['sent'] for p in probes), default=float('nan')):.1f}, "
          f"last failure sent at {max((p['sent'] for p in bad), default=float('nan')):.1f} |")
    print(f"\n(load average of the machine at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    a = sub.add_parser("affinity", help="turn-2 TTFT with 2 replicas per pool, affinity router on vs off")
    a.add_argument("--checkpoint", default="checkpoints/demo-small")
    a.add_argument("--preset", default="small")
    a.add_argument("--precision", default="auto")
    a.add_argument("--conversations", type=int, default=16)
    a.add_argument("--first-words", type=int, default=120, help="words of the first user message")
    a.add_argument("--answer-tokens", type=int, default=32)
    a.set_defaults(run=affinity)
    n = sub.add_parser("node-loss", help="kill the worker node under load; time what follows")
    n.add_argument("--checkpoint", default="checkpoints/demo-tiny")
    n.add_argument("--preset", default="tiny")
    n.add_argument("--streams", type=int, default=4)
    n.add_argument("--stream-tokens", type=int, default=1500)
    n.add_argument("--health-check-period-s", type=float, default=10.0, help="Serve's default")
    n.add_argument("--health-check-timeout-s", type=float, default=30.0, help="Serve's default")
    n.add_argument("--observe-s", type=float, default=240.0)
    n.set_defaults(run=node_loss)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
