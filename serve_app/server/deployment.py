"""The model deployment: one class, one Serve deployment per precision pool.

A replica loads the tokenizer and the model at its pool's precision, runs a continuous-batching `Engine`, and turns
text requests into streamed text deltas. Errors that belong to the request (context too long, overloaded, numeric
failure) come back as a final `TextDelta` with `error` set, so the ingress can answer with the right status code.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from ray import serve

from serve_app.api.schemas import ErrorInfo, TextDelta, TextRequest, Usage
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.errors import EngineError
from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer, TokenizerError
from serve_app.server.metrics import PoolMetrics, RequestTrace

logger = logging.getLogger("ray.serve")

_ERROR_STATUS = {"context_length_exceeded": 400, "invalid_request": 400, "overloaded": 503}


class EngineArgs(BaseModel):
    """Engine limits of every replica of a pool."""

    max_batch_size: int = Field(default=16, ge=1, description="sequences decoded together (= KV cache slots)")
    max_seq_len: int | None = Field(default=None, ge=16, description="context cap; default min(seq_length, 8192)")
    kv_cache_bytes: int | None = Field(default=None, ge=1, description="KV memory budget; fewer slots if needed")
    max_waiting: int = Field(default=64, ge=0, description="requests queued in the engine before 503s")
    prefix_caching: bool = Field(default=True, description="reuse the KV of a conversation's earlier turns")
    quant_kernel: Literal["auto", "triton", "native", "dequant"] = Field(
        default="auto", description="int8/int4 layers: auto (Triton on GPU, PyTorch's on CPU) | triton | native "
        "(PyTorch's) | dequant (the reference: dequantize + matmul)")
    allow_kernel_fallback: bool = Field(
        default=False, description="run dequantize + matmul (~10x slower) where the kernel fails its load-time "
        "check, instead of refusing to start")
    cuda_context_bytes: int = Field(default=1 << 30, ge=0,
                                    description="GPU memory the CUDA context takes outside PyTorch's allocator")


# EngineArgs fields that configure loading and placement rather than the engine itself.
_LOAD_FIELDS = {"quant_kernel", "allow_kernel_fallback", "cuda_context_bytes"}


class ServerConfig(BaseModel):
    """Everything one pool's replicas need; built by `build_app` from the YAML args."""

    model_name: str = Field(description="the pool's public model name, e.g. chatglm2-6b-int4")
    checkpoint: str = Field(description="official ChatGLM2 checkpoint directory")
    precision: str = Field(description="auto | fp32 | bf16 | fp16 | int8 | int4")
    device: str = Field(default="auto", description="auto | cpu | cuda")
    engine: EngineArgs = Field(default_factory=EngineArgs)
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for this replica's matmuls")
    demo_preset: str | None = Field(default=None, description="write this demo checkpoint first if it is missing")
    log_prompts: bool = Field(default=False, description="add prompt and reply text to the per-request log line")


class StopStringMatcher:
    """Cuts a streamed text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        if final or not self.hold:
            out, self.pending = self.pending, ""
        else:
            out, self.pending = self.pending[: -self.hold], self.pending[-self.hold :]
        return out, False


def ensure_checkpoint(config: ServerConfig) -> None:
    if config.demo_preset and not (Path(config.checkpoint) / "config.json").is_file():
        from serve_app.model.demo import write_demo_checkpoint

        # Several replicas may start at once: write aside, then rename into place atomically.
        target = Path(config.checkpoint)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        write_demo_checkpoint(tmp, config.demo_preset)
        try:
            tmp.rename(target)
        except OSError:  # another replica won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class ChatGLM2Server:
    def __init__(self, config: ServerConfig):
        import torch

        from serve_app.model.loader import load_model, resolve_device
        from serve_app.server import gpu_share

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        ensure_checkpoint(config)
        self.config = config
        self.tokenizer = ChatGLM2Tokenizer(config.checkpoint)
        args = config.engine
        engine_config = EngineConfig(**args.model_dump(exclude=_LOAD_FIELDS))
        device = resolve_device(config.device)
        share = (gpu_share.ray_gpu_share() or 1.0) if device.type == "cuda" else None
        if share is not None:
            gpu_share.limit_process(device, share, args.cuda_context_bytes)
        self.loaded = load_model(config.checkpoint, config.precision, config.device, quant_kernel=args.quant_kernel,
                                 allow_kernel_fallback=args.allow_kernel_fallback)
        self.memory_plan = None
        if share is not None:
            self.memory_plan = gpu_share.plan_replica(
                self.loaded, share=share, max_batch_size=engine_config.max_batch_size,
                max_seq_len=engine_config.max_seq_len or min(self.loaded.config.seq_length, 8192),  # Engine's default
                prefill_chunk=engine_config.prefill_chunk, kv_cache_bytes=engine_config.kv_cache_bytes,
                context_bytes=args.cuda_context_bytes,
            )
            engine_config = dataclasses.replace(engine_config, kv_cache_bytes=self.memory_plan.kv_cache_bytes)
        self.engine = Engine(self.loaded, engine_config)
        self.metrics = PoolMetrics(config.model_name, read_stats=self.engine.stats)
        self.metrics.start_refresh()  # now if Serve runs __init__ on the replica's loop, else on the first request
        stats = self.engine.stats()
        logger.info(
            "pool %s ready: %s on %s, kernels %s, %.1f MB of weights, KV cache %.1f MB (%d slots of %d tokens)%s",
            config.model_name, self.loaded.precision, self.loaded.device, self.loaded.kernels or "none (not quantized)",
            self.loaded.weight_bytes() / 1e6, stats.kv_cache_bytes / 1e6, stats.num_slots, stats.max_seq_len,
            f", GPU share {share} ({self.memory_plan.budget_bytes / 2**30:.1f} GiB, allocator fraction "
            f"{self.memory_plan.memory_fraction:.3f})" if self.memory_plan else "",
        )

    def _prompt_ids(self, request: TextRequest) -> list[int]:
        if request.raw_prompt is not None:
            return self.tokenizer.prefix_ids() + self.tokenizer.encode(request.raw_prompt)
        return self.tokenizer.build_chat_input(request.query or "", request.history, request.system)

    async def generate(self, request: TextRequest) -> AsyncIterator[TextDelta]:
        """Stream the reply as text deltas; the last delta carries finish_reason and usage, or an error.

        Every request is counted in the pool's metrics and ends with one INFO log line of ids, counts and timing.
        """
        trace = self.metrics.start_request(request.request_id)
        reply = []
        try:
            async for delta in self._generate(request, trace):
                trace.emitted(delta)
                if self.config.log_prompts:
                    reply.append(delta.text)
                yield delta
        finally:  # also when the ingress cancels the stream
            fields = trace.log_fields()
            if self.config.log_prompts:
                fields |= {"prompt": request.raw_prompt or request.query, "reply": "".join(reply)}
            logger.info("request finished %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    async def _generate(self, request: TextRequest, trace: RequestTrace) -> AsyncIterator[TextDelta]:
        try:
            prompt_ids = self._prompt_ids(request)
        except TokenizerError as exc:
            yield TextDelta(error=ErrorInfo(400, str(exc), "invalid_request_error", "invalid_request"))
            return
        except Exception:  # a bug must fail this request clearly, not the replica
            logger.exception("request %s: building the prompt failed", request.request_id)
            yield TextDelta(error=ErrorInfo(500, "internal error while building the prompt", "server_error",
                                            "internal_error"))
            return
        trace.prompt(len(prompt_ids))
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(request.stop)
        completion_tokens = 0
        try:
            async for delta in self.engine.generate(prompt_ids, request.params, request.request_id):
                completion_tokens += len(delta.token_ids)
                trace.tokens(len(delta.token_ids))
                text = "".join(detok.push(token) for token in delta.token_ids)
                if delta.finish_reason:
                    text += detok.finish()
                text, hit = stops.feed(text, final=bool(delta.finish_reason))
                finish = "stop" if hit else delta.finish_reason
                if finish:
                    cached = delta.stats.cached_prompt_tokens if delta.stats else 0
                    yield TextDelta(text, finish, Usage(len(prompt_ids), completion_tokens, cached))
                    return  # leaving the loop closes the engine stream, which frees the sequence
                if text:
                    yield TextDelta(text)
        except EngineError as exc:
            status = _ERROR_STATUS.get(exc.code, 500)
            kind = "invalid_request_error" if status == 400 else ("overloaded_error" if status == 503 else "server_error")
            yield TextDelta(error=ErrorInfo(status, str(exc), kind, exc.code))
        except Exception:  # a bug must fail this request clearly, not the replica
            logger.exception("request %s failed", request.request_id)
            yield TextDelta(error=ErrorInfo(500, "internal error while generating", "server_error", "internal_error"))

    async def engine_stats(self) -> dict:
        """Live load of this replica's engine (the ingress routes on it)."""
        import ray

        stats = dict(self.engine.stats().__dict__)
        # Which replica answered and which GPUs Ray gave it (its share is logical; see the README).
        stats["replica_id"] = serve.get_replica_context().replica_id.unique_id
        stats["gpu_ids"] = [str(gpu) for gpu in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        stats["memory_plan"] = self.memory_plan.as_dict() if self.memory_plan else None
        return stats

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError(f"pool {self.config.model_name}: engine worker is not running")
