"""The model deployment: one class, one Serve deployment per precision pool.

A replica loads the tokenizer and the model at its pool's precision, runs a continuous-batching `Engine`, and turns
text requests into streamed text deltas. Errors that belong to the request (context too long, overloaded, numeric
failure) come back as a final `TextDelta` with `error` set, so the ingress can answer with the right status code.
Deltas that come close together are sent together (server/coalescing.py, `stream_coalesce_ms`). The pool also
tokenizes and detokenizes for clients that count tokens (the front end has no tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from ray import serve

from serve_app.config import AppArgs, PoolArgs
from serve_app.engine.engine import Engine
from serve_app.engine.errors import EngineError
from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer, TokenizerError
from serve_app.server.coalescing import coalesce
from serve_app.server.messages import ErrorInfo, TextDelta, TextRequest, Tokens, Usage
from serve_app.server.metrics import PoolMetrics, RequestTrace

logger = logging.getLogger("ray.serve")

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
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class ChatGLM2Server:
    """One replica of the pool `pool_name`: its settings are that pool's entry of the app's `AppArgs`."""

    def __init__(self, args: AppArgs, pool_name: str):
        import torch

        from serve_app.model.loader import load_model, resolve_device
        from serve_app.server import gpu_share

        pool: PoolArgs = args.pool(pool_name)
        checkpoint, engine_config, quant = args.checkpoint_of(pool), args.engine_of(pool), args.quant_of(pool)
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        ensure_checkpoint(checkpoint, args.demo_preset_of(pool))
        self.name, self.log_prompts = pool.model, args.log_prompts
        self.coalesce_s = args.stream_coalesce_ms / 1000
        self.tokenizer = ChatGLM2Tokenizer(checkpoint)
        device = resolve_device(args.device)
        share = (gpu_share.ray_gpu_share() or 1.0) if device.type == "cuda" else None
        if share is not None:
            gpu_share.limit_process(device, share, args.cuda_context_bytes)
        self.loaded = load_model(checkpoint, pool.precision, args.device, quant_kernel=quant.kernel,
                                 allow_kernel_fallback=quant.allow_fallback)
        self.memory_plan = None
        if share is not None:
            self.memory_plan = gpu_share.plan_replica(
                self.loaded, share=share, max_batch_size=engine_config.max_batch_size,
                max_seq_len=engine_config.context_len(self.loaded.config.seq_length),
                prefill_chunk=engine_config.prefill_chunk, kv_cache_bytes=engine_config.kv_cache_bytes,
                context_bytes=args.cuda_context_bytes, attention=engine_config.attention,
                cuda_graphs=engine_config.cuda_graphs,
            )
            engine_config = dataclasses.replace(engine_config, kv_cache_bytes=self.memory_plan.kv_cache_bytes)
        self.engine = Engine(self.loaded, engine_config)
        self.metrics = PoolMetrics(pool.model, read_stats=self.engine.stats)
        self.metrics.start_refresh()  # now if Serve runs __init__ on the replica's loop, else on the first request
        stats = self.engine.stats()
        logger.info(
            "pool %s ready: %s on %s, kernels %s, dense linears %s, %.1f MB of weights, KV cache %.1f MB (%d slots of "
            "%d tokens)%s",
            pool.model, self.loaded.precision, self.loaded.device, self.loaded.kernels or "none (not quantized)",
            self.loaded.dense_kernels or "aten",
            self.loaded.weight_bytes() / 1e6, stats.kv_cache_bytes / 1e6, stats.num_slots, stats.max_seq_len,
            f", GPU share {share} ({self.memory_plan.budget_bytes / 2**30:.1f} GiB, allocator fraction "
            f"{self.memory_plan.memory_fraction:.3f})" if self.memory_plan else "",
        )
        check = stats.device_check
        logger.info(
            "pool %s decode path: %s; warm-up %.1f s (%d graphs, buckets %s); device check %s",
            pool.model, stats.decode_path, self.engine.warmup["seconds"], self.engine.warmup["graphs"],
            self.engine.warmup["buckets"] or "none",
            "not run" if check is None else
            f"{'passed' if check['passed'] else 'FAILED'} in {check['seconds']:.2f} s (max |logit error| "
            f"{check['max_abs_error']:.3g}, bound {check['bound']:.3g})",
        )

    def _prompt_ids(self, request: TextRequest, special_tokens: bool = True) -> list[int]:
        """The model input of `request`; `special_tokens=False` leaves the [gMASK] sop prefix off a raw prompt."""
        if request.prompt_ids is not None:
            return self._checked_ids(request.prompt_ids)
        if request.raw_prompt is not None:
            prefix = self.tokenizer.prefix_ids() if special_tokens else []
            return prefix + self.tokenizer.encode(request.raw_prompt)
        return self.tokenizer.build_chat_input(request.query or "", request.history, request.system)

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is not in this model's vocabulary [0, {vocab})")
        return list(ids)

    def _context_error(self, request: TextRequest, prompt_len: int) -> ErrorInfo | None:
        """OpenAI's check (with `context_strict`): prompt plus max_tokens must fit the context, else an error."""
        wanted, context = request.params.max_new_tokens, self.engine.max_seq_len
        if not request.context_strict or wanted is None or prompt_len + wanted <= context:
            return None
        return ErrorInfo("context_length_exceeded", (
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_len + wanted} "
            f"tokens ({prompt_len} in the prompt, {wanted} in the completion). Please reduce the length of the "
            "prompt or completion."))

    async def generate(self, request: TextRequest) -> AsyncIterator[TextDelta]:
        """Stream the reply as text deltas; the last delta carries finish_reason and usage, or an error.

        Every request is counted in the pool's metrics and ends with one INFO log line of ids, counts and timing.
        """
        trace = self.metrics.start_request(request.request_id)
        reply = []
        try:
            # aclosing: when Serve cancels this generator (the client went away), the engine stops at once, not when
            # the garbage collector gets to the inner generators.
            async with aclosing(coalesce(self._generate(request, trace), self.coalesce_s)) as deltas:
                async for delta in deltas:
                    trace.emitted(delta)
                    if self.log_prompts:
                        reply.append(delta.text)
                    yield delta
        finally:  # also when the ingress cancels the stream
            fields = trace.log_fields()
            if self.log_prompts:
                fields |= {"prompt": request.raw_prompt or request.query, "reply": "".join(reply)}
            logger.info("request finished %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    async def _generate(self, request: TextRequest, trace: RequestTrace) -> AsyncIterator[TextDelta]:
        try:
            prompt_ids = self._prompt_ids(request)
        except TokenizerError as exc:
            yield TextDelta(error=ErrorInfo("invalid_request", str(exc)))
            return
        except Exception:  # a bug must fail this request clearly, not the replica
            logger.exception("request %s: building the prompt failed", request.request_id)
            yield TextDelta(error=ErrorInfo("internal_error", "internal error while building the prompt"))
            return
        trace.prompt(len(prompt_ids))
        if error := self._context_error(request, len(prompt_ids)):
            yield TextDelta(error=error)
            return
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
            yield TextDelta(error=ErrorInfo(exc.code, str(exc)))
        except Exception:  # a bug must fail this request clearly, not the replica
            logger.exception("request %s failed", request.request_id)
            yield TextDelta(error=ErrorInfo("internal_error", "internal error while generating"))

    async def tokenize(self, request: TextRequest, special_tokens: bool = True) -> Tokens:
        """The ids a generation of `request` would run (chat turns always carry the prefix), and their count."""
        try:
            ids = self._prompt_ids(request, special_tokens)
        except TokenizerError as exc:
            return Tokens(error=ErrorInfo("invalid_request", str(exc)))
        return Tokens(ids=ids, max_model_len=self.engine.max_seq_len)

    async def detokenize(self, ids: list[int]) -> Tokens:
        """The text of `ids`, special ids left out (as replies are decoded)."""
        try:
            ids = self._checked_ids(ids)
        except TokenizerError as exc:
            return Tokens(error=ErrorInfo("invalid_request", str(exc)))
        return Tokens(text=self.tokenizer.decode(ids), max_model_len=self.engine.max_seq_len)

    async def engine_stats(self) -> dict:
        """Live load of this replica's engine (the ingress routes on it)."""
        import ray

        stats = dict(self.engine.stats().__dict__)
        # Which replica answered, on which node, and which GPUs Ray gave it (its share is logical; see the README).
        stats["replica_id"] = serve.get_replica_context().replica_id.unique_id
        stats["node_id"] = ray.get_runtime_context().get_node_id()
        stats["gpu_ids"] = [str(gpu) for gpu in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        stats["memory_plan"] = self.memory_plan.as_dict() if self.memory_plan else None
        return stats

    def check_health(self) -> None:
        if not self.engine.healthy():
            reason = self.engine.failure or "engine worker is not running"
            raise RuntimeError(f"pool {self.name}: {reason}")
