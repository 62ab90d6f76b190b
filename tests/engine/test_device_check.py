"""The start-up device check: the serving path against the eager reference, and what a replica does when they
disagree. On CPU the check is forced on (it runs by default on CUDA only); a broken fast path is injected."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serve_app.engine.device_check import DeviceCheckFailed, run_device_check
from serve_app.engine.engine import FALLBACK_SUFFIX, Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner
from serve_app.model import attention as attention_module
from serve_app.model.demo import random_model
from serve_app.model.quant import QuantizedLinear

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CHECKED = {"max_batch_size": 4, "max_seq_len": 128, "device_check": True}


def greedy_ids(engine: Engine, prompt: list[int], n: int = 8) -> list[int]:
    async def run() -> list[int]:
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        return [t async for delta in engine.generate(prompt, params) for t in delta.token_ids]

    return asyncio.run(run())


def stop(engine: Engine) -> None:
    asyncio.run(engine.shutdown())


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_serving_path_passes_and_is_reported(precision):
    engine = Engine(random_model("tiny", precision, "cpu"), EngineConfig(**CHECKED))
    stats = engine.stats()
    assert stats.device_check["passed"] and stats.device_check["max_abs_error"] <= stats.device_check["bound"]
    assert stats.device_check["greedy_agreement"] == 1.0 and stats.device_check["seconds"] > 0
    assert not stats.decode_path.endswith(FALLBACK_SUFFIX) and engine.fallback is None
    stop(engine)


def test_the_flex_graph_path_passes():
    runner = ModelRunner(random_model("tiny", "fp32", "cpu"), 4, 128, attention="flex", graphs=True,
                         capture=lambda fn: fn)
    result = run_device_check(runner)
    assert result.passed, result.detail
    assert result.path.startswith("flex") and "decode graphs" in result.path and result.reference.startswith("slot")


def test_the_check_is_off_on_cpu_by_default():
    engine = Engine(random_model("tiny", "fp32", "cpu"), EngineConfig(max_batch_size=2, max_seq_len=64))
    assert engine.stats().device_check is None
    stop(engine)


@pytest.fixture
def broken_flex(monkeypatch):
    """Flex decode rows read the keys one slot off: the kind of bug a wrong block mask or index makes."""
    real = attention_module.FlexSlotAttention.__call__

    def off_by_one_slot(self, q, layer_k, layer_v, plan):
        if plan.decode_tables is not None:
            plan.decode_tables = (plan.decode_tables + 1) % layer_k.shape[1]
            self.prepare(plan, _Cache(layer_k))
        return real(self, q, layer_k, layer_v, plan)

    monkeypatch.setattr(attention_module.FlexSlotAttention, "__call__", off_by_one_slot)


class _Cache:
    def __init__(self, layer_k):
        self.k = layer_k[None]
        self.block_size = layer_k.shape[2]


def test_a_broken_fast_path_refuses_to_start_and_names_it(broken_flex):
    with pytest.raises(DeviceCheckFailed, match=r"serving path \(flex.*disagrees.*fallback: eager"):
        Engine(random_model("tiny", "fp32", "cpu"), EngineConfig(**CHECKED, attention="flex"))


def test_a_broken_fast_path_with_a_fallback_serves_on_the_eager_path_loudly(broken_flex, caplog):
    loaded = random_model("tiny", "fp32", "cpu")
    with caplog.at_level(logging.WARNING, logger="serve_app.engine.engine"):
        engine = Engine(loaded, EngineConfig(**CHECKED, attention="flex", fallback="eager"))
    stats = engine.stats()
    assert stats.decode_path.startswith("slot-view, eager") and stats.decode_path.endswith(FALLBACK_SUFFIX)
    assert stats.device_check["passed"] and len(engine.device_checks) == 2 and not engine.device_checks[0]["passed"]
    assert any("serving on the fallback path" in r.message for r in caplog.records)
    reference = Engine(loaded, EngineConfig(max_batch_size=4, max_seq_len=128, attention="slot-view"))
    prompt = list(range(5, 25))
    assert greedy_ids(engine, prompt) == greedy_ids(reference, prompt)
    stop(engine)
    stop(reference)


def test_a_broken_kernel_falls_back_to_dequantize(monkeypatch):
    """The eager fallback still runs the pool's kernels; when they are what is broken, dequantize + matmul."""
    loaded = random_model("tiny", "int4", "cpu")
    real = QuantizedLinear._kernel_matmul
    monkeypatch.setattr(QuantizedLinear, "_kernel_matmul", lambda self, x: real(self, x) * 1.5)
    engine = Engine(loaded, EngineConfig(**CHECKED, fallback="eager"))
    assert [c["passed"] for c in engine.device_checks] == [False, False, True]
    assert list(engine.stats().kernels) == ["dequant"] and engine.stats().decode_path.endswith(FALLBACK_SUFFIX)
    stop(engine)


def test_a_broken_kernel_without_a_fallback_refuses_to_start(monkeypatch):
    loaded = random_model("tiny", "int4", "cpu")  # the load-time kernel check passes; the kernel breaks afterwards
    real = QuantizedLinear._kernel_matmul
    monkeypatch.setattr(QuantizedLinear, "_kernel_matmul", lambda self, x: real(self, x) * 1.5)
    with pytest.raises(DeviceCheckFailed, match="int4pack_mm_cpu"):
        Engine(loaded, EngineConfig(**CHECKED))


def test_non_finite_logits_fail_the_check(monkeypatch):
    runner = ModelRunner(random_model("tiny", "fp32", "cpu"), 2, 64, attention="slot-view", graphs=False)
    real = runner.step_logits
    monkeypatch.setattr(runner, "step_logits", lambda work: (lambda r: (r[0], r[1] * float("nan")))(real(work)))
    result = run_device_check(runner)
    assert not result.passed and "non-finite" in result.detail


def test_the_fallback_metric_follows_the_decode_path():
    from serve_app.server.metrics import PoolMetrics

    from tests.server.test_metrics import _stats

    metrics = PoolMetrics("m")
    values = []
    metrics.decode_fallback.set = lambda value, tags=None: values.append(value)
    stats = _stats()
    stats.decode_path = "slot-view, eager, dense"
    metrics.record_engine(stats)
    stats.decode_path += FALLBACK_SUFFIX
    metrics.record_engine(stats)
    assert values == [0.0, 1.0]
