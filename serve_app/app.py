"""`build_app`: the Serve `import_path` target. YAML args -> AppArgs -> one ingress bound to one deployment per pool.

Each pool is a deployment of the same `ChatGLM2Server` class named after its model (`chatglm2-6b`,
`chatglm2-6b-int8`, `chatglm2-6b-int4`), so a Serve config's `deployments:` entries set each pool's replicas,
autoscaling, GPU fraction and queue limits the standard way. Every deployment gets the same validated `AppArgs`
(serve_app/config.py, where each field is described).
"""

from __future__ import annotations

from ray.serve import Application

from serve_app.api.ingress import ChatIngress
from serve_app.config import AppArgs, PoolArgs
from serve_app.server.deployment import ChatGLM2Server

__all__ = ["AppArgs", "PoolArgs", "build_app"]


def build_app(args: AppArgs) -> Application:
    """Serve validates the YAML `args` into AppArgs (annotated parameter) before calling this; a bad value fails
    here, at deploy time, with the field's path."""
    if not isinstance(args, AppArgs):  # called from Python with a dict
        args = AppArgs.model_validate(args)
    pools = {pool.model: ChatGLM2Server.options(name=pool.model).bind(args, pool.model) for pool in args.pools}
    return ChatIngress.bind(pools, args)
