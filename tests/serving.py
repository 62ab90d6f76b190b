"""Starting the real application for tests: a Serve config (as in configs/*.yaml) deployed the way `serve run` does,
on one Ray node (`running`) or on a cluster of several `ray start` nodes on this machine (`local_cluster`)."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

from serve_app import local_ray
from serve_app.api.proxy_guard import PROXY_ENV
from serve_app.local_ray import (  # noqa: F401 (the tests' one import of these)
    ROOT,
    ClusterNode,
    LocalCluster,
    app_status,
    free_port,
    replicas,
    wait_for,
)


def local_config(checkpoint: Path, fake_engine: dict | None = None, **arg_overrides) -> dict:
    """serve_app.local_ray.local_config; with `fake_engine` (tests/fake_engine.py's FakeSettings, as a dict) the
    pools run the fake engine instead of the model: for tests of the Serve graph rather than of the model."""
    config = local_ray.local_config(checkpoint, **arg_overrides)
    if fake_engine is not None:
        app = config["applications"][0]
        app["import_path"] = "tests.fake_engine:build_fake_app"
        app["args"]["fake_engine"] = fake_engine
    return config


def deploy(config: dict, http_port: int, timeout_s: float = 180.0, grpc_port: int | None = None) -> None:
    """Start Serve on `http_port` and deploy `config` (what `serve run config.yaml` does), then wait for RUNNING.

    With `grpc_port`, the config's gRPC proxy (grpc_options) is started too, on that port."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    grpc_options = None
    if grpc_port is not None:
        grpc_options = config["grpc_options"] = {**config.get("grpc_options", {}), "port": grpc_port}
    client = serve_start(http_options=config["http_options"], grpc_options=grpc_options)
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    wait_for(lambda: app_status(config["applications"][0]["name"]) == "RUNNING", timeout_s,
             "the application to be RUNNING")


def ws_exchange(url: str, payload: str, headers: dict | None = None) -> tuple[list[dict], int]:
    """Send one message to a WebSocket URL (http:// is rewritten to ws://); return every JSON message received
    and the close code."""
    import json

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    received = []
    with connect(url.replace("http", "ws", 1), open_timeout=30, additional_headers=headers) as ws:
        try:
            ws.send(payload)
        except ConnectionClosed:
            pass  # a server that refuses (e.g. no API key) may close at once; its error message is still to be read
        try:
            while True:
                received.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed:
            pass
        return received, ws.close_code


@contextlib.contextmanager
def environment(**values: str):
    """`os.environ` with `values` set, restored after (Ray's processes inherit the environment that starts Ray)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@contextlib.contextmanager
def _running(config: dict, *, grpc: bool = False, num_cpus: int = 3, **ray_init):
    """Ray (logical num_cpus, other `ray.init` arguments as given) + Serve with `config` deployed on free ports, for
    one test module's fixture. Yields (HTTP base URL, gRPC port or None); shuts Serve and Ray down after, also when
    the deploy fails."""
    import ray
    from ray import serve

    for key, value in PROXY_ENV.items():  # the proxy Ray starts here cuts off stalled readers, as `make serve`'s
        os.environ.setdefault(key, value)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_init)
    try:
        http_port, grpc_port = free_port(), (free_port() if grpc else None)
        deploy(config, http_port, grpc_port=grpc_port)
        yield f"http://127.0.0.1:{http_port}", grpc_port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def running(config: dict, *, grpc: bool = False, num_cpus: int = 3, **ray_init):
    """A cluster for one test module (see `_running`); the shared demo service, if up, is stopped first."""
    stop_demo_service()
    with _running(config, grpc=grpc, num_cpus=num_cpus, **ray_init) as urls:
        yield urls


class _Demo:
    stack: contextlib.ExitStack | None = None
    urls: tuple[str, int | None] | None = None


def demo_service(checkpoint: Path) -> tuple[str, int]:
    """configs/local.yaml (all three pools, gRPC on) served once for every module that needs nothing else: started
    on first use, kept across modules (tests/conftest.py runs those modules together) and stopped by the next
    `running()` or at the end of the session. Returns (HTTP base URL, gRPC port)."""
    if _Demo.stack is None:
        stack = contextlib.ExitStack()
        _Demo.urls = stack.enter_context(_running(local_config(checkpoint), grpc=True, num_cpus=3))
        _Demo.stack = stack
    return _Demo.urls


def stop_demo_service() -> None:
    if _Demo.stack is not None:
        stack, _Demo.stack, _Demo.urls = _Demo.stack, None, None
        stack.close()


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`chatglm2-serve ARGS` as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def engine_stats(pool: str, app: str = "chatglm2"):
    """The `ReplicaStats` of one replica of `pool` (Serve picks which), through a deployment handle."""
    from ray import serve

    return serve.get_deployment_handle(pool, app_name=app).engine_stats.remote().result()


def engine_stats_by_replica(pool: str, app: str = "chatglm2", calls: int = 12) -> dict:
    """Engine stats per replica id of `pool`, from `calls` calls that Serve spreads over its replicas."""
    return {stats.replica_id: stats for stats in (engine_stats(pool, app) for _ in range(calls))}


@contextlib.contextmanager
def local_cluster(env: dict[str, str] | None = None):
    """serve_app.local_ray.local_cluster, with the shared demo service stopped first."""
    stop_demo_service()
    with local_ray.local_cluster(env) as cluster:
        yield cluster
