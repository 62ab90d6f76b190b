"""Continuous (iteration-level) batching in one process: token ids in, token ids out.

Requests join the running batch as soon as a KV slot is free and leave it the step they finish or are cancelled.
The state machine is small on purpose (after nano-vllm):

    Sequence   status WAITING -> PREFILLING -> DECODING -> FINISHED
    Scheduler  a waiting queue, the running list, and the free KV slots with the prefixes they still hold
    Engine     a loop on the process's compute thread repeating a step: schedule -> run -> postprocess

The loop runs on the compute thread itself (serve_app.model.compute.serve), so a step, its scheduling and its
postprocessing are plain calls on the thread that runs every torch op, with no hand-over per step (torch releases
the GIL, so the asyncio loop stays responsive). The thread sleeps on a condition variable when no engine has work and
no other compute job is queued. The asyncio side only appends to the waiting queue (and wakes the loop), flags aborts
and reads the request's own asyncio.Queue, which the compute thread fills through the event loop's
`call_soon_threadsafe` (one hand-over per delivered token, none per step).

Streaming convention of `Engine.generate`: one `TokenDelta` per generated token; the last delta carries
`finish_reason` ("stop" | "length" | "abort"), the last token if there is one, and the request's `RequestStats`.
A request that fails raises `GenerationError` from the iterator instead; the other requests carry on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from serve_app.engine.engine_config import EngineConfig
from serve_app.engine.errors import (
    EngineError,
    EngineOverloaded,
    GenerationError,
    InvalidRequest,
    ReplicaFailed,
)
from serve_app.engine.outputs import EngineStats, RequestStats, TokenDelta
from serve_app.engine.params import SamplingParams, stop_ids, token_budget
from serve_app.engine.runner import ModelRunner, Work
from serve_app.engine.sampling import NON_FINITE_MESSAGE, request_seed
from serve_app.model import compute
from serve_app.model.attention import CompileLimitHit
from serve_app.model.loader import LoadedModel

logger = logging.getLogger(__name__)

FALLBACK_SUFFIX = " (fallback after a failed device check)"  # ends EngineStats.decode_path on the fallback
# A cached prefix is worth a slot when it covers this many prompt tokens (or the whole prompt but its last token).
MIN_PREFIX_TOKENS = 16
# Steps in a row in which every request failed, even run alone: the device or the process is unfit to serve.
MAX_FAILED_STEPS = 3
REPLICA_FAILED_MESSAGE = "this replica failed and is being replaced; retry"


class EngineUnfit(Exception):
    """The engine can no longer run steps (a device error, or MAX_FAILED_STEPS failing steps in a row)."""


def is_device_error(exc: BaseException) -> bool:
    """A fault of the device rather than of one request: after it (a CUDA error is sticky) no step can succeed."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "CUBLAS_STATUS" in text


def generation_failed(request_id: str) -> GenerationError:
    """What the client of a request that failed in the model is told; the exception itself goes to the log."""
    return GenerationError(f"the model failed while generating this request (request id {request_id}); the "
                           "service's log has the details")


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: int  # generated tokens allowed (generate.token_budget)
    stops: frozenset[int]
    emit: Callable[[TokenDelta | EngineError], None]  # thread-safe delivery to the request's consumer
    seed: int  # 64-bit noise seed (sampling.request_seed): with the position, it fixes every sampled token
    status: Status = Status.WAITING
    slot: int = -1
    num_computed: int = 0  # leading tokens of prompt + output whose KV is in the slot
    output_ids: list[int] = field(default_factory=list)
    cached_prompt_tokens: int = 0
    abort_requested: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def stats(self) -> RequestStats:
        now = time.perf_counter()
        decoded = len(self.output_ids) - 1
        decode_s = now - self.first_token_at if self.first_token_at is not None else 0.0
        return RequestStats(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
            ttft_s=self.first_token_at - self.arrival if self.first_token_at is not None else None,
            decode_tokens_per_s=decoded / decode_s if decoded > 0 and decode_s > 0 else 0.0,
            total_s=now - self.arrival,
        )


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class FreeSlots:
    """Free KV slots, least recently freed first, each with the token ids whose KV it still holds."""

    def __init__(self, num_slots: int):
        self.cached: OrderedDict[int, list[int]] = OrderedDict((slot, []) for slot in range(num_slots))

    def __len__(self) -> int:
        return len(self.cached)

    def take(self, prompt_ids: list[int], use_prefix: bool) -> tuple[int, int]:
        """(slot, prompt tokens whose KV the slot already holds). At least the last prompt token is left to run."""
        if use_prefix:
            usable = {
                slot: min(common_prefix_len(ids, prompt_ids), len(prompt_ids) - 1) for slot, ids in self.cached.items()
            }
            slot = max(usable, key=usable.get)  # the first (least recent) of equals
            if usable[slot] >= min(MIN_PREFIX_TOKENS, len(prompt_ids) - 1) and usable[slot] > 0:
                del self.cached[slot]
                return slot, usable[slot]
        # No useful prefix: an empty slot if there is one, else evict the least recently cached prefix.
        slot = min(self.cached, key=lambda s: bool(self.cached[s]))
        del self.cached[slot]
        return slot, 0

    def put(self, slot: int, cached_ids: list[int]) -> None:
        self.cached[slot] = cached_ids  # most recent last


@dataclass
class Batch:
    """One step's work, run as one packed forward: prefill chunks and decode tokens together."""

    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)
    decodes: list[Sequence]  # one token each


class Scheduler:
    """Waiting and running sequences and who owns which slot. Not thread-safe: the engine holds its lock."""

    def __init__(self, num_slots: int, prefill_chunk: int, prefix_caching: bool):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free = FreeSlots(num_slots)
        self.prefill_chunk = prefill_chunk
        self.prefix_caching = prefix_caching

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Admit waiting sequences into free slots, then pick this step's prefill chunks and decode rows."""
        while self.waiting and len(self.free):
            seq = self.waiting.popleft()
            seq.slot, seq.num_computed = self.free.take(seq.prompt_ids, self.prefix_caching)
            seq.cached_prompt_tokens = seq.num_computed
            seq.status = Status.PREFILLING
            self.running.append(seq)
        prefills, left = [], self.prefill_chunk
        for seq in self.running:  # oldest first
            if seq.status is Status.PREFILLING and left > 0:
                chunk = min(len(seq.prompt_ids) - seq.num_computed, left)
                prefills.append((seq, chunk))
                left -= chunk
        return Batch(prefills, [seq for seq in self.running if seq.status is Status.DECODING])

    def finish(self, seq: Sequence, keep_kv: bool) -> None:
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is not Status.FINISHED:
            self.running.remove(seq)
            # The slot holds KV for the first num_computed tokens (the last sampled token was never run).
            cached = seq.token_ids[: seq.num_computed] if keep_kv and self.prefix_caching else []
            self.free.put(seq.slot, cached)
        seq.status = Status.FINISHED


class Engine:
    """Serves concurrent `generate` calls from one model with continuous batching (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.config = config
        model_config = loaded.config
        self.max_seq_len = config.max_seq_len_for(model_config.seq_length)
        if self.max_seq_len > model_config.seq_length:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's seq_length={model_config.seq_length}")
        slot_bytes = model_config.kv_bytes_per_token(loaded.dtype) * self.max_seq_len
        num_slots = config.max_batch_size
        graphs = config.cuda_graphs if config.cuda_graphs is not None else loaded.device.type == "cuda"
        if config.kv_cache_bytes is not None:
            # With decode graphs, one more slot takes the padding rows' writes.
            num_slots = min(num_slots, config.kv_cache_bytes // slot_bytes - int(graphs))
            if num_slots < 1:
                raise ValueError(
                    f"kv_cache_bytes={config.kv_cache_bytes} cannot hold one sequence of max_seq_len="
                    f"{self.max_seq_len} tokens ({slot_bytes} bytes); raise kv_cache_bytes or lower max_seq_len"
                )
        # All KV memory is taken here, once: [layers, kv_heads, slots, max_seq_len, head_dim] for keys and values.
        self.runner = ModelRunner(loaded, num_slots, self.max_seq_len, attention=config.attention, graphs=graphs,
                                  compile_decode=bool(config.compile_decode))
        self.warmup = self.runner.warmup()  # every flex kernel and decode graph, before the first request
        self.fallback: str | None = None  # why the serving path is a fallback, when it is
        self.device_checks: list[dict] = []
        check = config.device_check if config.device_check is not None else loaded.device.type == "cuda"
        if check:
            self._check_device(num_slots)
        self.cache = self.runner.cache
        self.scheduler = Scheduler(num_slots, config.prefill_chunk, config.prefix_caching)
        self._requests: dict[str, Sequence] = {}
        self._lock = threading.Lock()  # guards the scheduler, _requests and the counters
        self._stopping = False
        self._failed: str | None = None  # why the loop stopped for good (a ReplicaFailed fault)
        self._failed_steps = 0  # steps in a row in which every request failed
        self._total_requests = 0
        self._finished: Counter[str] = Counter()
        self._steps = 0
        self._loop = compute.serve(self._turn, name="engine")  # steps run on the compute thread from now on

    def _check_device(self, num_slots: int) -> None:
        """The start-up device check (serve_app/engine/device_check.py): refuse to start on a mismatch, or with
        `fallback: eager` serve on the eager path, loudly."""
        from serve_app.engine.device_check import DeviceCheckFailed, run_device_check
        from serve_app.model.quant import use_reference_kernels

        result = run_device_check(self.runner)
        self.device_checks.append(result.as_dict())
        logger.info("device check %s in %.1f s: %s (max logit error %.3g, bound %.3g)", "passed" if result.passed
                    else "FAILED", result.seconds, result.path, result.max_abs_error, result.bound)
        if result.passed:
            return
        failed = f"the serving path ({result.path}) disagrees with the reference ({result.reference}): {result.detail}"
        if self.config.fallback is None:
            raise DeviceCheckFailed(f"device check failed: {failed}; set the pool's engine fallback: eager to serve on "
                                    "the eager path instead")
        del self.runner  # its cache and graphs, before the fallback's cache is allocated
        self.runner = ModelRunner(self.loaded, num_slots, self.max_seq_len, attention="slot-view", graphs=False)
        again = run_device_check(self.runner)
        self.device_checks.append(again.as_dict())
        if not again.passed and self.loaded.kernels:
            layers = use_reference_kernels(self.loaded.model)
            self.loaded.kernels = {"dequant": layers}
            again = run_device_check(self.runner)
            self.device_checks.append(again.as_dict())
        if not again.passed:
            raise DeviceCheckFailed(f"device check failed: {failed}; the eager fallback ({again.path}) fails too: "
                                    f"{again.detail}")
        self.fallback = failed
        logger.warning("device check: %s; serving on the fallback path %s (slower)", failed, self.runner.path)

    @property
    def decode_path(self) -> str:
        return self.runner.path + (FALLBACK_SUFFIX if self.fallback else "")

    # ---- the asyncio side -------------------------------------------------------------------------------------

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Stream the generated tokens of one request (see the module docstring for the delta convention).

        Raises at once: InvalidRequest (empty prompt) and ContextLengthExceeded (no room to generate within
        max_seq_len or params.max_length). Raises at the first iteration: EngineOverloaded (waiting queue full),
        InvalidRequest (request_id already running) and ReplicaFailed (the engine stopped for good). Raises later:
        GenerationError, or ReplicaFailed for every request when the engine stops. Closing the iterator (a `break`,
        a cancelled task) aborts the request and frees its slot within one step.
        """
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.loaded.config.padded_vocab_size
        if bad := sorted(token for token in params.token_ids() if token >= vocab):
            raise InvalidRequest(f"token id {bad[0]} (logit_bias or stop_token_ids) is not in this model's "
                                 f"vocabulary [0, {vocab})")
        budget = token_budget(len(prompt_ids), params, self.max_seq_len)  # raises ContextLengthExceeded
        return self._stream(prompt_ids, params, budget, request_id or uuid.uuid4().hex)

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, budget: int, request_id: str
    ) -> AsyncIterator[TokenDelta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta | EngineError] = asyncio.Queue()

        def emit(item: TokenDelta | EngineError) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            budget=budget,
            stops=stop_ids(params, self.loaded.config.eos_token_id),
            emit=emit,
            seed=request_seed(params),  # per request: its seed fixes its tokens whatever the batch
        )
        self._submit(seq)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            with self._lock:
                self._abort(seq)

    def _submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._failed is not None:
                raise ReplicaFailed(REPLICA_FAILED_MESSAGE)
            if self._stopping:
                raise EngineError("the engine has been shut down")
            if seq.request_id in self._requests:
                raise InvalidRequest(f"request id {seq.request_id!r} is already in progress")
            if len(self.scheduler.waiting) - len(self.scheduler.free) >= self.config.max_waiting:
                raise EngineOverloaded(
                    f"{len(self.scheduler.waiting)} requests are waiting for one of {self.runner.max_rows} slots; "
                    "retry later"
                )
            self._requests[seq.request_id] = seq
            self.scheduler.waiting.append(seq)
            self._total_requests += 1
            self._loop.wake()

    def abort(self, request_id: str) -> None:
        """Stop a request: it gets a final delta with finish_reason "abort" and leaves the batch within one step."""
        with self._lock:
            seq = self._requests.get(request_id)
            if seq is not None:
                self._abort(seq)

    def _abort(self, seq: Sequence) -> None:
        if seq.status is Status.WAITING:
            self._finish(seq, "abort")
        elif seq.status is not Status.FINISHED:
            seq.abort_requested = True  # the loop finishes it at its next schedule

    def stats(self) -> EngineStats:
        memory = self.loaded.memory_bytes() | {"kv_cache": self.cache.nbytes}  # outside the lock: reads /proc
        with self._lock:
            running = self.scheduler.running
            return EngineStats(
                running=len(running),
                waiting=len(self.scheduler.waiting),
                free_slots=len(self.scheduler.free),
                num_slots=self.runner.max_rows,
                max_seq_len=self.max_seq_len,
                kv_tokens_in_use=sum(seq.num_computed for seq in running),
                kv_capacity_tokens=self.runner.max_rows * self.max_seq_len,
                kv_cache_bytes=self.cache.nbytes,
                cached_prefix_slots=sum(1 for ids in self.scheduler.free.cached.values() if ids),
                total_requests=self._total_requests,
                finished=dict(self._finished),
                steps=self._steps,
                decode_path=self.decode_path,
                device_check=self.device_checks[-1] if self.device_checks else None,
                kernels=dict(self.loaded.kernels),
                dense_kernels=dict(self.loaded.dense_kernels),
                memory_bytes=memory,
            )

    def healthy(self) -> bool:
        return self._loop.alive and not self._stopping and self._failed is None

    @property
    def failure(self) -> str | None:
        """Why the engine stopped for good (it then reports unhealthy), or None."""
        return self._failed

    async def shutdown(self) -> None:
        """Stop the loop after its current step; requests still in flight end with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
        self._loop.stop()
        await asyncio.wrap_future(self._loop.stopped)
        with self._lock:
            for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                self._finish(seq, "abort")

    # ---- the compute thread ------------------------------------------------------------------------------------

    def _turn(self) -> bool:
        """Called by the compute thread when there may be work: one step if there is any. Returns whether there may
        be more at once (False: the thread calls again after the next `wake`, i.e. the next submission)."""
        with self._lock:
            if self._stopping or not self.scheduler.has_work():
                return False
        try:
            self.step()
        except (CompileLimitHit, EngineUnfit) as exc:  # the process is unfit to serve
            self._stop_for_good(exc)
            return False
        except Exception as exc:
            if is_device_error(exc):
                self._stop_for_good(exc)
                return False
            logger.exception("engine step failed outside the model: failing the running requests")
            with self._lock:
                for seq in list(self.scheduler.running):
                    self._fail(seq, generation_failed(seq.request_id))
        return True

    def _stop_for_good(self, exc: BaseException) -> None:
        """Fail everything, refuse new requests and report unhealthy, so that Serve replaces this replica."""
        logger.error("engine stopped: this replica must be replaced", exc_info=exc)
        with self._lock:
            self._failed = f"{type(exc).__name__}: {exc}"  # for check_health and the log, not for clients
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._fail(seq, ReplicaFailed(REPLICA_FAILED_MESSAGE))
        self._loop.stop()

    def step(self) -> None:
        """One iteration of continuous batching."""
        batch = self._schedule()
        try:
            results = self._run(batch)
        except CompileLimitHit:
            raise
        except Exception as exc:
            if is_device_error(exc):
                raise
            results = self._run_apart(batch, exc)
        if batch.prefills or batch.decodes:
            self._failed_steps = 0 if results else self._failed_steps + 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise EngineUnfit(f"{self._failed_steps} steps in a row failed for every request")
        self._postprocess(results)

    def _run_apart(self, batch: Batch, exc: Exception) -> list[tuple[Sequence, int, int | None]]:
        """After a failed step: each sequence's work run alone, so that a request that makes the model fail fails
        alone. Safe to repeat: a step writes KV at explicit positions and `num_computed` moves only after it, and a
        token's noise is a function of (seed, position). Returns the results of the runs that succeeded."""
        alone = [(seq, Batch([(seq, chunk)], [])) for seq, chunk in batch.prefills] + [
            (seq, Batch([], [seq])) for seq in batch.decodes]
        logger.error("engine step failed (%d sequences): running each alone", len(alone), exc_info=exc)
        results: list[tuple[Sequence, int, int | None]] = []
        failed = [alone.pop()[0]] if len(alone) == 1 else []  # a sequence that failed alone fails
        for seq, part in alone:
            try:
                results += self._run(part)
            except CompileLimitHit:
                raise
            except Exception as part_exc:
                if is_device_error(part_exc):
                    raise
                logger.error("request %s fails the model", seq.request_id, exc_info=part_exc)
                failed.append(seq)
        with self._lock:
            for seq in failed:
                self._fail(seq, generation_failed(seq.request_id))
        return results

    def _schedule(self) -> Batch:
        with self._lock:
            self._steps += 1
            for seq in [s for s in self.scheduler.running if s.abort_requested]:
                self._finish(seq, "abort")
            return self.scheduler.schedule()

    def _run(self, batch: Batch) -> list[tuple[Sequence, int, int | None]]:
        """One packed forward and on-device sampling: (sequence, tokens computed, chosen id, -1 for NaN/Inf logits,
        or None when no token is due)."""
        work, computed = [], []
        for seq, chunk in batch.prefills:
            start = seq.num_computed
            done = start + chunk == len(seq.prompt_ids)
            work.append(Work(seq.prompt_ids[start : start + chunk], seq.slot, start, seq.params if done else None,
                             seq.seed))
            computed.append((seq, chunk))
        for seq in batch.decodes:
            work.append(Work([seq.output_ids[-1]], seq.slot, seq.num_computed, seq.params, seq.seed,
                             len(seq.output_ids)))
            computed.append((seq, 1))
        ids = self.runner.step(work)
        return [(seq, n, token) for (seq, n), token in zip(computed, ids)]

    def _postprocess(self, results: list[tuple[Sequence, int, int | None]]) -> None:
        """Record each chosen token; deliver; finish sequences."""
        now = time.perf_counter()
        outcomes: list[tuple[Sequence, int | None, str | None, EngineError | None]] = []
        for seq, computed, token in results:
            seq.num_computed += computed
            if seq.num_computed == len(seq.prompt_ids):
                seq.status = Status.DECODING
            if token is None or seq.abort_requested:
                outcomes.append((seq, None, "abort" if seq.abort_requested else None, None))
                continue
            if token < 0:
                outcomes.append((seq, None, "error", GenerationError(NON_FINITE_MESSAGE)))
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.output_ids.append(token)
            reason = "stop" if token in seq.stops else ("length" if len(seq.output_ids) >= seq.budget else None)
            outcomes.append((seq, token, reason, None))
        with self._lock:
            for seq, token, reason, error in outcomes:
                if seq.status is Status.FINISHED:
                    continue
                if error is not None:
                    self._fail(seq, error)
                elif reason is not None:
                    self._finish(seq, reason, [] if token is None else [token])
                elif token is not None:
                    seq.emit(TokenDelta([token]))

    def _finish(self, seq: Sequence, reason: str, token_ids: list[int] | None = None) -> None:
        """Lock held. Frees the slot, keeping its KV as a cached prefix, and sends the final delta."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, keep_kv=True)
        self._requests.pop(seq.request_id, None)
        self._finished[reason] += 1
        seq.emit(TokenDelta(token_ids or [], reason, seq.stats()))

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        """Lock held. Frees the slot without keeping its KV (it may hold NaN or half-written rows)."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, keep_kv=False)
        self._requests.pop(seq.request_id, None)
        self._finished["error"] += 1
        seq.emit(error)
