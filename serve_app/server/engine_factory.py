"""`build_engine(pool_config)`: what a pool replica runs on, built from its `PoolConfig`.

The pool deployment (server/deployment.py) receives this factory as an argument (`build_app` passes it), the way Ray
Serve LLM's server takes its engine class: the deployment only turns requests into engine calls and engine output
into text deltas, so the Serve graph runs just as well on a small fake engine (tests/fake_engine.py). The real one:

1. writes the demo checkpoint if the config asks for one and it is missing;
2. on a GPU, caps the process at its Ray GPU share (server/gpu_share.py);
3. loads the tokenizer and the model at the pool's precision;
4. sizes the KV cache from what the share leaves, and builds the continuous-batching `Engine`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from serve_app.config import PoolConfig
from serve_app.model.tokenizer import ChatGLM2Tokenizer

logger = logging.getLogger("ray.serve")


class PoolEngine(Protocol):
    """What the pool deployment uses of an engine (serve_app/engine/engine.py's `Engine` is the real one)."""

    max_seq_len: int
    failure: str | None

    def generate(self, prompt_ids: list[int], params: Any, request_id: str | None = None): ...

    def stats(self) -> Any: ...

    def healthy(self) -> bool: ...


@dataclass
class ReplicaEngine:
    """A pool replica's engine, the tokenizer its prompts are built with, and (on a GPU) its memory plan."""

    engine: PoolEngine
    tokenizer: ChatGLM2Tokenizer
    memory_plan: Any = None  # gpu_share.MemoryPlan
    adapters: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> model/adapters.py's, read at start


def read_adapters(adapters, checkpoint: str, model_config) -> dict[str, Any]:
    """Every adapter of a pool (config.AdapterArgs) read and checked against its base model (a demo one written
    first if missing); the first that fails raises AdapterError naming it (a replica that cannot serve its adapters
    does not start, so the deploy fails)."""
    from serve_app.model.adapters import AdapterError, read_adapter, write_demo_adapter

    out = {}
    for adapter in adapters:
        try:
            if adapter.demo is not None:
                write_demo_adapter(adapter.path, adapter.demo, checkpoint)
            out[adapter.name] = read_adapter(adapter.path, model_config)
        except AdapterError as exc:
            raise AdapterError(f"adapter {adapter.name!r}: {exc}") from exc
    return out


def ensure_checkpoint(checkpoint: str, demo_preset: str | None) -> None:
    """Write the demo checkpoint `demo_preset` to `checkpoint` unless one is there."""
    if demo_preset and not (Path(checkpoint) / "config.json").is_file():
        from serve_app.model.demo import write_demo_checkpoint

        # Several replicas may start at once: write aside, then rename into place atomically.
        target = Path(checkpoint)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        write_demo_checkpoint(tmp, demo_preset)
        try:
            tmp.rename(target)
        except OSError:  # another replica won the race
            shutil.rmtree(tmp, ignore_errors=True)


def build_engine(config: PoolConfig) -> ReplicaEngine:
    import torch

    from serve_app.engine.engine import Engine
    from serve_app.engine.structured import Grammars
    from serve_app.model.loader import load_model, resolve_device
    from serve_app.server import gpu_share

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    ensure_checkpoint(config.checkpoint, config.demo_preset)
    tokenizer = ChatGLM2Tokenizer(config.checkpoint)
    device = resolve_device(config.device)
    share = (gpu_share.ray_gpu_share() or 1.0) if device.type == "cuda" else None
    if share is not None:
        gpu_share.limit_process(device, share, config.cuda_context_bytes)
    loaded = load_model(config.checkpoint, config.precision, config.device, quant_kernel=config.quant.kernel,
                        allow_kernel_fallback=config.quant.allow_fallback)
    engine_config, plan = config.engine, None
    adapters = read_adapters(config.adapters, config.checkpoint, loaded.config)
    if adapters:  # one spare slot: an adapter unloaded while its requests finish still holds its own
        engine_config = dataclasses.replace(engine_config, max_adapters=max(engine_config.max_adapters,
                                                                            config.max_loaded_adapters + 1))
    if share is not None:
        plan = gpu_share.plan_replica(loaded, share=share, engine=engine_config,
                                      context_bytes=config.cuda_context_bytes)
        engine_config = dataclasses.replace(engine_config, kv_cache_bytes=plan.kv_cache_bytes)
    grammars = Grammars(tokenizer, loaded.config.padded_vocab_size)  # response_format and tools
    engine = Engine(loaded, engine_config, grammars)
    _log_ready(config.name, loaded, engine, share, plan)
    return ReplicaEngine(engine, tokenizer, plan, adapters)


def _log_ready(name: str, loaded, engine, share: float | None, plan) -> None:
    stats = engine.stats()
    logger.info(
        "pool %s ready: %s on %s, kernels %s, dense linears %s, %.1f MB of weights, KV cache %.1f MB (%d blocks of "
        "%d tokens: %d sequences of %d tokens, up to %d decoded together)%s",
        name, loaded.precision, loaded.device, loaded.kernels or "none (not quantized)", loaded.dense_kernels or "aten",
        loaded.weight_bytes() / 1e6, stats.kv_cache_bytes / 1e6, stats.num_blocks, stats.block_size,
        stats.kv_capacity_tokens // stats.max_seq_len, stats.max_seq_len, stats.num_slots,
        f", GPU share {share} ({plan.budget_bytes / 2**30:.1f} GiB, allocator fraction "
        f"{plan.memory_fraction:.3f})" if plan else "",
    )
    check = stats.device_check
    logger.info(
        "pool %s decode path: %s; warm-up %.1f s (%d graphs, buckets %s); device check %s",
        name, stats.decode_path, engine.warmup["seconds"], engine.warmup["graphs"], engine.warmup["buckets"] or "none",
        "not run" if check is None else
        f"{'passed' if check['passed'] else 'FAILED'} in {check['seconds']:.2f} s (max |logit error| "
        f"{check['max_abs_error']:.3g}, bound {check['bound']:.3g})",
    )
