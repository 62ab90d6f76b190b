"""AppArgs: the `args:` of the application in a Serve config, validated once by `build_app`.

Every default and bound of the service lives here or in the one dataclass it embeds (`EngineConfig`, the engine's own
limits). `build_app` validates the YAML into `AppArgs` (a bad value fails there, with the field's path) and hands the
same object to every deployment: the ingress and the pools read what they need from it, nothing is copied field by
field. Importing this module loads neither torch nor Ray, so the front end can use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.engine.config import EngineConfig

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"]
Device = Literal["auto", "cpu", "cuda"]
DemoPreset = Literal["tiny", "small", "6b"]
Routing = Literal["default", "auto"]
QuantKernel = Literal["auto", "triton", "native", "dequant"]
AUTO = "auto"  # the routing policy's name; also accepted as a request's `model`


def _absolute(path: str) -> str:
    # Replicas may start in another working directory than `serve run`; relative paths mean the caller's.
    return str(Path(path).expanduser().resolve())


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt key fails instead of being ignored


class GenerationDefaults(_Args):
    """Used when a request leaves a parameter out (the official api.py's defaults)."""

    temperature: float = Field(default=0.95, ge=0.0, le=2.0)
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    max_length: int = Field(default=2048, ge=1, description="prompt + reply tokens when a request gives no limit")


class QuantArgs(_Args):
    """How the int8/int4 layers of a pool run (serve_app/model/quant.py)."""

    kernel: QuantKernel = Field(
        default="auto", description="auto (Triton on GPU, PyTorch's on CPU) | triton | native (PyTorch's) | dequant "
        "(the reference: dequantize + matmul)")
    allow_fallback: bool = Field(
        default=False, description="run dequantize + matmul (~10x slower) where the kernel fails its load-time check, "
        "instead of refusing to start")


class PoolArgs(_Args):
    """One replica pool: a public model name, the precision its replicas load, and optionally its own checkpoint."""

    model: str = Field(min_length=1, description="public model name and Serve deployment name, e.g. chatglm2-6b-int4")
    precision: Precision = Field(description="auto (fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | int8 | int4")
    checkpoint: str | None = Field(default=None, description="this pool's checkpoint (e.g. a pre-quantized one)")
    engine: EngineConfig | None = Field(default=None, description="engine limits; default: the app's `engine`")
    quant: QuantArgs | None = Field(default=None, description="quantized kernels; default: the app's `quant`")

    _absolute_checkpoint = field_validator("checkpoint")(lambda cls, value: value and _absolute(value))


def _default_pools() -> list[PoolArgs]:
    return [
        PoolArgs(model="chatglm2-6b", precision="auto"),
        PoolArgs(model="chatglm2-6b-int8", precision="int8"),
        PoolArgs(model="chatglm2-6b-int4", precision="int4"),
    ]


class AppArgs(_Args):
    """The `args:` of the application in a Serve config."""

    checkpoint: str = Field(description="official ChatGLM2 checkpoint directory used by pools that name none")
    demo_preset: DemoPreset | None = Field(
        default=None, description="write this demo checkpoint to `checkpoint` first if it is missing")
    pools: list[PoolArgs] = Field(default_factory=_default_pools, min_length=1,
                                  description="replica pools, highest precision first")
    default_model: str | None = Field(default=None, description="pool for requests that name no model; default: first")
    routing: Routing = Field(default="default",
                             description="'auto' sends requests that name no model to the best pool with headroom")
    device: Device = Field(default="auto", description="auto | cpu | cuda")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads per replica")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine limits of every pool")
    quant: QuantArgs = Field(default_factory=QuantArgs, description="quantized kernels of every int8/int4 pool")
    cuda_context_bytes: int = Field(default=1 << 30, ge=0,
                                    description="GPU memory a replica's CUDA context takes outside PyTorch's allocator")
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
    stream_coalesce_ms: float = Field(
        default=50.0, ge=0.0, le=100.0,
        description="a pool sends a text delta that comes within this long of the stream's previous message together "
        "with the ones that follow it within this long, as one message to the ingress; a delta that comes later (a "
        "slow stream) and the first token of a reply are sent at once; 0 sends every delta alone")

    _absolute_checkpoint = field_validator("checkpoint")(lambda cls, value: _absolute(value))

    @model_validator(mode="after")
    def _check_pools(self) -> AppArgs:
        names = self.pool_names
        if len(set(names)) != len(names):
            raise ValueError(f"pool model names must be unique: {names}")
        if AUTO in names:
            raise ValueError("'auto' is the routing policy's name; a pool cannot be called that")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the pools {names}")
        return self

    @property
    def pool_names(self) -> list[str]:
        """Pool names, highest precision first."""
        return [pool.model for pool in self.pools]

    @property
    def default_pool(self) -> str:
        return self.default_model or self.pools[0].model

    def pool(self, name: str) -> PoolArgs:
        return next(pool for pool in self.pools if pool.model == name)

    def checkpoint_of(self, pool: PoolArgs) -> str:
        return pool.checkpoint or self.checkpoint

    def demo_preset_of(self, pool: PoolArgs) -> DemoPreset | None:
        """A pool with its own checkpoint never gets a demo written there."""
        return self.demo_preset if pool.checkpoint is None else None

    def engine_of(self, pool: PoolArgs) -> EngineConfig:
        return pool.engine or self.engine

    def quant_of(self, pool: PoolArgs) -> QuantArgs:
        return pool.quant or self.quant
