"""The compiled decode step (`engine.compile_decode`: forward + sampling per bucket, compiled, then captured) against
the eager step, on CPU with the tiny preset. Inductor compiles the same graph dynamo traces for CUDA (its CPU code
instead of Triton), so this checks tracing (fullgraph: no breaks, static shapes per bucket), the flex call inside
the compiled region and the sampling code under compile; the capture is injected as in test_graphs."""

from __future__ import annotations

import pytest
import torch

from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.model.demo import random_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def tiny():
    # The plain nn.Linear path: the packed CPU linears are a CPU-serving choice, not what the GPU step compiles.
    return random_model("tiny", "fp32", "cpu", pack_cpu_linears=False)


def _decode(runner: ModelRunner, prompts, params, steps: int):
    """Prefill every prompt, then `steps` decode steps over all slots teacher-forced with the same ids in every
    runner; returns (chosen ids per step, logits per step)."""
    runner.step([Work(p, slot, 0, params[slot], seed=slot) for slot, p in enumerate(prompts)])
    ids, logits = [], []
    for step in range(steps):
        work = [Work([7 + 11 * step + slot], slot, len(p) + step, params[slot], seed=slot)
                for slot, p in enumerate(prompts)]
        chosen, step_logits = runner.step_logits(work)
        ids.append(chosen)
        logits.append(step_logits[:, :runner.loaded.config.padded_vocab_size].clone())
    return ids, logits


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_decode_step_equals_the_eager_step(tiny, backend):
    prompts = [[5, 9, 13, 17], [21, 25, 29], [33, 37, 41, 45, 49]]
    greedy = [SamplingParams()] * 3
    eager = ModelRunner(tiny, 3, 128, attention="flex", graphs=False, compile_flex=False)
    compiled = ModelRunner(tiny, 3, 128, attention="flex", graphs=True, capture=lambda fn: fn, compile_decode=True,
                           compile_flex=True, compile_backend=backend)
    assert "compiled step" in compiled.path
    report = compiled.warmup()
    assert report["graphs"] > 0
    expected_ids, expected_logits = _decode(eager, prompts, greedy, 3)
    got_ids, got_logits = _decode(compiled, prompts, greedy, 3)
    assert got_ids == expected_ids
    for got, expected in zip(got_logits, expected_logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compiled_sampling_draws_what_the_eager_step_draws(tiny):
    prompts = [[5, 9, 13, 17], [21, 25, 29]]
    params = [SamplingParams(temperature=0.8, top_p=0.7), SamplingParams(temperature=1.1, top_k=5)]
    eager = ModelRunner(tiny, 2, 128, attention="flex", graphs=True, capture=lambda fn: fn, compile_flex=False)
    compiled = ModelRunner(tiny, 2, 128, attention="flex", graphs=True, capture=lambda fn: fn, compile_decode=True,
                           compile_flex=True, compile_backend="aot_eager")
    assert _decode(compiled, prompts, params, 3)[0] == _decode(eager, prompts, params, 3)[0]
