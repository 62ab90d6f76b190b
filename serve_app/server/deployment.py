"""The model deployment: one class, one Serve deployment per precision pool.

A replica gets its pool's `PoolConfig` and an engine factory (`build_engine`, server/engine_factory.py: the real model
and `Engine`, or a test's fake), and turns text requests into streamed text deltas (server/reply_text.py). Errors
that belong to the request (context too long, overloaded, numeric failure) come back as a final `TextDelta` with
`error` set, so the ingress can answer with the right status code. Deltas that come close together are sent together
(server/coalescing.py, `stream_coalesce_ms`). The pool also tokenizes and detokenizes for clients that count tokens
(the front end has no tokenizer), on two tokenizer threads of its own, never on the event loop that streams replies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from ray import serve

from serve_app.config import PoolConfig
from serve_app.engine.errors import EngineError
from serve_app.model.adapters import AdapterError
from serve_app.model.tokenizer import TokenizerError
from serve_app.server.caller_watch import CallerWatch
from serve_app.server.coalescing import coalesce
from serve_app.server.engine_factory import ReplicaEngine, build_engine
from serve_app.server.messages import (
    ChatPrompt, ErrorInfo, RawPrompt, ReplicaStats, TextDelta, TextRequest, TokenPrompt, Tokens,
)
from serve_app.server.metrics import PoolMetrics, RequestTrace
from serve_app.server.reply_text import ReplyText

logger = logging.getLogger("ray.serve")

TOKENIZER_THREADS = 2  # per replica; tokenizing is bounded by the pool's max_ongoing/max_queued_requests besides


class LoadedAdapter:
    """What the multiplexed loader returns: Serve calls `__del__` when it unloads the adapter (least recently used),
    and the engine frees it once its requests in flight end."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        self.engine.remove_adapter(self.name)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class ChatGLM2Server:
    """One replica of a pool: `config` is that pool's alone; `build_engine(config)` makes what it runs on."""

    def __init__(self, config: PoolConfig, build_engine: Callable[[PoolConfig], ReplicaEngine] = build_engine):
        built = build_engine(config)
        self.engine, self.tokenizer, self.memory_plan = built.engine, built.tokenizer, built.memory_plan
        self.name, self.log_prompts = config.name, config.log_prompts
        self.coalesce_s = config.stream_coalesce_ms / 1000
        self.metrics = PoolMetrics(config.name, read_stats=self.engine.stats)
        self.metrics.start_refresh()  # now if Serve runs __init__ on the replica's loop, else on the first request
        self.callers = CallerWatch()
        # Tokenizing a long prompt takes milliseconds to tens of them: it runs on these threads, never on the event
        # loop that streams every other reply and answers Serve's health checks.
        self.tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix=f"{config.name}-tokenize")
        # Adapters (read and checked at start) are loaded into the engine on first use through Serve's model
        # multiplexing: at most max_loaded_adapters per replica, the least recently used unloaded, and Serve routes
        # a request whose handle names an adapter to a replica that holds it.
        self.adapters = built.adapters
        if self.adapters:
            self.use_adapter = serve.multiplexed(max_num_models_per_replica=config.max_loaded_adapters)(
                self._adapter_loader())

    def _adapter_loader(self):
        engine, adapters = self.engine, self.adapters

        async def load(name: str) -> LoadedAdapter:
            await asyncio.to_thread(engine.add_adapter, name, adapters[name])
            return LoadedAdapter(engine, name)

        return load

    def _prompt_ids(self, request: TextRequest, special_tokens: bool = True) -> list[int]:
        """The model input of `request`; `special_tokens=False` leaves the [gMASK] sop prefix off a raw prompt."""
        match request.prompt:
            case ChatPrompt(query, history, system):
                return self.tokenizer.build_chat_input(query, history, system)
            case RawPrompt(text):
                return (self.tokenizer.prefix_ids() if special_tokens else []) + self.tokenizer.encode(text)
            case TokenPrompt(ids):
                return self._checked_ids(ids)
        raise TypeError(f"not a prompt: {request.prompt!r}")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

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
            # the garbage collector gets to the inner generators. `watching`: so does a caller that died.
            with self.callers.watching(request.caller):
                async with aclosing(coalesce(self._generate(request, trace), self.coalesce_s)) as deltas:
                    async for delta in deltas:
                        trace.emitted(delta)
                        if self.log_prompts:
                            reply.append(delta.text)
                        yield delta
        finally:  # also when the ingress cancels the stream
            fields = trace.log_fields()
            if self.log_prompts:
                fields |= {"prompt": request.prompt.summary(), "reply": "".join(reply)}
            logger.info("request finished %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    async def _generate(self, request: TextRequest, trace: RequestTrace) -> AsyncIterator[TextDelta]:
        try:
            prompt_ids = await self._off_loop(self._prompt_ids, request)
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
        if request.adapter is not None:
            if error := await self._load_adapter(request.adapter):
                yield TextDelta(error=error)
                return
        try:  # held: Serve may unload it for another while this request runs
            if request.n == 1:
                async for delta in self._choice(request, request.params, prompt_ids, 0, trace):
                    yield delta
                return
            async for delta in self._choices(request, prompt_ids, trace):
                yield delta
        finally:
            if request.adapter is not None:
                self.engine.release_adapter(request.adapter)

    async def _load_adapter(self, name: str) -> ErrorInfo | None:
        if name not in self.adapters:
            return ErrorInfo("model_not_found", f"The model '{name}' does not exist on pool {self.name}")
        try:
            await self.use_adapter(name)
            self.engine.hold_adapter(name)
        except (AdapterError, EngineError) as exc:  # no slot free now (every one held by requests in flight)
            logger.warning("pool %s: adapter %s not loaded: %s", self.name, name, exc)
            return ErrorInfo("overloaded", f"adapter {name} cannot be loaded on this replica now; retry")
        return None

    async def _choices(self, request: TextRequest, prompt_ids: list[int], trace: RequestTrace):
        """n choices of one prompt, run together: the first computes the prompt's KV blocks and the others share
        them from the prefix cache (they wait for blocks being computed). With a seed, choice i uses seed + i.
        Their deltas interleave, each with its index; an error ends them all."""
        deltas: asyncio.Queue[TextDelta | None] = asyncio.Queue()

        async def run(index: int) -> None:
            seed = request.params.seed
            params = dataclasses.replace(request.params, seed=None if seed is None else seed + index)
            try:
                async for delta in self._choice(request, params, prompt_ids, index, trace):
                    deltas.put_nowait(delta)
            finally:
                deltas.put_nowait(None)

        tasks = [asyncio.create_task(run(index)) for index in range(request.n)]
        try:
            running = request.n
            while running:
                delta = await deltas.get()
                if delta is None:
                    running -= 1
                    continue
                yield delta
                if delta.error:
                    return
        finally:  # the client went away, or a choice failed: the other choices stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, request: TextRequest, params, prompt_ids: list[int], index: int,
                      trace: RequestTrace) -> AsyncIterator[TextDelta]:
        reply = ReplyText(self.tokenizer, request.stop, len(prompt_ids), index)
        request_id = request.request_id if index == 0 else f"{request.request_id}-{index}"
        try:
            adapter = {"adapter": request.adapter} if request.adapter is not None else {}
            async with aclosing(self.engine.generate(prompt_ids, params, request_id, **adapter)) as stream:
                async for delta in stream:
                    trace.tokens(len(delta.token_ids))
                    if (text := reply.push(delta)) is not None:
                        yield text
                    if reply.finished:
                        return  # leaving the loop closes the engine stream, which frees the sequence
        except EngineError as exc:
            yield TextDelta(error=ErrorInfo(exc.code, str(exc)), index=index)
        except Exception:  # a bug must fail this request clearly, not the replica
            logger.exception("request %s failed", request.request_id)
            yield TextDelta(error=ErrorInfo("internal_error", "internal error while generating"), index=index)

    async def tokenize(self, request: TextRequest, special_tokens: bool = True) -> Tokens:
        """The ids a generation of `request` would run (chat turns always carry the prefix), and their count."""
        try:
            ids = await self._off_loop(self._prompt_ids, request, special_tokens)
        except TokenizerError as exc:
            return Tokens(error=ErrorInfo("invalid_request", str(exc)))
        return Tokens(ids=ids, max_seq_len=self.engine.max_seq_len)

    async def detokenize(self, ids: list[int]) -> Tokens:
        """The text of `ids`, special ids left out (as replies are decoded)."""
        try:
            ids = self._checked_ids(ids)
        except TokenizerError as exc:
            return Tokens(error=ErrorInfo("invalid_request", str(exc)))
        return Tokens(text=await self._off_loop(self.tokenizer.decode, ids), max_seq_len=self.engine.max_seq_len)

    async def engine_stats(self) -> ReplicaStats:
        """Live load of this replica's engine (the ingress routes on it), and where the replica runs."""
        import ray

        context = ray.get_runtime_context()
        return ReplicaStats(
            engine=self.engine.stats(),
            replica_id=serve.get_replica_context().replica_id.unique_id,
            node_id=context.get_node_id(),
            # Ray's GPU ids for this replica (its share is logical; see the README).
            gpu_ids=[str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])],
            memory_plan=self.memory_plan.as_dict() if self.memory_plan else None,
        )

    def check_health(self) -> None:
        if not self.engine.healthy():
            reason = self.engine.failure or "engine worker is not running"
            raise RuntimeError(f"pool {self.name}: {reason}")
