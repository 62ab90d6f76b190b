"""Prometheus metrics of one pool, recorded by its replicas through `ray.serve.metrics`.

Ray exports every metric with the prefix `ray_` (a counter also gets `_total`, a histogram `_bucket` / `_sum` /
`_count`) and adds Serve's `deployment`, `replica` and `application` labels; docs/kubernetes.md lists them and
k8s/grafana-dashboard.json plots them. Counters and histograms are fed per request by a `RequestTrace`; the engine
gauges are refreshed from `Engine.stats()` by a background task on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.engine.engine import FALLBACK_SUFFIX, EngineStats
from serve_app.server.messages import TextDelta

TTFT_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
INTER_TOKEN_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class PoolMetrics:
    """The metrics of one pool (label `model`), created once per replica."""

    def __init__(self, model_name: str, read_stats: Callable[[], EngineStats] | None = None, refresh_s: float = 1.0):
        self.model_name = model_name
        self.read_stats = read_stats
        self.refresh_s = refresh_s
        self.requests = Counter("chatglm2_requests", "requests accepted", tag_keys=("model", "route"))
        self.errors = Counter("chatglm2_request_errors", "requests that ended in an error",
                              tag_keys=("model", "error_type"))
        self.generated_tokens = Counter("chatglm2_generated_tokens", "tokens generated", tag_keys=("model",))
        self.prompt_tokens = Counter("chatglm2_prompt_tokens", "prompt tokens prefilled", tag_keys=("model",))
        self.ttft = Histogram("chatglm2_time_to_first_token_seconds", "request arrival to first token",
                              boundaries=TTFT_BOUNDARIES_S, tag_keys=("model",))
        self.inter_token = Histogram("chatglm2_inter_token_latency_seconds", "time between two tokens of a sequence",
                                     boundaries=INTER_TOKEN_BOUNDARIES_S, tag_keys=("model",))
        self.queue_depth = Gauge("chatglm2_queue_depth", "requests waiting in the engine", tag_keys=("model",))
        self.running = Gauge("chatglm2_running_sequences", "sequences being decoded", tag_keys=("model",))
        self.kv_usage = Gauge("chatglm2_kv_cache_usage_ratio", "KV cache in use, 0..1", tag_keys=("model",))
        self.kv_blocks = Gauge("chatglm2_kv_blocks", "KV blocks by state: used (in running sequences' tables), "
                               "cached (a prefix kept for reuse) or free", tag_keys=("model", "state"))
        self.prefix_hits = Counter("chatglm2_prefix_cache_hit_blocks", "KV blocks shared from the prefix cache",
                                   tag_keys=("model",))
        self.preemptions = Counter("chatglm2_preemptions", "sequences sent back to the queue for want of KV blocks "
                                   "(recomputed, not lost)", tag_keys=("model",))
        self._counted = {"prefix_hits": 0, "preemptions": 0}  # the engine's running totals already counted
        self.memory = Gauge("chatglm2_memory_bytes", "memory the replica holds: weights, kv_cache, and allocated / "
                            "reserved / peak_* on a GPU or resident on CPU", tag_keys=("model", "kind"))
        self.quantized_layers = Gauge("chatglm2_quantized_layers", "quantized layers per kernel they run",
                                      tag_keys=("model", "kernel"))
        self.decode_fallback = Gauge("chatglm2_decode_fallback", "1 when the replica serves on the eager fallback "
                                     "after its start-up device check failed", tag_keys=("model",))
        for metric in (self.requests, self.errors, self.generated_tokens, self.prompt_tokens, self.ttft,
                       self.inter_token, self.queue_depth, self.running, self.kv_usage, self.kv_blocks,
                       self.prefix_hits, self.preemptions, self.memory, self.quantized_layers, self.decode_fallback):
            metric.set_default_tags({"model": model_name})
        self._refresh_task: asyncio.Task | None = None

    def start_request(self, request_id: str, route: str = "pool") -> RequestTrace:
        """Count a request and start its clock; also starts the gauge refresh if it is not running yet."""
        self.start_refresh()
        self.requests.inc(tags={"route": route})
        return RequestTrace(self, request_id)

    def record_engine(self, stats: EngineStats) -> None:
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_usage.set(stats.kv_tokens_in_use / stats.kv_capacity_tokens if stats.kv_capacity_tokens else 0.0)
        for state, blocks in (("used", stats.used_blocks), ("cached", stats.cached_blocks),
                              ("free", stats.free_blocks)):
            self.kv_blocks.set(blocks, tags={"state": state})
        for name, metric, total in (("prefix_hits", self.prefix_hits, stats.prefix_hit_blocks),
                                    ("preemptions", self.preemptions, stats.preemptions)):
            if total > self._counted[name]:  # the engine keeps totals; the counters take what is new
                metric.inc(total - self._counted[name])
                self._counted[name] = total
        for kind, value in stats.memory_bytes.items():
            self.memory.set(value, tags={"kind": kind})
        for kernel, layers in stats.kernels.items():
            self.quantized_layers.set(layers, tags={"kernel": kernel})
        self.decode_fallback.set(1.0 if stats.decode_path.endswith(FALLBACK_SUFFIX) else 0.0)

    def start_refresh(self) -> bool:
        """Refresh the gauges from `read_stats()` every `refresh_s` on the running event loop.

        Idempotent; returns False (and starts nothing) without `read_stats` or outside an event loop, so a replica
        may call it from `__init__` (Serve may run that on the replica's loop); `start_request` calls it again.
        """
        if self._refresh_task is not None and not self._refresh_task.done():
            return True
        if self.read_stats is None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._refresh_task = loop.create_task(self._refresh(self.read_stats), name=f"{self.model_name}-metrics")
        return True

    async def _refresh(self, read_stats: Callable[[], EngineStats]) -> None:
        while True:
            self.record_engine(read_stats())
            await asyncio.sleep(self.refresh_s)


class RequestTrace:
    """One request's timing and token counts: observed into the pool's metrics as they happen, logged at the end."""

    def __init__(self, metrics: PoolMetrics, request_id: str):
        self.metrics = metrics
        self.request_id = request_id
        self.started_at = time.perf_counter()
        self.last_token_at: float | None = None
        self.ttft_s: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error_code: str | None = None

    def prompt(self, num_tokens: int) -> None:
        self.prompt_tokens = num_tokens
        if num_tokens:
            self.metrics.prompt_tokens.inc(num_tokens)

    def tokens(self, num_tokens: int) -> None:
        """Tokens just generated. The first ones give the TTFT; later ones the gap since the previous, per token."""
        if not num_tokens:
            return
        now = time.perf_counter()
        if self.last_token_at is None:
            self.ttft_s = now - self.started_at
            self.metrics.ttft.observe(self.ttft_s)
        else:
            self.metrics.inter_token.observe((now - self.last_token_at) / num_tokens)
        self.last_token_at = now
        self.completion_tokens += num_tokens
        self.metrics.generated_tokens.inc(num_tokens)

    def emitted(self, delta: TextDelta) -> None:
        """A delta on its way to the ingress: the last one says how the request ended."""
        if delta.error:
            self.error_code, self.finish_reason = delta.error.code, "error"
            self.metrics.errors.inc(tags={"error_type": delta.error.code})
        elif delta.finish_reason:
            self.finish_reason = delta.finish_reason

    def log_fields(self) -> dict:
        """The request's summary for the structured log line: ids, counts and timing, never any text."""
        return {
            "chatglm2_request_id": self.request_id,
            "model": self.metrics.model_name,
            "finish_reason": self.finish_reason or "abort",  # no final delta: the client went away
            "error_type": self.error_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 4) if self.ttft_s is not None else None,
            "duration_s": round(time.perf_counter() - self.started_at, 4),
        }
