"""Continuous (iteration-level) batching in one process over a paged KV cache: token ids in, token ids out.

Requests join the running batch as soon as there is a row for them and blocks for their prompt, and leave it the
step they finish or are cancelled. The state machine is small on purpose (after nano-vllm):

    Sequence   status WAITING -> PREFILLING -> DECODING -> FINISHED (and back to WAITING when preempted)
    Scheduler  a waiting queue, the running list, and the cache's blocks (serve_app.engine.blocks.BlockPool)
    Engine     a loop on the process's compute thread repeating a step: schedule -> run -> postprocess

KV lives in fixed-size blocks: a sequence holds the blocks of its block table, takes one more when its next token
starts a new block, and gives them back when it finishes. A full block is kept, keyed by its whole prefix, after
its sequence is gone (automatic prefix caching): a later prompt that starts with the same tokens (a system prompt,
a template, the previous turns of a chat) shares those blocks instead of computing them, and
`RequestStats.cached_prompt_tokens` says how many. When a decoding sequence needs a block and none is left, the
newest running sequence is preempted: its blocks go back (their full ones stay cached), it goes to the head of the
queue with what it generated so far, and when there is room again its context is recomputed (mostly found in the
cache) and it carries on where it stopped: its client only sees a pause.

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
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.engine.blocks import BlockPool, block_keys
from serve_app.engine.structured import Grammars
from serve_app.engine.engine_config import EngineConfig
from serve_app.engine.errors import (
    EngineError,
    EngineOverloaded,
    GenerationError,
    InvalidRequest,
    ReplicaFailed,
)
from serve_app.engine.outputs import EngineStats, RequestStats, TokenDelta, TokenLogprob
from serve_app.engine.params import SamplingParams, stop_ids, token_budget
from serve_app.engine.runner import ModelRunner, Work
from serve_app.engine.sampling import NON_FINITE_MESSAGE, request_seed
from serve_app.model import compute
from serve_app.model.attention import FLEX_BLOCK, CompileLimitHit
from serve_app.model.loader import LoadedModel

logger = logging.getLogger(__name__)

FALLBACK_SUFFIX = " (fallback after a failed device check)"  # ends EngineStats.decode_path on the fallback
# KV block size where the config leaves it unset: on CPU measured with scripts/block_size_bench.py
# (docs/benchmarks.md, "KV block size"); with the flex backend one flex key block (its kernels' block).
CPU_BLOCK_SIZE = 64
# Blocks kept free when admitting a sequence, as a fraction of the cache: room for the running ones to grow.
ADMIT_WATERMARK = 0.01
# Steps in a row in which every request failed, even run alone: the device or the process is unfit to serve.
MAX_FAILED_STEPS = 3
REPLICA_FAILED_MESSAGE = "this replica failed and is being replaced; retry"


# Stands for each position of a P-tuning prefix in block keys (every real token id is below it); the adapter's salt
# tells prefixes apart.
PREFIX_ID = 0xFFFFFFFF


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter loaded into this engine (model/adapters.py): a P-tuning prefix's KV in blocks of the cache, or a
    LoRA adapter in a slot of the model's LoRA layers."""

    name: str
    adapter: Any  # PrefixAdapter | LoRAAdapter
    salt: bytes  # part of every block key of its sequences: their KV differs from the base model's
    offset: int = 0  # P-tuning: the prefix's length (positions before each sequence's first token)
    lora: int = 0  # LoRA: its slot (1..max_adapters)
    blocks: list[int] = field(default_factory=list)  # P-tuning: the blocks holding the prefix (held while loaded)
    shared: list[int] = field(default_factory=list)  # those of them that are full: every sequence's first blocks
    users: int = 0  # sequences waiting or running with it
    ready: bool = False  # its KV or weights are in place
    closing: bool = False  # unloaded while in use: freed when its last sequence ends



# One step's outcome for a sequence: (sequence, tokens computed, chosen id (-1: NaN/Inf logits, None: none due),
# its TokenLogprob when the request asked for logprobs)
Result = tuple["Sequence", int, "int | None", "TokenLogprob | None"]


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
    blocks: list[int] = field(default_factory=list)  # the block table: position p is in blocks[p // block_size]
    num_computed: int = 0  # leading tokens of prompt + output whose KV is in the blocks
    output_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # prefix keys of the full blocks of token_ids known so far
    registered: int = 0  # leading blocks offered to the prefix cache
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    penalty_row: int | None = None  # its row of the runner's token history while it runs, when it has penalties
    history_loaded: bool = False
    matcher: Any = None  # llguidance LLMatcher of its json_schema: which tokens may come next
    adapter: LoadedAdapter | None = None
    abort_requested: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def offset(self) -> int:
        """KV positions before its first token: its P-tuning prefix's (0 without one)."""
        return self.adapter.offset if self.adapter is not None else 0

    @property
    def salt(self) -> bytes:
        return self.adapter.salt if self.adapter is not None else b""

    @property
    def kv_ids(self) -> list[int]:
        """What each KV position holds: PREFIX_ID for the prefix's positions, then its tokens."""
        return [PREFIX_ID] * self.offset + self.token_ids if self.offset else self.token_ids

    @property
    def prefill_target(self) -> int:
        """KV positions to compute before decoding: the prefix and the prompt, or after a preemption all but the last
        generated token (which the next decode step feeds)."""
        return self.offset + len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

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


@dataclass
class Batch:
    """One step's work, run as one packed forward: prefill chunks and decode tokens together."""

    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)
    decodes: list[Sequence]  # one token each
    # (source block, destination block, tokens): KV copied before the step, a prompt's last partial block taken from
    # a running sequence with the same prompt (Scheduler._tail_donor)
    copies: list[tuple[int, int, int]] = field(default_factory=list)


class Scheduler:
    """Waiting and running sequences and the blocks they hold. Not thread-safe: the engine holds its lock."""

    def __init__(self, pool: BlockPool, max_running: int, prefill_chunk: int):
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pool = pool
        self.block_size = pool.block_size
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.watermark = int(pool.num_blocks * ADMIT_WATERMARK)
        self.preemptions = 0
        self.free_penalty_rows = list(range(max_running))[::-1]  # a running sequence with penalties holds one

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def free_rows(self) -> int:
        return self.max_running - len(self.running)

    def schedule(self) -> Batch:
        """Give decoding sequences the blocks their next token needs (preempting the newest when there are none),
        admit waiting sequences while rows and blocks last, then pick this step's prefill chunks and decode rows."""
        preempted = self._grow()
        copies: list[tuple[int, int, int]] = []
        while not preempted and self.waiting and self.free_rows > 0 and self._admit(self.waiting[0], copies):
            self.running.append(self.waiting.popleft())
        prefills, left = [], self.prefill_chunk
        for seq in self.running:  # oldest first
            if seq.status is Status.PREFILLING and left > 0:
                chunk = min(seq.prefill_target - seq.num_computed, left)
                prefills.append((seq, chunk))
                left -= chunk
        return Batch(prefills, [seq for seq in self.running if seq.status is Status.DECODING], copies)

    def _grow(self) -> bool:
        """A new block for each decoding sequence whose next position starts one; returns whether any sequence was
        preempted for it."""
        preempted, index = False, 0
        while index < len(self.running):
            seq = self.running[index]
            if seq.status is Status.DECODING and seq.num_computed >= len(seq.blocks) * self.block_size:
                while not self.pool.available and seq.status is not Status.WAITING:
                    self.preempt(self.running[-1])
                    preempted = True
                if seq.status is Status.WAITING:  # it was the newest itself
                    break
                seq.blocks.append(self.pool.allocate(after=seq.blocks[-1] if seq.blocks else None, owner=seq))
            index += 1
        return preempted

    def _admit(self, seq: Sequence, copies: list[tuple[int, int, int]]) -> bool:
        """Blocks for seq's prefill, its cached prefix shared; False (nothing taken) when they do not fit. Where a
        running sequence has computed the same prompt (n choices of one request), the KV of its last, partial block
        up to the last token is appended to `copies` and seq computes the last token alone."""
        size, target = self.block_size, seq.prefill_target
        tokens = seq.kv_ids[:target]
        if len(seq.keys) < target // size:
            seq.keys += block_keys(tokens, size, seq.salt, seq.keys[-1] if seq.keys else None, len(seq.keys))
        # At least the last token is computed, in a block of the sequence's own: a shared block is never written.
        reusable = (target - 1) // size
        # A P-tuning prefix's full blocks are always shared (its adapter holds them); the rest is looked up.
        prefix = list(seq.adapter.shared) if seq.adapter is not None else []
        self.pool.share(prefix)
        matched = prefix + self.pool.match(seq.keys[len(prefix):reusable])
        needed = -(-target // size) - len(matched)
        # The next block of its prefix is being computed by a running sequence: wait for it rather than compute it
        # again (it is published within a few steps).
        pending = len(matched) < reusable and self.pool.is_pending(seq.keys[len(matched)])
        if pending or self.pool.available < needed + (self.watermark if self.running else 0):
            self.pool.release(matched)
            self.pool.hits -= len(matched) - len(prefix)
            return False
        if matched:
            seq.blocks = list(matched)
            for _ in range(needed):
                seq.blocks.append(self.pool.allocate(after=seq.blocks[-1], owner=seq))
        else:  # one run with room to grow, where the free blocks allow (a view of the cache, not a gather, on CPU)
            seq.blocks = self.pool.allocate_run(needed, -(-(len(seq.prompt_ids) + seq.budget) // size), owner=seq)
        for index in range(len(matched), min(len(seq.keys), target // size)):  # its full prompt blocks to come
            self.pool.pend(seq.blocks[index], seq.keys[index])
        seq.registered = len(matched)
        seq.num_computed = len(matched) * size
        if len(matched) == reusable and (donor := self._tail_donor(seq, matched, target)) is not None:
            copies.append((donor, seq.blocks[len(matched)], target - 1 - seq.num_computed))
            seq.num_computed = target - 1
        elif seq.num_computed < seq.offset:  # the prefix's last, partial block: a copy of its own
            copies.append((seq.adapter.blocks[len(matched)], seq.blocks[len(matched)], seq.offset - seq.num_computed))
            seq.num_computed = seq.offset
        if seq.params.penalized:  # its counts are (re)loaded from its tokens before its first step
            seq.penalty_row, seq.history_loaded = self.free_penalty_rows.pop(), False
        if not seq.output_ids:
            seq.cached_prompt_tokens = seq.num_computed - seq.offset
        seq.status = Status.PREFILLING
        return True

    def _tail_donor(self, seq: Sequence, matched: list[int], target: int) -> int | None:
        """The block of a running sequence that holds the KV of seq's tokens [len(matched) * size, target - 1): one
        that shares seq's matched blocks (the same prefix) and has computed the same tokens after them."""
        start = len(matched) * self.block_size
        if target - 1 <= start:
            return None
        tail = seq.kv_ids[start : target - 1]
        for other in self.running:
            if (other.num_computed >= target - 1 and len(other.blocks) > len(matched) and other.salt == seq.salt
                    and other.blocks[: len(matched)] == matched and other.kv_ids[start : target - 1] == tail):
                return other.blocks[len(matched)]
        return None

    def computed(self, seq: Sequence) -> None:
        """After seq's KV grew: offer its newly full blocks to the prefix cache."""
        full = seq.num_computed // self.block_size
        if full <= seq.registered:
            return
        if len(seq.keys) < full:
            tokens = seq.kv_ids[: full * self.block_size]
            seq.keys += block_keys(tokens, self.block_size, seq.salt, seq.keys[-1] if seq.keys else None,
                                   len(seq.keys))
        for index in range(seq.registered, full):
            self.pool.register(seq.blocks[index], seq.keys[index])
        seq.registered = full

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue with its output so far; its blocks go back (the full ones stay cached)."""
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        self.pool.unreserve(seq)
        self._give_back_row(seq)
        seq.blocks, seq.num_computed, seq.registered = [], 0, 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, keep_kv: bool) -> None:
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is not Status.FINISHED:
            self.running.remove(seq)
            # Its full blocks stay cached for later prefixes, unless its KV may be bad (a failed sequence).
            self.pool.release(seq.blocks, keep=keep_kv)
            self.pool.unreserve(seq)
            self._give_back_row(seq)
            seq.blocks = []
        seq.status = Status.FINISHED

    def _give_back_row(self, seq: Sequence) -> None:
        if seq.penalty_row is not None:
            self.free_penalty_rows.append(seq.penalty_row)
            seq.penalty_row = None


class Engine:
    """Serves concurrent `generate` calls from one model with continuous batching (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), grammars: Grammars | None = None):
        """`grammars`: the vocabulary's structured-output compiler (engine/structured.py); without it a request with a
        json_schema is refused."""
        self.loaded = loaded
        self.config = config
        self.grammars = grammars
        model_config = loaded.config
        self.max_seq_len = config.max_seq_len_for(model_config.seq_length)
        if self.max_seq_len > model_config.seq_length:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's seq_length={model_config.seq_length}")
        graphs = config.cuda_graphs if config.cuda_graphs is not None else loaded.device.type == "cuda"
        flex = config.attention == "flex" or (config.attention == "auto" and loaded.device.type == "cuda")
        block_size = config.block_size or (FLEX_BLOCK if flex else CPU_BLOCK_SIZE)
        width = -(-self.max_seq_len // block_size)  # blocks of one sequence of max_seq_len tokens
        num_blocks = config.max_batch_size * width  # the memory of max_batch_size slots of max_seq_len
        block_bytes = model_config.kv_bytes_per_token(loaded.dtype) * block_size
        if config.kv_cache_bytes is not None:
            num_blocks = config.kv_cache_bytes // block_bytes - int(graphs)  # graphs: a scratch block for padding
            if num_blocks < width:
                raise ValueError(
                    f"kv_cache_bytes={config.kv_cache_bytes} cannot hold one sequence of max_seq_len="
                    f"{self.max_seq_len} tokens ({width} blocks of {block_bytes} bytes); raise kv_cache_bytes or "
                    "lower max_seq_len"
                )
        # All KV memory is taken here, once: [layers, kv_heads, blocks, block_size, head_dim] for keys and values.
        self.lora = None  # the model's LoRA slots (model/lora.py), with max_adapters
        if config.max_adapters:
            from serve_app.model.lora import install_lora

            self.lora = install_lora(loaded.model, config.max_adapters, config.max_lora_rank, loaded.dtype,
                                     loaded.device)
        self._runner_args = dict(block_size=block_size, num_blocks=num_blocks, lora=self.lora)
        self.runner = ModelRunner(loaded, config.max_batch_size, self.max_seq_len, attention=config.attention,
                                  graphs=graphs, compile_decode=bool(config.compile_decode), **self._runner_args)
        self.warmup = self.runner.warmup()  # every flex kernel and decode graph, before the first request
        self.fallback: str | None = None  # why the serving path is a fallback, when it is
        self.device_checks: list[dict] = []
        check = config.device_check if config.device_check is not None else loaded.device.type == "cuda"
        if check:
            self._check_device()
        self.cache = self.runner.cache
        self.pool = BlockPool(num_blocks, block_size, caching=config.prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_batch_size, config.prefill_chunk)
        self._requests: dict[str, Sequence] = {}
        self._adapters: dict[str, LoadedAdapter] = {}
        self._free_lora = list(range(config.max_adapters, 0, -1))  # LoRA slots, 1..max_adapters
        self._lock = threading.Lock()  # guards the scheduler, _requests and the counters
        self._stopping = False
        self._failed: str | None = None  # why the loop stopped for good (a ReplicaFailed fault)
        self._failed_steps = 0  # steps in a row in which every request failed
        self._total_requests = 0
        self._finished: Counter[str] = Counter()
        self._steps = 0
        self._loop = compute.serve(self._turn, name="engine")  # steps run on the compute thread from now on

    def _check_device(self) -> None:
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
        self.runner = ModelRunner(self.loaded, self.config.max_batch_size, self.max_seq_len, attention="slot-view",
                                  graphs=False, **self._runner_args)
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
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, adapter: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Stream the generated tokens of one request (see the module docstring for the delta convention).

        Raises at once: InvalidRequest (empty prompt) and ContextLengthExceeded (no room to generate within
        max_seq_len or params.max_length). Raises at the first iteration: EngineOverloaded (waiting queue full),
        InvalidRequest (request_id already running, a json_schema that does not compile, an `adapter` that is not
        loaded) and ReplicaFailed (the engine stopped for good). Raises later:
        GenerationError, or ReplicaFailed for every request when the engine stops. Closing the iterator (a `break`,
        a cancelled task) aborts the request and frees its blocks within one step.
        """
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.loaded.config.padded_vocab_size
        if bad := sorted(token for token in params.token_ids() if token >= vocab):
            raise InvalidRequest(f"token id {bad[0]} (logit_bias or stop_token_ids) is not in this model's "
                                 f"vocabulary [0, {vocab})")
        loaded = self._adapter(adapter) if adapter is not None else None
        # A P-tuning prefix takes positions of the cache: it shortens the context window (max_seq_len) by its
        # length, and not max_length, which counts prompt and reply as in the original code.
        offset = loaded.offset if loaded is not None else 0
        budget = token_budget(len(prompt_ids), params, self.max_seq_len - offset)  # raises ContextLengthExceeded
        if params.json_schema is not None and self.grammars is None:
            raise InvalidRequest("structured output is not available here: this engine has no vocabulary for it")
        return self._stream(prompt_ids, params, budget, request_id or uuid.uuid4().hex, adapter)

    def _adapter(self, name: str) -> LoadedAdapter:
        with self._lock:
            return self._adapter_locked(name)

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, budget: int, request_id: str, adapter: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        loop = asyncio.get_running_loop()
        matcher = None
        if params.json_schema is not None:  # compiling may take a while: never on the event loop
            matcher = await loop.run_in_executor(None, self.grammars.matcher, params.json_schema)
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
            matcher=matcher,
        )
        self._submit(seq, adapter)
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

    def _submit(self, seq: Sequence, adapter: str | None = None) -> None:
        with self._lock:
            if self._failed is not None:
                raise ReplicaFailed(REPLICA_FAILED_MESSAGE)
            if self._stopping:
                raise EngineError("the engine has been shut down")
            if seq.request_id in self._requests:
                raise InvalidRequest(f"request id {seq.request_id!r} is already in progress")
            if len(self.scheduler.waiting) - self.scheduler.free_rows >= self.config.max_waiting:
                raise EngineOverloaded(
                    f"{len(self.scheduler.waiting)} requests are waiting for one of {self.runner.max_rows} rows; "
                    "retry later"
                )
            if adapter is not None:
                seq.adapter = self._adapter_locked(adapter)
                seq.adapter.users += 1
            self._requests[seq.request_id] = seq
            self.scheduler.waiting.append(seq)
            self._total_requests += 1
            self._loop.wake()

    # ---- adapters (model/adapters.py) ------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter) -> LoadedAdapter:
        """Load a PrefixAdapter or LoRAAdapter under `name` (blocking: call it off the event loop). A P-tuning
        prefix's KV is written once into blocks of the cache that every request of it shares; a LoRA adapter takes
        a slot of the model's LoRA layers. Loading a name again returns the loaded one (and keeps it if it was being
        unloaded). Raises AdapterError when it does not fit (max_adapters, max_lora_rank, no free KV blocks)."""
        from serve_app.model.adapters import AdapterError

        start = time.perf_counter()
        with self._lock:
            existing = self._adapters.get(name)
            if existing is not None:
                if existing.adapter.digest != adapter.digest:
                    raise AdapterError(f"adapter {name!r}: another adapter is loaded under this name")
                if not existing.ready:
                    raise AdapterError(f"adapter {name!r} is being loaded; retry")
                existing.closing = False
                return existing
            if len(self._adapters) >= self.config.max_adapters:
                raise AdapterError(f"adapter {name!r}: this engine holds at most max_adapters="
                                   f"{self.config.max_adapters} adapters, and that many are loaded")
            loaded = LoadedAdapter(name, adapter, b"adapter:" + adapter.digest)
            if adapter.kind == "ptuning":
                length = adapter.pre_seq_len
                if length >= self.max_seq_len:
                    raise AdapterError(f"adapter {name!r}: its pre_seq_len={length} leaves no room in max_seq_len="
                                       f"{self.max_seq_len}")
                count = -(-length // self.pool.block_size)
                if self.pool.available < count:
                    raise AdapterError(f"adapter {name!r}: no free KV blocks for its prefix now; retry")
                loaded.offset, loaded.blocks = length, self.pool.allocate_run(count, count, owner=loaded)
                loaded.shared = loaded.blocks[: length // self.pool.block_size]
            else:
                if adapter.rank > self.config.max_lora_rank:
                    raise AdapterError(f"adapter {name!r}: its rank {adapter.rank} exceeds max_lora_rank="
                                       f"{self.config.max_lora_rank}")
                loaded.lora = self._free_lora.pop()
            self._adapters[name] = loaded
        try:
            if loaded.blocks:
                self.runner.write_prefix(loaded.blocks, adapter.kv)
            else:
                self.runner.load_lora(loaded.lora, adapter)
        except BaseException:
            with self._lock:
                self._drop(loaded)
            raise
        with self._lock:
            loaded.ready = True
        logger.info("adapter %s (%s) loaded in %.3f s", name, adapter.kind, time.perf_counter() - start)
        return loaded

    def hold_adapter(self, name: str) -> None:
        """Keep an adapter loaded until `release_adapter` (a caller between loading it and generating with it)."""
        with self._lock:
            self._adapter_locked(name).users += 1

    def release_adapter(self, name: str) -> None:
        with self._lock:
            loaded = self._adapters.get(name)
            if loaded is not None:
                self._unuse(loaded)

    def _adapter_locked(self, name: str) -> LoadedAdapter:
        loaded = self._adapters.get(name)
        if loaded is None or not loaded.ready:
            raise InvalidRequest(f"adapter {name!r} is not loaded on this replica")
        return loaded

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter: now, or when the last request using it ends. Until then it still serves the requests
        given to it (routed here before its unloading was known)."""
        with self._lock:
            loaded = self._adapters.get(name)
            if loaded is None:
                return
            loaded.closing = True
            if not loaded.users:
                self._drop(loaded)

    def adapters(self) -> dict[str, str]:
        """The loaded adapters' kinds by name (those being unloaded left out)."""
        with self._lock:
            return self._listed_adapters()

    def _listed_adapters(self) -> dict[str, str]:
        return {name: a.adapter.kind for name, a in self._adapters.items() if a.ready and not a.closing}

    def _drop(self, loaded: LoadedAdapter) -> None:
        """Lock held. Its blocks and slot go back (a LoRA slot's old weights stay until the next load overwrites
        them: no row selects a free slot)."""
        if self._adapters.get(loaded.name) is loaded:
            del self._adapters[loaded.name]
        if loaded.blocks:
            self.pool.release(loaded.blocks, keep=False)
            loaded.blocks, loaded.shared = [], []
        if loaded.lora:
            self._free_lora.append(loaded.lora)
            loaded.lora = 0

    def _unuse(self, loaded: LoadedAdapter) -> None:
        """Lock held: one user of it is done (a sequence ended, or a hold was released)."""
        loaded.users -= 1
        if loaded.closing and not loaded.users:
            self._drop(loaded)

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
            running, pool = self.scheduler.running, self.pool
            return EngineStats(
                running=len(running),
                waiting=len(self.scheduler.waiting),
                free_slots=self.scheduler.free_rows,
                num_slots=self.runner.max_rows,
                max_seq_len=self.max_seq_len,
                kv_tokens_in_use=pool.num_held * pool.block_size,
                kv_capacity_tokens=pool.num_blocks * pool.block_size,
                kv_cache_bytes=self.cache.nbytes,
                cached_blocks=pool.num_cached,
                block_size=pool.block_size,
                num_blocks=pool.num_blocks,
                free_blocks=pool.num_free,
                used_blocks=pool.num_held,
                prefix_hit_blocks=pool.hits,
                evicted_blocks=pool.evictions,
                preemptions=self.scheduler.preemptions,
                total_requests=self._total_requests,
                finished=dict(self._finished),
                steps=self._steps,
                decode_path=self.decode_path,
                device_check=self.device_checks[-1] if self.device_checks else None,
                kernels=dict(self.loaded.kernels),
                dense_kernels=dict(self.loaded.dense_kernels),
                memory_bytes=memory,
                adapters=self._listed_adapters(),
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
            # A fault in scheduling would repeat at every turn for the waiting requests too: they fail with the
            # running ones rather than wait forever.
            logger.exception("engine step failed outside the model: failing the running and waiting requests")
            with self._lock:
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
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
        if batch.copies:
            self.runner.copy_kv(batch.copies)
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

    def _run_apart(self, batch: Batch, exc: Exception) -> list[Result]:
        """After a failed step: each sequence's work run alone, so that a request that makes the model fail fails
        alone. Safe to repeat: a step writes KV at explicit positions and `num_computed` moves only after it, and a
        token's noise is a function of (seed, position). Returns the results of the runs that succeeded."""
        alone = [(seq, Batch([(seq, chunk)], [])) for seq, chunk in batch.prefills] + [
            (seq, Batch([], [seq])) for seq in batch.decodes]
        logger.error("engine step failed (%d sequences): running each alone", len(alone), exc_info=exc)
        results: list[Result] = []
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

    def _run(self, batch: Batch) -> list[Result]:
        """One packed forward and on-device sampling: (sequence, tokens computed, chosen id, -1 for NaN/Inf logits,
        or None when no token is due)."""
        work, computed = [], []
        for seq in [seq for seq, _ in batch.prefills] + batch.decodes:
            if seq.penalty_row is not None and not seq.history_loaded:
                self.runner.load_history(seq.penalty_row, seq.prompt_ids, seq.output_ids)
                seq.history_loaded = True
        for seq, chunk in batch.prefills:
            start = seq.num_computed
            # A token is due at the end of the prompt; a preempted sequence's recompute ends before its last token.
            done = start + chunk == seq.prefill_target and not seq.output_ids
            adapter = seq.adapter
            work.append(Work(seq.kv_ids[start : start + chunk], tuple(seq.blocks), start,
                             seq.params if done else None, seq.seed, penalty_row=seq.penalty_row,
                             allowed=seq.matcher.compute_bitmask() if done and seq.matcher else None,
                             offset=seq.offset, lora=adapter.lora if adapter is not None else 0))
            computed.append((seq, chunk))
        for seq in batch.decodes:
            work.append(Work([seq.output_ids[-1]], tuple(seq.blocks), seq.num_computed, seq.params, seq.seed,
                             len(seq.output_ids), seq.penalty_row,
                             seq.matcher.compute_bitmask() if seq.matcher else None,
                             seq.offset, seq.adapter.lora if seq.adapter is not None else 0))
            computed.append((seq, 1))
        ids, logprobs = self.runner.step_logprobs(work)
        return [(seq, n, token, logprob) for (seq, n), token, logprob in zip(computed, ids, logprobs)]

    def _postprocess(self, results: list[Result]) -> None:
        """Record each chosen token; deliver; finish sequences."""
        now = time.perf_counter()
        outcomes: list[tuple[Sequence, int | None, str | None, EngineError | None, TokenLogprob | None]] = []
        for seq, computed, token, logprob in results:
            seq.num_computed += computed
            if seq.status is Status.PREFILLING and seq.num_computed == seq.prefill_target:
                seq.status = Status.DECODING
            if token is None or seq.abort_requested:
                outcomes.append((seq, None, "abort" if seq.abort_requested else None, None, None))
                continue
            if token < 0:
                outcomes.append((seq, None, "error", GenerationError(NON_FINITE_MESSAGE), None))
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.output_ids.append(token)
            reason = "stop" if token in seq.stops else ("length" if len(seq.output_ids) >= seq.budget else None)
            if seq.matcher is not None and reason != "stop":
                if not seq.matcher.consume_token(token):
                    message = f"the reply left its JSON schema: {seq.matcher.get_error()}"
                    outcomes.append((seq, None, "error", GenerationError(message), None))
                    continue
                if seq.matcher.is_stopped():  # the JSON is complete: nothing may follow it
                    reason = "stop"
            outcomes.append((seq, token, reason, None, logprob))
        with self._lock:
            for seq, token, reason, error, logprob in outcomes:
                if seq.status is Status.FINISHED:
                    continue
                if error is None:
                    self.scheduler.computed(seq)
                logprobs = [logprob] if logprob is not None else None
                if error is not None:
                    self._fail(seq, error)
                elif reason is not None:
                    self._finish(seq, reason, [] if token is None else [token], logprobs)
                elif token is not None:
                    seq.emit(TokenDelta([token], logprobs=logprobs))

    def _finish(self, seq: Sequence, reason: str, token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None) -> None:
        """Lock held. Frees its blocks (the full ones stay cached as prefixes) and sends the final delta."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, keep_kv=True)
        if seq.adapter is not None:
            self._unuse(seq.adapter)
        self._requests.pop(seq.request_id, None)
        self._finished[reason] += 1
        seq.emit(TokenDelta(token_ids or [], reason, seq.stats(), logprobs))

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        """Lock held. Frees its blocks without keeping its KV (it may hold NaN or half-written rows)."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq, keep_kv=False)
        if seq.adapter is not None:
            self._unuse(seq.adapter)
        self._requests.pop(seq.request_id, None)
        self._finished["error"] += 1
        seq.emit(error)
