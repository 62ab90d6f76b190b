"""The application's args (the `args:` of a Serve config) and what each deployment is given of them.

`AppArgs` is the YAML schema users write, validated once by `build_app` (a bad value fails there, with the field's
path). `build_app` then resolves one config per deployment and binds each deployment only its own:

    AppArgs --ingress_config()--> IngressConfig   (serve_app/api/ingress_config.py: routing, defaults, limits, keys)
            --pool_configs()----> PoolConfig each  (checkpoint, precision, device, engine limits, quant, memory plan)

A pool's `engine:` / `quant:` / `checkpoint:` fall back to the app's here, once. Every value set is defined beside the
code that implements it (precisions in the loader, presets in demo.py, kernels with the kernels, attention backends in
model/attention.py through EngineConfig) and every default once, here or in the module the ingress reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve_app.api.ingress_config import FrozenArgs, GenerationDefaults, IngressArgs, IngressConfig
from serve_app.api.pool_choice import AUTO
from serve_app.engine.engine_config import EngineConfig
from serve_app.model.adapters import DEMO_ADAPTERS
from serve_app.model.demo import PRESETS
from serve_app.model.loader import DEVICES, PRECISIONS
from serve_app.model.quant_kernels import QUANT_KERNELS
from serve_app.server.gpu_share import DEFAULT_CONTEXT_BYTES

__all__ = ["AdapterArgs", "AppArgs", "GenerationDefaults", "IngressConfig", "PoolArgs", "PoolConfig", "QuantArgs"]

Precision = Literal[PRECISIONS]
Device = Literal[DEVICES]
DemoPreset = Literal[tuple(PRESETS)]
QuantKernel = Literal[QUANT_KERNELS]


def _absolute(path: str) -> str:
    # Replicas may start in another working directory than `serve run`; relative paths mean the caller's.
    return str(Path(path).expanduser().resolve())


class QuantArgs(FrozenArgs):
    """How the int8/int4 layers of a pool run (serve_app/model/quant_kernels.py)."""

    kernel: QuantKernel = Field(
        default="auto", description="auto (Triton on GPU, PyTorch's on CPU) | triton | native (PyTorch's) | dequant "
        "(the reference: dequantize + matmul)")
    allow_fallback: bool = Field(
        default=False, description="run dequantize + matmul (~10x slower) where the kernel fails its load-time check, "
        "instead of refusing to start")


class PoolArgs(FrozenArgs):
    """One replica pool: a public model name, the precision its replicas load, and optionally its own checkpoint."""

    model: str = Field(min_length=1, description="public model name and Serve deployment name, e.g. chatglm2-6b-int4")
    precision: Precision = Field(description="auto (fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | int8 | int4")
    checkpoint: str | None = Field(default=None, description="this pool's checkpoint (e.g. a pre-quantized one)")
    engine: EngineConfig | None = Field(default=None, description="engine limits; default: the app's `engine`")
    quant: QuantArgs | None = Field(default=None, description="quantized kernels; default: the app's `quant`")

    _absolute_checkpoint = field_validator("checkpoint")(lambda cls, value: value and _absolute(value))


class AdapterArgs(FrozenArgs):
    """A fine-tuned adapter (P-tuning v2 or peft LoRA, its kind read from its files: model/adapters.py)."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="the `model` requests name it by (or `<pool>:<name>`)")
    path: str = Field(min_length=1, description="its directory")
    pools: list[str] | None = Field(default=None, min_length=1,
                                    description="the pools it is enabled on, first one first; default: every pool")
    demo: Literal[DEMO_ADAPTERS] | None = Field(
        default=None, description="write a random demo adapter of this kind to `path` first if it is missing (for "
        "the demo checkpoints)")

    _absolute_path = field_validator("path")(lambda cls, value: _absolute(value))


class PoolConfig(FrozenArgs):
    """Everything one pool's replicas read, resolved from AppArgs by `build_app` (no defaults of its own)."""

    name: str  # the public model name, also the Serve deployment's
    checkpoint: str
    demo_preset: DemoPreset | None  # write this demo checkpoint to `checkpoint` first if it is missing
    precision: Precision
    device: Device
    torch_threads: int | None
    engine: EngineConfig
    quant: QuantArgs
    cuda_context_bytes: int
    stream_coalesce_ms: float
    log_prompts: bool
    adapters: list[AdapterArgs] = []  # those enabled on this pool
    max_loaded_adapters: int = 0  # per replica, least recently used unloaded (Serve's multiplexing)


def _default_pools() -> list[PoolArgs]:
    return [
        PoolArgs(model="chatglm2-6b", precision="auto"),
        PoolArgs(model="chatglm2-6b-int8", precision="int8"),
        PoolArgs(model="chatglm2-6b-int4", precision="int4"),
    ]


class AppArgs(IngressArgs):
    """The `args:` of the application in a Serve config (the ingress's keys come from `IngressArgs`)."""

    checkpoint: str = Field(description="official ChatGLM2 checkpoint directory used by pools that name none")
    demo_preset: DemoPreset | None = Field(
        default=None, description="write this demo checkpoint to `checkpoint` first if it is missing")
    pools: list[PoolArgs] = Field(default_factory=_default_pools, min_length=1,
                                  description="replica pools, highest precision first")
    device: Device = Field(default="auto", description="auto | cpu | cuda")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads per replica")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine limits of every pool")
    quant: QuantArgs = Field(default_factory=QuantArgs, description="quantized kernels of every int8/int4 pool")
    cuda_context_bytes: int = Field(default=DEFAULT_CONTEXT_BYTES, ge=0,
                                    description="GPU memory a replica's CUDA context takes outside PyTorch's allocator")
    stream_coalesce_ms: float = Field(
        default=50.0, ge=0.0, le=100.0,
        description="a pool sends a text delta that comes within this long of the stream's previous message together "
        "with the ones that follow it within this long, as one message to the ingress; a delta that comes later (a "
        "slow stream) and the first token of a reply are sent at once; 0 sends every delta alone")

    adapters: list[AdapterArgs] = Field(
        default_factory=list, max_length=1024, description="fine-tuned adapters served on the pools (P-tuning v2, "
        "LoRA); a request picks one by `model`")
    max_loaded_adapters: int = Field(
        default=4, ge=1, le=64, description="adapters a replica holds at once (Serve's multiplexing: the least "
        "recently used is unloaded past it, and requests go to replicas that hold theirs)")

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
        adapters = [adapter.name for adapter in self.adapters]
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"adapter names must be unique: {adapters}")
        for adapter in self.adapters:
            if adapter.name in names or adapter.name == AUTO:
                raise ValueError(f"adapter {adapter.name!r}: a pool or the routing policy is called that")
            if unknown := [pool for pool in adapter.pools or () if pool not in names]:
                raise ValueError(f"adapter {adapter.name!r}: no pool is called {', '.join(map(repr, unknown))}")
        return self

    def adapter_pools(self) -> dict[str, list[str]]:
        """adapter -> the pools it is enabled on, first one first."""
        return {adapter.name: list(adapter.pools or self.pool_names) for adapter in self.adapters}

    @property
    def pool_names(self) -> list[str]:
        """Pool names, highest precision first."""
        return [pool.model for pool in self.pools]

    def ingress_config(self) -> IngressConfig:
        return IngressConfig(pool_names=self.pool_names, adapters=self.adapter_pools(),
                             **{key: getattr(self, key) for key in IngressArgs.model_fields})

    def pool_configs(self) -> list[PoolConfig]:
        """One config per pool, highest precision first: a pool's own checkpoint, engine and quant win over the
        app's, and a pool with its own checkpoint never gets a demo written there."""
        return [PoolConfig(
            name=pool.model, checkpoint=pool.checkpoint or self.checkpoint,
            demo_preset=self.demo_preset if pool.checkpoint is None else None, precision=pool.precision,
            device=self.device, torch_threads=self.torch_threads, engine=pool.engine or self.engine,
            quant=pool.quant or self.quant, cuda_context_bytes=self.cuda_context_bytes,
            stream_coalesce_ms=self.stream_coalesce_ms, log_prompts=self.log_prompts,
            adapters=[a for a in self.adapters if pool.model in self.adapter_pools()[a.name]],
            max_loaded_adapters=self.max_loaded_adapters if self.adapters else 0,
        ) for pool in self.pools]
