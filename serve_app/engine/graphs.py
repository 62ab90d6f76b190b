"""Decode steps replayed from captured graphs, one per batch-size bucket (after vLLM and SGLang).

A decode step has the same shapes every time for a given number of rows, so it can be captured once per bucket
(1, 2, 4, ... 128 rows) and replayed with new inputs copied into static buffers. A step of B rows runs in the
smallest bucket >= B; the extra rows are padding: they decode token 0 at position 0 of the cache's scratch block
(which no sequence owns) and their ids are dropped.

`capture` turns a function of the static buffers into a replay function. On CUDA it records a CUDA graph
(`CudaGraphCapture`: one side stream and one memory pool for all of a runner's graphs, so one extra cuBLAS
workspace, not one per graph); tests inject a capture that simply calls the function again, which exercises every
piece of bookkeeping here (bucket choice, padding, copy-in, slicing the result) on CPU. With `compile_step` the
step itself (forward and sampling, per bucket) goes through torch.compile first (fullgraph, static shapes; the
Triton matmul stays one opaque op), and the graph records the compiled kernels.

A graph reads its inputs by address: the static buffers (owned here), the KV cache (with its per-block logical
indices, which the flex mask reads) and the model's rotary tables.
`run` checks before every replay that none of them has been reallocated since capture (it raises rather than let
a graph read freed memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from serve_app.engine.params import MAX_BIAS, MAX_STOP_TOKEN_IDS
from serve_app.engine.sampling import Penalties, SamplingTensors, TokenHistory, sample
from serve_app.model.attention import ROW_BUCKETS, StepPlan, as_table, run_under_recompile_limit
from serve_app.model.chatglm2 import KVCache

BUCKETS = ROW_BUCKETS
BIAS_WIDTH = MAX_BIAS + MAX_STOP_TOKEN_IDS + 1  # logit_bias, plus the stop ids (and eos) a min_tokens row bans
# The sampling variants a step can need: (any row sampled, some row has top_p/top_k/min_p); greedy-only needs
# neither.
VARIANTS = ((False, False), (True, False), (True, True))
# Entries dynamo may keep for the compiled step: every bucket and variant of one runner, with room for a few more.
STEP_RECOMPILE_LIMIT = 2 * len(BUCKETS) * len(VARIANTS)

StepOutputs = tuple[Tensor, Tensor]  # ids [bucket], logits [bucket, vocab] (kept for resampling an overflow row)
Capture = Callable[[Callable[[], StepOutputs]], Callable[[], StepOutputs]]


def buckets_for(max_rows: int, buckets: tuple[int, ...] = BUCKETS) -> tuple[int, ...]:
    """The buckets worth capturing for `max_rows` rows at most: those below it and the first that holds it all."""
    below = tuple(b for b in buckets if b < max_rows)
    above = [b for b in buckets if b >= max_rows]
    return below + tuple(above[:1])


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `rows`, or None (the step then runs eagerly)."""
    return next((b for b in buckets if b >= rows), None)


class CudaGraphCapture:
    """A `Capture` that records CUDA graphs after two warm-up runs (compilation, allocations), all on one side
    stream and into one memory pool: graphs replay one at a time, in any order, never concurrently."""

    def __init__(self, pool=None):
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.captures = 0

    def __call__(self, fn: Callable[[], StepOutputs]) -> Callable[[], StepOutputs]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        self.captures += 1

        def replay() -> StepOutputs:
            graph.replay()
            return out

        return replay


@dataclass
class DecodeRows:
    """One decode step on the host: per row its input token, block table (or slot) and position (sampling settings
    travel apart)."""

    token_ids: list[int]
    tables: list[tuple[int, ...] | int]
    positions: list[int]  # position of the input token (its K/V is written there)


class StaticDecode:
    """The static buffers of one bucket; `fill` copies a step's rows in and pads the rest."""

    def __init__(self, rows: int, cache: KVCache, device, history: TokenHistory | None = None):
        long = {"dtype": torch.int64, "device": device}
        self.rows = rows
        self.scratch = cache.scratch_block
        self.block_size = cache.block_size
        self.width = cache.table_width
        self.input_ids = torch.zeros(rows, **long)
        self.positions = torch.zeros(rows, **long)
        self.write_index = torch.full((rows,), self.scratch * self.block_size, **long)
        self.tables = torch.full((rows, self.width), self.scratch, **long)
        self.lens = torch.ones(rows, **long)
        self.logit_rows = torch.arange(rows, **long)
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.ones(rows, **long)
        self.min_p = torch.zeros(rows, dtype=torch.float32, device=device)
        # Always applied in a graph (zeros add nothing): no extra variant to capture for requests with biases.
        self.bias_ids = torch.zeros(rows, BIAS_WIDTH, **long)
        self.bias_values = torch.zeros(rows, BIAS_WIDTH, dtype=torch.float32, device=device)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)
        self.seed_lo = torch.zeros(rows, **long)
        self.seed_hi = torch.zeros(rows, **long)
        self.sample_positions = torch.ones(rows, **long)
        # Penalties, always applied in a graph (the spare history row and neutral factors change nothing).
        self.history = history
        if history is not None:
            floats = {"dtype": torch.float32, "device": device}
            self.penalties = Penalties(torch.full((rows,), history.spare, **long), torch.ones(rows, **floats),
                                       torch.zeros(rows, **floats), torch.zeros(rows, **floats), history)

    def plan(self) -> StepPlan:
        return StepPlan([], self.input_ids, self.positions, self.write_index, self.logit_rows, self.tables, self.lens,
                        block_size=self.block_size)

    def settings(self, any_sampled: bool, needs_sort: bool) -> SamplingTensors:
        return SamplingTensors(self.temperature, self.top_p, self.top_k, self.min_p, self.greedy, self.seed_lo,
                               self.seed_hi, any_sampled, needs_sort, self.bias_ids, self.bias_values,
                               self.penalties if self.history is not None else None)

    def fill(self, rows: DecodeRows, settings: SamplingTensors) -> None:
        """Copy the step in (one host tensor, one copy) and reset the padding rows."""
        n, pad = len(rows.token_ids), self.rows - len(rows.token_ids)
        size, width = self.block_size, self.width
        tables = [as_table(t) for t in rows.tables]
        flat = [b for t in tables for b in t[:width] + (t[0],) * (width - len(t))] + [self.scratch] * (pad * width)
        host = torch.tensor(
            [
                *rows.token_ids, *[0] * pad,
                *rows.positions, *[0] * pad,
                *[t[p // size] * size + p % size for t, p in zip(tables, rows.positions)],
                *[self.scratch * size] * pad,
                *[p + 1 for p in rows.positions], *[1] * pad,
                *[p + 1 for p in rows.positions], *[1] * pad,
                *flat,
            ],
            dtype=torch.int64,
        )
        if self.input_ids.device.type == "cuda":
            host = host.pin_memory()
        host = host.to(self.input_ids.device, non_blocking=True)
        columns = host[: 5 * self.rows].view(5, self.rows)
        for buffer, values in zip(
            (self.input_ids, self.positions, self.write_index, self.lens, self.sample_positions), columns
        ):
            buffer.copy_(values)
        self.tables.copy_(host[5 * self.rows :].view(self.rows, width))
        for buffer, values, fill in (
            (self.temperature, settings.temperature, 1.0),
            (self.top_p, settings.top_p, 1.0),
            (self.top_k, settings.top_k, 1),
            (self.min_p, settings.min_p, 0.0),
            (self.greedy, settings.greedy, True),
            (self.seed_lo, settings.seed_lo, 0),
            (self.seed_hi, settings.seed_hi, 0),
        ):
            buffer[:n].copy_(values)
            buffer[n:].fill_(fill)
        self.bias_ids.zero_()
        self.bias_values.zero_()
        if settings.bias_ids is not None:
            width = settings.bias_ids.shape[1]
            self.bias_ids[:n, :width].copy_(settings.bias_ids)
            self.bias_values[:n, :width].copy_(settings.bias_values)
        if self.history is not None:
            mine, given = self.penalties, settings.penalties
            for buffer, values, fill in ((mine.rows, given and given.rows, self.history.spare),
                                         (mine.repetition, given and given.repetition, 1.0),
                                         (mine.presence, given and given.presence, 0.0),
                                         (mine.frequency, given and given.frequency, 0.0)):
                if values is None:
                    buffer.fill_(fill)
                else:
                    buffer[:n].copy_(values)
                    buffer[n:].fill_(fill)


class DecodeGraphs:
    """Captures the decode step (forward + sampling) per (bucket, sampling variant) and replays it.

    `capture_all` records every bucket and variant up front (the runner's warm-up, before a replica serves);
    otherwise each is captured the first time a step needs it."""

    def __init__(self, model, cache: KVCache, attention, device, capture: Capture, max_rows: int,
                 history: TokenHistory | None = None, buckets: tuple[int, ...] = BUCKETS, compile_step: bool = False,
                 compile_backend: str = "inductor"):
        if cache.scratch_block is None:
            raise ValueError("decode graphs need a KV cache with a scratch block for padding rows")
        if attention.name != "flex":
            raise ValueError("decode graphs need the flex attention backend (its inputs are fixed-shape tensors)")
        self.model, self.cache, self.attention, self.device = model, cache, attention, device
        self.capture = capture
        self.buckets = buckets_for(max_rows, buckets)
        self.compile_step = compile_step
        self._compile_backend = compile_backend
        self.history = history
        self._static: dict[int, StaticDecode] = {}
        self._replays: dict[tuple[int, bool, bool], Callable[[], StepOutputs]] = {}
        self._addresses: tuple[int, ...] | None = None  # of what the graphs read, at the first capture

    def bucket(self, rows: int) -> int | None:
        return bucket_for(rows, self.buckets)

    def read_addresses(self) -> tuple[int, ...]:
        """Where the graphs' inputs outside this object live now: the KV cache (its blocks and their logical
        indices) and the rotary tables."""
        cos, sin = self.model.rope(self.cache.max_positions)
        history = () if self.history is None else (self.history.counts.data_ptr(), self.history.seen.data_ptr())
        return tuple(t.data_ptr() for t in self.cache.k + self.cache.v) + (
            self.cache.block_logical.data_ptr(), cos.data_ptr(), sin.data_ptr()) + history

    def capture_all(self) -> dict:
        """Capture every bucket and sampling variant now; returns {"seconds", "graphs"}."""
        start = time.perf_counter()
        for bucket in self.buckets:
            static = self._static_for(bucket)
            for any_sampled, needs_sort in VARIANTS:
                self._replay_for(static, any_sampled, needs_sort)
        return {"seconds": time.perf_counter() - start, "graphs": len(self._replays)}

    def run(self, rows: DecodeRows, settings: SamplingTensors) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [R], logits [R, vocab], positions of the chosen tokens [R]) on the device for the R rows; ids as
        `sampling.sample` gives them. The step must fit a bucket."""
        bucket = self.bucket(len(rows.token_ids))
        if bucket is None:
            raise ValueError(f"{len(rows.token_ids)} rows exceed the largest bucket {self.buckets[-1]}")
        static = self._static_for(bucket)
        self.cache.note_tables(as_table(t) for t in rows.tables)
        static.fill(rows, settings)
        replay = self._replay_for(static, settings.any_sampled, settings.needs_sort)
        if self.read_addresses() != self._addresses:
            raise RuntimeError("the KV cache or the rotary tables were reallocated after the decode graphs were "
                               "captured: replaying would read freed memory")
        ids, logits = replay()
        n = len(rows.token_ids)
        return ids[:n], logits[:n], static.sample_positions[:n]

    def _static_for(self, bucket: int) -> StaticDecode:
        static = self._static.get(bucket)
        if static is None:
            static = self._static[bucket] = StaticDecode(bucket, self.cache, self.device, self.history)
        return static

    def _replay_for(self, static: StaticDecode, any_sampled: bool, needs_sort: bool) -> Callable[[], StepOutputs]:
        key = (static.rows, any_sampled, needs_sort)
        if key not in self._replays:
            if self._addresses is None:
                self._addresses = self.read_addresses()
            self._replays[key] = self.capture(self._step_fn(static, any_sampled, needs_sort))
        return self._replays[key]

    def _step_fn(self, static: StaticDecode, any_sampled: bool, needs_sort: bool) -> Callable[[], StepOutputs]:
        def step() -> StepOutputs:
            logits = self.model.packed_step(static.plan(), self.cache, self.attention)  # [bucket, vocab]
            return sample(logits, static.settings(any_sampled, needs_sort), static.sample_positions), logits

        if not self.compile_step:
            return torch.inference_mode()(step)
        compiled = torch.compile(step, backend=self._compile_backend, fullgraph=True, dynamic=False)

        def compiled_step() -> StepOutputs:
            # Each (bucket, variant) is its own entry in dynamo's cache; past the limit it must raise, not run eager.
            with torch.no_grad():
                return run_under_recompile_limit(compiled, STEP_RECOMPILE_LIMIT)

        return compiled_step
