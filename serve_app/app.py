"""`build_app`: the Serve `import_path` target. YAML args -> AppArgs -> one ingress bound to one deployment per pool.

Each pool is a deployment of the same `ChatGLM2Server` class named after its model (`chatglm2-6b`,
`chatglm2-6b-int8`, `chatglm2-6b-int4`), so a Serve config's `deployments:` entries set each pool's replicas,
autoscaling, GPU fraction and queue limits the standard way.
"""


from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from ray.serve import Application

from serve_app.api.ingress import ChatIngress, GenerationDefaults, IngressConfig
from serve_app.server.deployment import ChatGLM2Server, EngineArgs, ServerConfig


class PoolArgs(BaseModel):
    """One replica pool: a public model name, the precision its replicas load, and optionally its own checkpoint."""

    model: str = Field(description="public model name and Serve deployment name, e.g. chatglm2-6b-int4")
    precision: str = Field(description="auto (fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | int8 | int4")
    checkpoint: str | None = Field(default=None, description="this pool's checkpoint (e.g. a pre-quantized one)")
    engine: EngineArgs | None = Field(default=None, description="engine limits; default: the app's `engine`")


def _default_pools() -> list[PoolArgs]:
    return [
        PoolArgs(model="chatglm2-6b", precision="auto"),
        PoolArgs(model="chatglm2-6b-int8", precision="int8"),
        PoolArgs(model="chatglm2-6b-int4", precision="int4"),
    ]


class AppArgs(BaseModel):
    """The `args:` of the application in a Serve config."""

    checkpoint: str = Field(description="official ChatGLM2 checkpoint directory used by pools that name none")
    demo_preset: str | None = Field(
        default=None, description="tiny | small: write this demo checkpoint to `checkpoint` first if it is missing"
    )
    pools: list[PoolArgs] = Field(default_factory=_default_pools, min_length=1,
                                  description="replica pools, highest precision first")
    default_model: str | None = Field(default=None, description="pool for requests that name no model; default: first")
    routing: str = Field(default="default", pattern="^(default|auto)$",
                         description="'auto' sends requests that name no model to the best pool with headroom")
    device: str = Field(default="auto", description="auto | cpu | cuda")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads per replica")
    engine: EngineArgs = Field(default_factory=EngineArgs, description="engine limits of every pool")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults,
                                         description="sampling defaults for requests that leave them out")
    max_history_rounds: int = Field(default=10, ge=0, description="history kept by /chat and /stream")
    max_prompt_chars: int = Field(default=32768, ge=1, description="longest accepted user message")
    api_keys_env: str | None = Field(
        default=None, description="environment variable (in the ingress replica) holding comma-separated API keys; "
        "when it is set and non-empty every protocol requires one of them (HTTP/WebSocket/gRPC: Bearer <key>)")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="browser origins allowed by CORS (exact match; '*' allows any)")
    max_body_bytes: int = Field(default=1_048_576, ge=1, description="largest accepted HTTP request body (else 413)")
    log_prompts: bool = Field(default=False, description="log prompt and reply text (off: counts and ids only)")

    @model_validator(mode="after")
    def _check_pools(self) -> "AppArgs":
        names = [pool.model for pool in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool model names must be unique: {names}")
        if "auto" in names:
            raise ValueError("'auto' is the routing policy's name; a pool cannot be called that")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the pools {names}")
        return self


def _absolute(path: str) -> str:
    # Replicas may start in another working directory than `serve run`; relative paths mean the caller's.
    return str(Path(path).expanduser().resolve())


def build_app(args: AppArgs) -> Application:
    pools = {}
    for pool in args.pools:
        checkpoint = _absolute(pool.checkpoint or args.checkpoint)
        config = ServerConfig(
            model_name=pool.model,
            checkpoint=checkpoint,
            precision=pool.precision,
            device=args.device,
            engine=pool.engine or args.engine,
            torch_threads=args.torch_threads,
            demo_preset=args.demo_preset if pool.checkpoint is None else None,
            log_prompts=args.log_prompts,
        )
        pools[pool.model] = ChatGLM2Server.options(name=pool.model).bind(config)
    ingress = IngressConfig(
        pools=[pool.model for pool in args.pools],
        default_model=args.default_model or args.pools[0].model,
        routing=args.routing,
        defaults=args.defaults,
        max_history_rounds=args.max_history_rounds,
        max_prompt_chars=args.max_prompt_chars,
        api_keys_env=args.api_keys_env,
        cors_origins=args.cors_origins,
        max_body_bytes=args.max_body_bytes,
    )
    return ChatIngress.bind(pools, ingress)
