"""`build_app`: the Serve `import_path` target. YAML args -> AppArgs -> one ingress bound to one deployment per pool.

Each pool is a deployment of the same `ChatGLM2Server` class named after its model (`chatglm2-6b`,
`chatglm2-6b-int8`, `chatglm2-6b-int4`), so a Serve config's `deployments:` entries set each pool's replicas,
autoscaling, GPU fraction and queue limits the standard way. The args are validated once, here; each deployment is
bound only its own resolved config (`IngressConfig`, a `PoolConfig` per pool: serve_app/config.py) and each pool the
engine factory it builds its engine with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ray.serve import Application

from serve_app.api.ingress import ChatIngress
from serve_app.config import AppArgs, PoolArgs, PoolConfig
from serve_app.server.deployment import ChatGLM2Server
from serve_app.server.engine_factory import ReplicaEngine, build_engine

__all__ = ["AppArgs", "PoolArgs", "build_app", "build_graph"]


def check_adapters(pools: list[PoolConfig]) -> None:
    """Read every pool's adapters against its checkpoint's config, where that checkpoint is already there (a demo
    checkpoint is written by the replicas: theirs check them then): a bad one fails the deploy here, by name."""
    from serve_app.model.checkpoint import read_config
    from serve_app.server.engine_factory import read_adapters

    for pool in pools:
        if pool.adapters and (Path(pool.checkpoint) / "config.json").is_file():
            read_adapters(pool.adapters, pool.checkpoint, read_config(pool.checkpoint))


def build_app(args: AppArgs) -> Application:
    """Serve validates the YAML `args` into AppArgs (annotated parameter) before calling this; a bad value fails
    here, at deploy time, with the field's path. (Serve calls a builder with the args alone: the engine factory is
    `build_graph`'s.)"""
    return build_graph(args)


def build_graph(args: AppArgs, engine_factory: Callable[[PoolConfig], ReplicaEngine] = build_engine) -> Application:
    """The ingress bound to one pool deployment per pool; `engine_factory` is what each pool replica builds its
    engine with (tests pass a fake one: tests/fake_engine.py)."""
    if not isinstance(args, AppArgs):  # called from Python with a dict
        args = AppArgs.model_validate(args)
    check_adapters(args.pool_configs())
    pools = {pool.name: ChatGLM2Server.options(name=pool.name).bind(pool, engine_factory)
             for pool in args.pool_configs()}
    return ChatIngress.bind(pools, args.ingress_config())
