"""The head node's loss, survived: GCS fault tolerance backed by a real `redis-server`, on a real two-node cluster.

A head and a worker node (separate `ray start` processes, tests/serving.py `LocalCluster`) with RAY_REDIS_ADDRESS
pointing at a redis-server this module starts. The application (fake engine: this is about Ray and Serve, not the
model) runs its ingress and pool on the worker, and clients talk to the worker's Serve proxy, as they reach the worker
pods through the Kubernetes Service. Every process of the head is SIGKILLed under load, the head stays down for
OUTAGE_S, then a new head starts on the same GCS port: requests keep being served throughout and after, and the worker
rejoins the new head (every node alive). Serve's controller comes back on the new head by itself (a detached actor
that Ray restarts wherever the head resource is) and reports the application RUNNING with its replicas: checked from a
new driver, as `serve status` would, since this test's own driver still holds the handle of the controller that died.

redis-server is Debian's package (`make test` installs it; in CI a missing one is a failure, not a skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving import free_port, local_cluster, local_config, wait_for

pytestmark = pytest.mark.slow
APP = "chatglm2"
POOL = "chatglm2-6b"
OUTAGE_S = 8.0
INTERVAL_S = 0.25


@pytest.fixture(scope="module")
def redis_address():
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (`make test` installs Debian's package)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", 30, "redis-server to start")
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=30)


# What a new driver sees: the applications' and deployments' states, and where the controller and the head are.
STATUS = r"""
import json, sys
import ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
apps = serve.status().applications
controller = ray.get(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve").get_actor_details.remote())
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
print(json.dumps({"apps": {name: app.status for name, app in apps.items()},
                  "replicas": {name: dict(d.replica_states) for app in apps.values()
                               for name, d in app.deployments.items()},
                  "controller_node": controller.node_id, "head_node": head}))
"""


def status_from_a_new_driver(cluster) -> dict | None:
    try:
        run = subprocess.run([sys.executable, "-c", STATUS, cluster.address], env=cluster.env, capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None


def app_config(checkpoint) -> dict:
    config = local_config(checkpoint, fake_engine={"token_delay_s": 0.002},
                          pools=[{"model": POOL, "precision": "fp32"}])
    config.pop("grpc_options")  # its fixed port would clash with other Ray instances on the machine
    config["proxy_location"] = "EveryNode"
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    on_worker = {"num_cpus": 0.5, "resources": {"worker": 0.1}}  # nothing the clients use runs on the head
    config["applications"][0]["deployments"] = [
        {"name": "ChatIngress", "num_replicas": 1, "ray_actor_options": on_worker},
        {"name": POOL, "num_replicas": 1, "ray_actor_options": on_worker}]
    return config


def test_requests_are_served_while_the_head_is_down_and_the_cluster_is_whole_after(tiny_checkpoint, redis_address):
    from ray import serve

    env = {"RAY_REDIS_ADDRESS": redis_address, "RAY_external_storage_namespace": "chatglm2-head-loss"}
    with local_cluster(env) as cluster:
        head = cluster.start_head(num_cpus=1, num_gpus=0)
        worker_port = free_port()
        cluster.add_worker("worker", num_cpus=2, num_gpus=0, resources={"worker": 1}, http_port=worker_port)
        cluster.serve_run(app_config(tiny_checkpoint))
        url = f"http://127.0.0.1:{worker_port}"
        wait_for(lambda: serve.status().applications.get(APP) is not None
                 and serve.status().applications[APP].status == "RUNNING", 240, "the application to be RUNNING")

        log: list[tuple[float, int | str]] = []
        stop = threading.Event()
        body = {"model": POOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

        def clients() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        status: int | str = client.post(f"{url}/v1/chat/completions", json=body).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    log.append((sent, status))
                    time.sleep(INTERVAL_S)

        thread = threading.Thread(target=clients)
        thread.start()
        try:
            wait_for(lambda: len(log) >= 4, 60, "requests before the loss")
            killed = time.monotonic()
            cluster.kill(head)
            time.sleep(OUTAGE_S)
            restarted = time.monotonic()
            cluster.restart_head(num_cpus=1, num_gpus=0)  # returns once the worker has rejoined it
            whole = time.monotonic()
            recovered: dict = {}

            def controller_back() -> bool:
                status = status_from_a_new_driver(cluster)
                if status and status["apps"].get(APP) == "RUNNING":
                    recovered.update(status)
                return bool(recovered)

            wait_for(controller_back, 180, "Serve's controller to report the application RUNNING again")
            controller_at = time.monotonic()
            after = len(log)
            wait_for(lambda: len(log) >= after + 8, 60, "requests after the restart")
        finally:
            stop.set()
            thread.join(timeout=60)

        outage = [status for sent, status in log if killed <= sent < restarted]
        recovery = [status for sent, status in log if restarted <= sent < whole]
        later = [status for sent, status in log if sent >= whole]
        print(f"head down {restarted - killed:.1f} s: {outage.count(200)}/{len(outage)} served; restarting "
              f"{whole - restarted:.1f} s: {recovery.count(200)}/{len(recovery)} served; Serve's controller reported "
              f"RUNNING {controller_at - whole:.1f} s after that; after: {later.count(200)}/{len(later)} served")
        # The controller runs on the new head, and the replicas it recovered are the ones that served all along.
        assert recovered["controller_node"] == recovered["head_node"]
        assert recovered["replicas"] == {"ChatIngress": {"RUNNING": 1}, POOL: {"RUNNING": 1}}
        assert len(outage) >= 8  # the clients kept sending while the head was down ...
        assert outage == [200] * len(outage)  # ... and every request was served through the worker's proxy
        assert recovery == [200] * len(recovery) and later == [200] * len(later)
