"""Running the application on this machine's Ray as a user would: `local_config` (configs/local.yaml with other
args), `wait_for` / `app_status` / `replicas` to watch it, and `LocalCluster`, several `ray start` nodes with Serve
deployed by `serve run --address`. scripts/cluster.py and the tests (tests/serving.py) start clusters through it.
A development tool: it reads configs/ from this checkout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve_app.api.proxy_guard import PROXY_ENV

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_config(checkpoint: Path, **arg_overrides) -> dict:
    """configs/local.yaml with `checkpoint` and `args` overrides, for deploying into a local cluster. The
    `deployments:` entries of pools the overrides leave out are dropped (Serve refuses entries for no deployment)."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"].update({"checkpoint": str(checkpoint), "demo_preset": None, **arg_overrides})
    pools = {pool["model"] for pool in app["args"]["pools"]}
    adapters = []
    for adapter in app["args"].get("adapters", []):  # demo adapters beside that checkpoint, made for it
        if adapter.get("demo"):
            adapter["path"] = str(Path(checkpoint).parent / f"{Path(checkpoint).name}-adapters" / adapter["name"])
        if adapter.get("pools"):  # on the pools the overrides keep
            adapter["pools"] = [pool for pool in adapter["pools"] if pool in pools]
        if adapter.get("pools", True):
            adapters.append(adapter)
    if "adapters" in app["args"] and "adapters" not in arg_overrides:
        app["args"]["adapters"] = adapters
    app["deployments"] = [d for d in app["deployments"] if d["name"] == "ChatIngress" or d["name"] in pools]
    return config


def app_status(name: str = "chatglm2") -> str:
    """The application's Serve status; raises at once when its deploy failed."""
    from ray import serve

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


# --- several Ray nodes on this machine -----------------------------------------------------------------------------

RAY_BIN = Path(sys.executable).parent


class NodeExited(RuntimeError):
    """A `ray start` process ended while its node was starting."""


@dataclass
class ClusterNode:
    """One `ray start --block` process and everything it starts (same session): a machine of the cluster."""

    name: str
    process: subprocess.Popen
    node_id: str = ""
    http_port: int | None = None  # this node's Serve proxy, when one runs there


class LocalCluster:
    """A head and worker nodes, each a separate `ray start` on this machine with its own logical CPUs and GPUs, and
    Serve deployed with `serve run --address`, as a user drives a real cluster.

    Every port is a free one and the session directory is private, so other Ray instances on the machine are never
    touched. `kill` SIGKILLs every process of a node (its raylet, agents, and the workers of its replicas) at once:
    what the rest of the cluster sees when a machine or a Kubernetes pod vanishes. The test process joins as a
    driver, so `ray` and `serve` calls (serve.status(), handles) reach the cluster.
    """

    def __init__(self, env: dict[str, str] | None = None):
        """`env`: more environment for every node (e.g. RAY_REDIS_ADDRESS for GCS fault tolerance)."""
        # Short: Ray's Unix socket paths live under it.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.temp_dirs = [self.temp_dir]
        self.gcs_port = 0
        self.address = ""
        self.nodes: dict[str, ClusterNode] = {}
        # The nodes and this process (the driver) must use one authentication mode. Ray fixes a process's mode at
        # its first `ray.init` and keeps it: a local `ray.init()` turns token authentication on (it sets
        # RAY_AUTH_MODE=token in os.environ), joining a cluster does not. Nodes without tokens next to a driver
        # that had started a local cluster earlier got their calls into the driver refused: the workers it leased
        # were killed "because the owner died" and Serve handle calls never resolved. So the nodes take the
        # driver's mode: token once a local cluster ran in this process, else none (a fresh driver's).
        auth_mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        if auth_mode == "token":  # the token the nodes and the driver read (~/.ray/auth_token)
            subprocess.run([str(RAY_BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=auth_mode,
                        # Every node imports this checkout's serve_app, whatever the virtualenv has installed.
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        **PROXY_ENV, **(env or {}))  # every node's HTTP proxy cuts off stalled readers

    def _ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0"]  # 0: workers take ports the OS gives them

    def _start(self, name: str, args: Callable[[], list[str]], resources: dict, env: dict,
               timeout_s: float) -> ClusterNode:
        """Start a node and wait until it has joined. `ray start` gives up when its raylet has not registered within
        a fixed 30 s, which a busy 2-core machine can miss: a node that gives up is started again (fresh ports),
        twice at most."""
        for attempt in range(3):
            try:
                return self._start_once(name, args(), resources, env, timeout_s)
            except NodeExited:
                self.kill(self.nodes.pop(name))
                if attempt == 2:
                    raise

    def _start_once(self, name: str, args: list[str], resources: dict, env: dict, timeout_s: float,
                    temp_dir: str | None = None) -> ClusterNode:
        import json

        import ray

        known = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else set()
        log = open(Path(self.temp_dir) / f"{name}.out", "w")  # noqa: SIM115 (the node writes to it until killed)
        command = [str(RAY_BIN / "ray"), "start", "--block", "--temp-dir", temp_dir or self.temp_dir,
                   "--disable-usage-stats", *args, *self._ports()]
        if resources:
            command += ["--resources", json.dumps(resources)]
        process = subprocess.Popen(command, env=self.env | env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = self.nodes[name] = ClusterNode(name, process)
        try:
            if not ray.is_initialized():
                wait_for(lambda: self._head_ready(node), timeout_s, "the head node to start")
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            wait_for(lambda: self._joined(node, known), timeout_s, f"node {name} to join the cluster")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its `ray start` said:\n{self._log(name)[-3000:]}") from None
        return node

    def _log(self, name: str) -> str:
        return (Path(self.temp_dir) / f"{name}.out").read_text(errors="replace")

    def _check_running(self, node: ClusterNode) -> None:
        if node.process.poll() is not None:
            raise NodeExited(f"node {node.name} exited while starting:\n{self._log(node.name)[-3000:]}")

    def _joined(self, node: ClusterNode, known: set[str]) -> bool:
        import ray

        self._check_running(node)
        new = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known]
        node.node_id = new[0] if new else ""
        return bool(new)

    def _head_ready(self, node: ClusterNode) -> bool:
        self._check_running(node)
        text = self._log(node.name)
        if "Ray runtime started" not in text:
            return False
        # Ray advertises the machine's address, not the loopback one it was given: take it from `ray start`'s hint.
        found = re.search(rf"--address='([^':]+):{self.gcs_port}'", text)
        if not found:
            raise RuntimeError(f"no head address in `ray start`'s output:\n{text[-3000:]}")
        self.address = f"{found.group(1)}:{self.gcs_port}"
        return True

    def _head_args(self, num_cpus: int, num_gpus: int) -> list[str]:
        return ["--head", "--port", str(self.gcs_port), "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--include-dashboard", "false",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                "--ray-client-server-port", str(free_port())]

    def start_head(self, *, num_cpus: int, num_gpus: int, resources: dict | None = None,
                   timeout_s: float = 240) -> ClusterNode:
        def args() -> list[str]:
            self.gcs_port = free_port()
            return self._head_args(num_cpus, num_gpus)

        return self._start("head", args, resources or {}, {}, timeout_s)

    def restart_head(self, *, num_cpus: int, num_gpus: int, timeout_s: float = 240) -> ClusterNode:
        """A new head on the old one's GCS port, after it was killed: with GCS fault tolerance (RAY_REDIS_ADDRESS in
        `env`) it takes the cluster's state up from Redis and the surviving nodes reconnect to it. It gets a temp dir
        of its own: `ray start --head` refuses a temp dir whose address file names a GCS address that processes on
        this machine still use (the surviving raylets' command lines do)."""
        import ray

        temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        log = open(Path(self.temp_dir) / "head-restarted.out", "w")  # noqa: SIM115 (written until killed)
        command = [str(RAY_BIN / "ray"), "start", "--block", "--temp-dir", temp_dir, "--disable-usage-stats",
                   *self._head_args(num_cpus, num_gpus), *self._ports()]
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = self.nodes["head"] = ClusterNode("head-restarted", process)

        def whole() -> bool:
            self._check_running(node)
            try:
                alive = [n for n in ray.nodes() if n["Alive"]]
            except Exception:  # noqa: BLE001 (the driver is still reconnecting to the GCS)
                return False
            return len(alive) == len(self.nodes)

        wait_for(whole, timeout_s, "the restarted head and every node to be alive")
        return node

    def add_worker(self, name: str, *, num_cpus: int, num_gpus: int, resources: dict | None = None,
                   http_port: int | None = None, timeout_s: float = 240) -> ClusterNode:
        """A worker node. With `http_port`, the Serve proxy Serve starts there (proxy_location: EveryNode) listens on
        that port instead of the config's, which the head's proxy holds on this one machine."""
        def args() -> list[str]:
            return ["--address", self.address, "--node-ip-address", "127.0.0.1",
                    "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]

        env = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(http_port)} if http_port else {}
        node = self._start(name, args, resources or {}, env, timeout_s)
        node.http_port = http_port
        return node

    def _pids(self, node: ClusterNode) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(entry.name)) == node.process.pid:
                        pids.append(int(entry.name))
        return pids

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL every process of `node` at once."""
        for pid in self._pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def serve_run(self, config: dict, timeout_s: float = 240) -> None:
        """`serve run config.yaml --address <head> --non-blocking`: submit the applications and return."""
        path = Path(self.temp_dir) / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run = subprocess.run([str(RAY_BIN / "serve"), "run", str(path), "--address", self.address, "--non-blocking"],
                             env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"serve run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
        for node in reversed(list(self.nodes.values())):
            if node.process.poll() is None:
                node.process.terminate()  # `ray start --block` stops its node's processes on SIGTERM
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=20)
            self.kill(node)  # whatever is left of the session
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(env: dict[str, str] | None = None):
    """A `LocalCluster` (more node environment: `env`) shut down after, also when starting it or a test fails."""
    cluster = LocalCluster(env)
    try:
        yield cluster
    finally:
        cluster.shutdown()
