"""Starting the real application for tests: a Serve config (as in configs/*.yaml) deployed the way `serve run` does."""

from __future__ import annotations

import contextlib
import copy
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_config(checkpoint: Path, **arg_overrides) -> dict:
    """configs/local.yaml with the test's checkpoint and `args` overrides, for deploying into a test cluster. The
    `deployments:` entries of pools the overrides leave out are dropped (Serve refuses entries for no deployment)."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"].update({"checkpoint": str(checkpoint), "demo_preset": None, **arg_overrides})
    pools = {pool["model"] for pool in app["args"]["pools"]}
    app["deployments"] = [d for d in app["deployments"] if d["name"] == "ChatIngress" or d["name"] in pools]
    return config


def deploy(config: dict, http_port: int, timeout_s: float = 180.0, grpc_port: int | None = None) -> None:
    """Start Serve on `http_port` and deploy `config` (what `serve run config.yaml` does), then wait for RUNNING.

    With `grpc_port`, the config's gRPC proxy (grpc_options) is started too, on that port."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    grpc_options = None
    if grpc_port is not None:
        grpc_options = config["grpc_options"] = {**config.get("grpc_options", {}), "port": grpc_port}
    client = serve_start(http_options=config["http_options"], grpc_options=grpc_options)
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    wait_for(lambda: _app_status(serve, config) == "RUNNING", timeout_s, "the application to be RUNNING")


def _app_status(serve, config) -> str:
    name = config["applications"][0]["name"]
    app = serve.status().applications.get(name)
    if app is not None and app.status == "DEPLOY_FAILED":
        raise RuntimeError(f"deploy failed: {app.message}")
    return app.status if app else "MISSING"


def replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


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
def running(config: dict, *, grpc: bool = False, num_cpus: int = 3, **ray_init):
    """Ray (logical num_cpus, other `ray.init` arguments as given) + Serve with `config` deployed on free ports, for
    one test module's fixture. Yields (HTTP base URL, gRPC port or None); shuts Serve and Ray down after, also when
    the deploy fails."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_init)
    try:
        http_port, grpc_port = free_port(), (free_port() if grpc else None)
        deploy(config, http_port, grpc_port=grpc_port)
        yield f"http://127.0.0.1:{http_port}", grpc_port
    finally:
        serve.shutdown()
        ray.shutdown()


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`chatglm2-serve ARGS` as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def engine_stats(pool: str, app: str = "chatglm2") -> dict:
    """Engine stats of one replica of `pool` (Serve picks which), through a deployment handle."""
    from ray import serve

    return serve.get_deployment_handle(pool, app_name=app).engine_stats.remote().result()


def engine_stats_by_replica(pool: str, app: str = "chatglm2", calls: int = 12) -> dict[str, dict]:
    """Engine stats per replica id of `pool`, from `calls` calls that Serve spreads over its replicas."""
    return {stats["replica_id"]: stats for stats in (engine_stats(pool, app) for _ in range(calls))}
