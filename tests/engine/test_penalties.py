"""repetition_penalty, presence_penalty and frequency_penalty in the batched sampling step, against independent
references: transformers' RepetitionPenaltyLogitsProcessor, and OpenAI's documented formula
(logit -= count * frequency_penalty + (count > 0) * presence_penalty, over the generated tokens), step by step over
the no-cache reference forward."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.engine.sampling import Penalties, SamplingTensors, TokenHistory, sample

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def openai_penalties(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    out = logits.clone()
    for token in set(generated):
        out[token] -= generated.count(token) * frequency + presence
    return out


def test_penalties_equal_transformers_and_openai_on_the_same_logits():
    vocab, generator = 50, torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator) * 3
    prompts = [[1, 2, 3, 7], [4, 4, 9], [10]]
    outputs = [[7, 7, 8], [], [11, 10, 11, 11]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5)]
    history = TokenHistory(4, vocab, "cpu")
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        history.load(row, prompt, output)
    got = Penalties.build(params, [0, 1, 2], history, "cpu").apply(logits)
    for row, p in enumerate(params):
        expected = logits[row : row + 1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor([prompts[row] + outputs[row]])
            expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, expected.clone())
        expected = openai_penalties(expected[0], outputs[row], p.presence_penalty, p.frequency_penalty)
        torch.testing.assert_close(got[row], expected)


def test_rows_without_penalties_read_the_spare_row_and_are_unchanged():
    history = TokenHistory(2, 20, "cpu")
    history.load(0, [1, 2], [3, 3])
    history.record([0, 0], [3, 5])
    assert history.counts[0, 3] == 3 and history.counts[0, 5] == 1 and history.counts[history.spare].sum() == 0
    logits = torch.randn(2, 20)
    out = Penalties.build([SamplingParams(frequency_penalty=1.0), SamplingParams()], [0, None], history, "cpu")
    torch.testing.assert_close(out.apply(logits)[1], logits[1], rtol=0, atol=0)
    settings = SamplingTensors.build([SamplingParams(), SamplingParams()], [1, 2], 20, "cpu")
    settings.penalties = out
    assert sample(logits, settings, torch.tensor([5, 5]))[1] == logits[1].argmax()


def reference_tokens(loaded, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """Greedy, recomputing the whole sequence each token, the penalties applied as the references say (after
    params.logit_bias, as vLLM orders them)."""
    tokens, generated = list(prompt), []
    for _ in range(n):
        logits = loaded.model(torch.tensor([tokens]), torch.arange(len(tokens))[None], last_only=True)
        logits = logits[0, -1:].clone()
        for token, bias in params.logit_bias:
            logits[0, token] += bias
        if params.repetition_penalty != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([tokens]), logits)
        logits = openai_penalties(logits[0], generated, params.presence_penalty, params.frequency_penalty)
        token = int(logits.argmax())
        tokens.append(token)
        generated.append(token)
    return generated


def random_prompt(length: int, seed: int) -> list[int]:
    # Few distinct tokens, so that the unpenalized model repeats itself and the penalties have work to do.
    return torch.randint(3, 40, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def collect(engine, prompt, params):
    return [t async for d in engine.generate(prompt, params) for t in d.token_ids]


def test_the_engine_applies_each_requests_penalties_and_nothing_else(tiny_fp32):
    base = {"max_new_tokens": 12, "ignore_eos": True}
    settings = [SamplingParams(**base, repetition_penalty=1.5), SamplingParams(**base),
                SamplingParams(**base, presence_penalty=1.0, frequency_penalty=2.0),
                SamplingParams(**base, repetition_penalty=0.7, frequency_penalty=0.5)]
    prompts = [random_prompt(9 + i, i) for i in range(4)]
    engine = Engine(tiny_fp32, EngineConfig(max_batch_size=4, max_seq_len=128, block_size=8))

    async def main():
        return await asyncio.gather(*(collect(engine, p, s) for p, s in zip(prompts, settings)))

    results = asyncio.run(main())
    asyncio.run(engine.shutdown())
    for tokens, prompt, params in zip(results, prompts, settings):
        assert tokens == reference_tokens(tiny_fp32, prompt, 12, params)
    plain = [reference_tokens(tiny_fp32, p, 12, settings[1]) for p in prompts]
    assert sum(tokens != unpenalized for tokens, unpenalized in zip(results, plain)) >= 2  # they do change things


def test_penalties_survive_a_preemption(tiny_fp32):
    """Sequences that are preempted reload their counts from their tokens when they resume."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.2)
    budget = tiny_fp32.config.kv_bytes_per_token(torch.float32) * 8 * 18
    engine = Engine(tiny_fp32, EngineConfig(max_batch_size=4, max_seq_len=128, block_size=8, kv_cache_bytes=budget,
                                            prefix_caching=False))
    prompts = [random_prompt(10, 50 + i) for i in range(4)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    results = asyncio.run(main())
    assert engine.stats().preemptions > 0
    asyncio.run(engine.shutdown())
    for tokens, prompt in zip(results, prompts):
        assert tokens == reference_tokens(tiny_fp32, prompt, 40, params)


def test_the_decode_graph_applies_penalties_as_the_eager_step(tiny_fp32):
    graphed = ModelRunner(tiny_fp32, 3, 64, attention="flex", graphs=True, capture=lambda fn: fn)
    eager = ModelRunner(tiny_fp32, 3, 64, attention="slot-view", graphs=False)
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(),
              SamplingParams(temperature=0.9, presence_penalty=0.5, frequency_penalty=1.0)]
    rows = [0, None, 2]
    prompts = [random_prompt(6 + i, 70 + i) for i in range(3)]
    for runner in (graphed, eager):
        for row, prompt in zip(rows, prompts):
            if row is not None:
                runner.load_history(row, prompt, [])
    work = [Work(p, i, 0, q, seed=i, penalty_row=r) for i, (p, q, r) in enumerate(zip(prompts, params, rows))]
    last = graphed.step(work)
    assert last == eager.step(work)
    positions = [len(p) for p in prompts]
    for step in range(10):
        work = [Work([last[i]], i, positions[i], params[i], seed=i, generated=step + 1, penalty_row=rows[i])
                for i in range(3)]
        got = graphed.step(work)  # decode-only: the replayed graph with its static penalty buffers
        assert got == eager.step(work), step
        last, positions = got, [p + 1 for p in positions]
    torch.testing.assert_close(graphed.history.counts, eager.history.counts, rtol=0, atol=0)


def test_penalty_bounds():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    assert not SamplingParams().penalized and SamplingParams(frequency_penalty=-1.0).penalized
    assert dataclasses.replace(SamplingParams(), repetition_penalty=1.1).penalized
