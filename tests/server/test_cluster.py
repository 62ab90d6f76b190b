"""A real multi-node Ray cluster on this machine: where replicas land, prefix-affinity routing with two replicas per
pool, and the loss of a worker node under load.

One cluster for the module (tests/serving.py `LocalCluster`): a head and a worker node, separate `ray start`
processes with two logical GPUs each, and the application submitted with `serve run --address`. The pools ask for the
GPU shares of configs/gpu.yaml and run two replicas each: the INT4 pool with ConversationAffinityRouter, the INT8 pool
with Serve's default router. The ingress is pinned to the head (a custom resource), so losing the worker takes only
pool replicas and the worker's proxy with it; the node-loss test runs last.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx
import pytest
import yaml

from serve_app.client import openai_event
from tests.serving import (
    ROOT,
    ClusterNode,
    LocalCluster,
    app_status,
    free_port,
    local_cluster,
    local_config,
    replicas,
    wait_for,
)

pytestmark = pytest.mark.slow
APP = "chatglm2"
AFFINITY = "chatglm2-6b-int4"  # ConversationAffinityRouter
DEFAULT = "chatglm2-6b-int8"  # Serve's power-of-two-choices router
ROUTER = "serve_app.server.router.ConversationAffinityRouter"
NODE_GPUS = 2


def gpu_shares() -> dict[str, float]:
    """num_gpus per replica of each pool, as configs/gpu.yaml asks."""
    config = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    return {d["name"]: d["ray_actor_options"]["num_gpus"] for d in config["applications"][0]["deployments"]
            if "num_gpus" in d.get("ray_actor_options", {})}


def cluster_config(checkpoint, http_port: int) -> dict:
    engine = {"max_batch_size": 4, "max_seq_len": 2048, "max_waiting": 16}
    config = local_config(checkpoint, engine=engine, pools=[
        {"model": DEFAULT, "precision": "int8"},
        {"model": AFFINITY, "precision": "int4"},
    ])
    config.pop("grpc_options")  # its fixed port would clash with other Ray instances on the machine
    config["proxy_location"] = "EveryNode"  # as configs/gpu.yaml: a proxy on every node
    config["http_options"] = {"host": "127.0.0.1", "port": http_port, "request_timeout_s": 300}
    shares = gpu_shares()
    pool = {"num_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 32,
            # Serve's health checks decide how soon a replica that stops answering is replaced.
            "health_check_period_s": 2, "health_check_timeout_s": 10}
    config["applications"][0]["deployments"] = [
        {"name": "ChatIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 1}}},
        {"name": DEFAULT, **pool, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": shares[DEFAULT]}},
        {"name": AFFINITY, **pool, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": shares[AFFINITY]},
         "request_router_config": {"request_router_class": ROUTER, "request_router_kwargs": {"max_imbalance": 4}}},
    ]
    return config


@dataclass
class Deployed:
    cluster: LocalCluster
    head: ClusterNode
    worker: ClusterNode
    url: str  # the head's proxy

    def kill(self, node: ClusterNode) -> None:
        self.cluster.kill(node)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    with local_cluster() as cluster:
        head = cluster.start_head(num_cpus=4, num_gpus=NODE_GPUS, resources={"head": 1})
        worker = cluster.add_worker("worker", num_cpus=4, num_gpus=NODE_GPUS, http_port=free_port())
        http_port = free_port()
        cluster.serve_run(cluster_config(tiny_checkpoint, http_port))
        wait_for(lambda: app_status(APP) == "RUNNING", 300, "the application to be RUNNING on the cluster", 2.0)
        yield Deployed(cluster, head, worker, f"http://127.0.0.1:{http_port}")


def stats_by_replica(pool: str, replicas: int = 2, rounds: int = 20) -> dict:
    """engine_stats of every replica of `pool`. Asked several at a time: one call after another may keep landing on
    the same replica."""
    from ray import serve

    handle = serve.get_deployment_handle(pool, app_name=APP)
    seen = {}
    for _ in range(rounds):
        for response in [handle.engine_stats.remote() for _ in range(6)]:
            stats = response.result(timeout_s=60)
            seen[stats.replica_id] = stats
        if len(seen) >= replicas:
            break
    return seen


def chat(url: str, pool: str, messages: list[dict], max_tokens: int = 8) -> dict:
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": pool, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_replicas_are_placed_on_both_nodes_by_their_gpu_shares(cluster):
    import ray

    shares = gpu_shares()
    used = {cluster.head.node_id: 0.0, cluster.worker.node_id: 0.0}
    for pool in (DEFAULT, AFFINITY):
        placed = stats_by_replica(pool)
        assert len(placed) == 2, f"{pool}: found {len(placed)} replicas"
        nodes = {s.node_id for s in placed.values()}
        # Serve spreads a pool's replicas over the nodes: one on the head, one on the worker.
        assert nodes == set(used), f"{pool} replicas on {nodes}, nodes are {used}"
        for stats in placed.values():
            assert len(stats.gpu_ids) == 1
            used[stats.node_id] += shares[pool]
    for node in ray.nodes():
        if node["NodeID"] in used:
            assert node["Resources"]["GPU"] == NODE_GPUS
    assert sum(used.values()) == pytest.approx(2 * (shares[DEFAULT] + shares[AFFINITY]))
    assert ray.available_resources()["GPU"] == pytest.approx(2 * NODE_GPUS - sum(used.values()))
    # Both proxies answer: the head's on the config's port, the worker's on its own (one machine, two proxies).
    for url in (cluster.url, f"http://127.0.0.1:{cluster.worker.http_port}"):
        assert httpx.get(f"{url}/-/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200


def turn_two_cached_tokens(url: str, pool: str, conversations: int) -> list[int]:
    """Two-turn chats, one after another; the prompt tokens of each second turn whose KV was reused."""
    cached = []
    for c in range(conversations):
        first = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
                 {"role": "user", "content": f"Conversation {c}: what is the weather like by the river in town {c}?"}]
        answer = chat(url, pool, first)["choices"][0]["message"]["content"]
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And tomorrow?"}]
        cached.append(chat(url, pool, second)["usage"]["prompt_tokens_details"]["cached_tokens"])
    return cached


def test_affinity_sends_the_second_turn_to_the_replica_with_the_first(cluster):
    before = {rid: s.engine.total_requests for rid, s in stats_by_replica(AFFINITY).items()}
    cached = turn_two_cached_tokens(cluster.url, AFFINITY, conversations=16)
    after = {rid: s.engine.total_requests for rid, s in stats_by_replica(AFFINITY).items()}
    # Every second turn found its first turn's KV on the replica the router chose ...
    assert all(n > 0 for n in cached), cached
    # ... while the conversations were spread over both replicas (rendezvous hashing: that all 16 prefer one of two
    # replicas has a chance of 1 in 32768). Serve's default router is no control here: between requests that come
    # one at a time it may keep choosing the same replica, or not (scripts/cluster.py measures it).
    assert set(after) == set(before) and all(after[rid] > before[rid] for rid in after), (before, after)


def test_losing_a_worker_node_fails_only_its_streams_and_the_pools_recover(cluster):
    """Runs last: the worker node does not come back."""
    max_tokens = 1000
    streams = [{"url": cluster.url, "events": []} for _ in range(4)]
    streams.append({"url": f"http://127.0.0.1:{cluster.worker.http_port}", "events": []})  # via the worker's proxy
    streaming = threading.Semaphore(0)

    def run(stream: dict, i: int) -> None:
        body = {"model": DEFAULT, "messages": [{"role": "user", "content": f"stream {i}"}], "stream": True,
                "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{stream['url']}/v1/chat/completions", json=body, timeout=180) as r:
                stream["status"] = r.status_code
                for line in r.iter_lines():
                    event = openai_event(line)
                    if event is not None:
                        stream["events"].append(event)
                        if len(stream["events"]) == 3:
                            streaming.release()
        except httpx.HTTPError as exc:
            stream["exception"] = repr(exc)
        finally:
            stream["ended"] = True

    threads = []

    def start(stream: dict) -> None:  # one at a time, so Serve's router sees each one's load and spreads them
        threads.append(threading.Thread(target=run, args=(stream, len(threads))))
        threads[-1].start()
        assert streaming.acquire(timeout=120), streams

    for stream in streams:
        start(stream)
    on_nodes = {s.node_id: s.engine.running for s in stats_by_replica(DEFAULT).values()}
    # At least two streams on the worker's replica, so one came through the head's proxy (the router may have put
    # only the worker proxy's stream there): more streams through the head until it is so.
    while on_nodes.get(cluster.worker.node_id, 0) < 2 and len(streams) < 12:
        streams.insert(0, {"url": cluster.url, "events": []})
        start(streams[0])
        on_nodes = {s.node_id: s.engine.running for s in stats_by_replica(DEFAULT).values()}
    assert on_nodes.get(cluster.head.node_id) and on_nodes.get(cluster.worker.node_id, 0) >= 2, on_nodes

    cluster.kill(cluster.worker)
    for thread in threads:
        thread.join(timeout=240)
    assert all(s.get("ended") for s in streams), f"streams hang after the node loss: {streams}"

    via_worker_proxy = streams.pop()
    # The worker's proxy went with the node: its client sees the connection break, never a [DONE].
    assert "exception" in via_worker_proxy or via_worker_proxy["events"][-1] != "[DONE]", via_worker_proxy
    completed = [s for s in streams if s["events"][-1] == "[DONE]"]
    failed = [s for s in streams if s["events"][-1] != "[DONE]"]
    assert all(s.get("status") == 200 and "exception" not in s for s in streams), streams
    # Streams on the lost replica end with an error event, not a cut stream and not a short answer passed off as done.
    assert failed, "no stream was on the worker node"
    for s in failed:
        assert s["events"][-1]["error"]["code"] == "replica_failed", s["events"][-1]
        assert not any(e["choices"] and e["choices"][0]["finish_reason"] for e in s["events"][:-1])
    # Streams on the head's replica are whole.
    assert completed, "the head node's streams failed too"
    for s in completed:
        assert not any("error" in e for e in s["events"][:-1])
        assert s["events"][-2]["usage"]["completion_tokens"] == max_tokens

    # New requests are served at once by what survives ...
    for i in range(4):
        assert chat(cluster.url, DEFAULT, [{"role": "user", "content": f"after {i}"}])["usage"]["completion_tokens"]
    # ... and the lost replicas come back on the head, the capacity that is left.
    wait_for(lambda: replicas(APP, DEFAULT) == 2 and replicas(APP, AFFINITY) == 2, 300,
             "both pools to be back at 2 running replicas", 2.0)
    for pool in (DEFAULT, AFFINITY):
        placed = stats_by_replica(pool)
        assert {s.node_id for s in placed.values()} == {cluster.head.node_id}, placed
    assert app_status(APP) == "RUNNING"
    for pool in (DEFAULT, AFFINITY):
        assert chat(cluster.url, pool, [{"role": "user", "content": "back"}])["usage"]["completion_tokens"]
