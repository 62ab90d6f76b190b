"""Pool metrics and per-request logs, end to end: requests over HTTP, then a real Prometheus scrape of Ray's exporter.

One Ray cluster for the module with its metrics export port set (the dashboard agent serves it even without the
dashboard) and a fast report interval, so replica metrics reach the scrape within a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import free_port, local_config, running, wait_for

MODEL = "chatglm2-6b"
SECRET_PROMPT = "zebra-quokka-4711 please count"


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    import ray

    metrics_port = free_port()
    config = local_config(tiny_checkpoint, pools=[{"model": MODEL, "precision": "fp32"}],
                          engine={"max_batch_size": 2, "max_seq_len": 128})
    with running(config, num_cpus=2, _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000}) as (base_url, _):
        logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield client, f"http://127.0.0.1:{metrics_port}/metrics", logs_dir


def _chat(client: httpx.Client, content: str, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0} | body
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def traffic(cluster):
    """Two good requests (one streamed), one the pool rejects; returns the non-streamed reply."""
    client, _, _ = cluster
    reply = _chat(client, SECRET_PROMPT)
    assert reply.status_code == 200, reply.text
    streamed = _chat(client, "hello", stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    too_long = _chat(client, "word " * 400)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    return reply


def _ours(families) -> dict[str, list]:
    """Sample lists keyed by sample name, only this pool's chatglm2 metrics."""
    samples: dict[str, list] = {}
    for family in families:
        for sample in family.samples:
            if sample.name.startswith("ray_chatglm2_") and sample.labels.get("model") == MODEL:
                samples.setdefault(sample.name, []).append(sample)
    return samples


def _total(samples, name, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_metrics_are_exported(cluster, traffic):
    _, metrics_url, _ = cluster
    expected = {
        "ray_chatglm2_requests_total", "ray_chatglm2_request_errors_total", "ray_chatglm2_generated_tokens_total",
        "ray_chatglm2_prompt_tokens_total", "ray_chatglm2_time_to_first_token_seconds_count",
        "ray_chatglm2_time_to_first_token_seconds_bucket", "ray_chatglm2_inter_token_latency_seconds_count",
        "ray_chatglm2_queue_depth", "ray_chatglm2_running_sequences", "ray_chatglm2_kv_cache_usage_ratio",
        "ray_chatglm2_memory_bytes", "ray_chatglm2_decode_fallback", "ray_chatglm2_kv_blocks",
    }
    samples: dict = {}

    def scraped_all() -> bool:
        nonlocal samples
        samples = _ours(text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text))
        return expected <= samples.keys() and _total(samples, "ray_chatglm2_requests_total") >= 3

    wait_for(scraped_all, 60, "the chatglm2 metrics in a scrape", interval_s=1.0)
    assert _total(samples, "ray_chatglm2_requests_total", route="pool") >= 3
    assert _total(samples, "ray_chatglm2_request_errors_total", error_type="context_length_exceeded") >= 1
    assert _total(samples, "ray_chatglm2_generated_tokens_total") > 0
    assert _total(samples, "ray_chatglm2_prompt_tokens_total") > 0
    assert _total(samples, "ray_chatglm2_time_to_first_token_seconds_count") >= 2  # the rejected one has no token
    assert _total(samples, "ray_chatglm2_inter_token_latency_seconds_count") >= 1
    assert 0.0 <= _total(samples, "ray_chatglm2_kv_cache_usage_ratio") <= 1.0
    assert _total(samples, "ray_chatglm2_memory_bytes", kind="weights") > 0  # fp32 pool: no quantized layers
    assert _total(samples, "ray_chatglm2_memory_bytes", kind="kv_cache") > 0
    assert _total(samples, "ray_chatglm2_decode_fallback") == 0  # the serving path is the one configured
    blocks = {state: _total(samples, "ray_chatglm2_kv_blocks", state=state) for state in ("used", "cached", "free")}
    assert sum(blocks.values()) > 0 and blocks["free"] > 0  # every block in one state; traffic over: none used
    assert {s.labels["deployment"] for s in samples["ray_chatglm2_requests_total"]} == {MODEL}


@pytest.mark.slow
def test_request_log_line_has_ids_and_no_text(cluster, traffic):
    _, _, logs_dir = cluster
    request_id = traffic.json()["id"]
    lines: list[str] = []

    def logged() -> bool:
        nonlocal lines
        lines = [line for path in logs_dir.glob(f"replica_*{MODEL}*.log")
                 for line in path.read_text(errors="replace").splitlines() if request_id in line]
        return bool(lines)

    wait_for(logged, 15, f"a log line for {request_id}")
    assert len(lines) == 1, lines
    line = lines[0]
    usage, finish = traffic.json()["usage"], traffic.json()["choices"][0]["finish_reason"]
    assert "request finished" in line and f"model={MODEL}" in line and f"finish_reason={finish}" in line
    assert f"prompt_tokens={usage['prompt_tokens']}" in line and f"completion_tokens={usage['completion_tokens']}" in line
    assert "ttft_s=" in line
    assert "zebra-quokka" not in line
    assert traffic.headers["x-request-id"] in line  # Serve's own request id, added to every record it handles
    assert not any("zebra-quokka" in path.read_text(errors="replace") for path in logs_dir.glob("*.log"))


def test_request_trace_counts_and_times_without_text():
    """Outside a Ray worker the metrics record nothing; the trace's own bookkeeping still works."""
    from serve_app.server.messages import ErrorInfo, TextDelta
    from serve_app.server.metrics import PoolMetrics

    metrics = PoolMetrics("m")
    ok = metrics.start_request("r1")
    ok.prompt(5)
    ok.tokens(1)
    ok.tokens(2)
    ok.emitted(TextDelta("some reply", "length"))
    fields = ok.log_fields()
    assert fields["completion_tokens"] == 3 and fields["prompt_tokens"] == 5 and fields["finish_reason"] == "length"
    assert fields["ttft_s"] is not None and "some reply" not in str(fields)
    failed = metrics.start_request("r2")
    failed.emitted(TextDelta(error=ErrorInfo("context_length_exceeded", "too long")))
    assert failed.log_fields()["error_type"] == "context_length_exceeded" and failed.log_fields()["ttft_s"] is None
    assert metrics.start_request("r3").log_fields()["finish_reason"] == "abort"  # the stream was closed early


def test_gauge_refresh_starts_only_on_an_event_loop():
    import asyncio

    from serve_app.server.metrics import PoolMetrics

    reads = []
    metrics = PoolMetrics("m", read_stats=lambda: reads.append(1) or _stats(), refresh_s=0.01)
    assert not metrics.start_refresh()

    async def run() -> None:
        assert metrics.start_refresh() and metrics.start_refresh()  # idempotent
        await asyncio.sleep(0.05)
        metrics._refresh_task.cancel()

    asyncio.run(run())
    assert len(reads) >= 2


def _stats():
    from serve_app.engine.engine import EngineStats

    return EngineStats(running=1, waiting=2, free_slots=1, num_slots=2, max_seq_len=64, kv_tokens_in_use=32,
                       kv_capacity_tokens=128, kv_cache_bytes=0, cached_blocks=0, total_requests=3,
                       finished={}, steps=4, kernels={"int4pack_mm_cpu": 8},
                       memory_bytes={"weights": 10, "resident": 20, "kv_cache": 5})


def test_block_counters_take_only_what_is_new():
    from dataclasses import replace

    from serve_app.server.metrics import PoolMetrics

    metrics = PoolMetrics("m")
    increments = []
    metrics.preemptions = type("C", (), {"inc": lambda self, n: increments.append(n)})()
    stats = replace(_stats(), preemptions=3, used_blocks=2, free_blocks=5, num_blocks=8, cached_blocks=1)
    metrics.record_engine(stats)
    metrics.record_engine(stats)  # polled again, nothing new
    metrics.record_engine(replace(stats, preemptions=5))
    assert increments == [3, 2]
