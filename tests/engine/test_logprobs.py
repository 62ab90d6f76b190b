"""logprobs: each chosen token's log-probability and the k most likely tokens', taken from the model's raw
distribution, checked against log_softmax of the no-cache reference forward's logits at every step."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import token_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference_logprobs(loaded, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """log_softmax of the logits that chose each generated token, recomputing the whole sequence each time."""
    out, tokens = [], list(prompt)
    for token in generated:
        logits = loaded.model(torch.tensor([tokens]), torch.arange(len(tokens))[None], last_only=True)
        out.append(logits[0, -1].float().log_softmax(-1))
        tokens.append(token)
    return out


async def run(engine, prompt, params):
    deltas = [d async for d in engine.generate(prompt, params)]
    return [t for d in deltas for t in d.token_ids], [lp for d in deltas for lp in (d.logprobs or [])], deltas


@pytest.fixture
def engine(tiny_fp32):
    engine = Engine(tiny_fp32, EngineConfig(max_seq_len=128, block_size=8, max_batch_size=4))
    yield engine
    asyncio.run(engine.shutdown())


def test_logprobs_are_the_reference_log_softmax_and_top_k_agree_with_the_logits(engine, tiny_fp32):
    prompt = torch.randint(3, 500, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    params = [SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=5),
              SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=0, temperature=1.3, seed=11),
              SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=20, temperature=0.7, top_k=3, seed=5)]

    async def main():
        return await asyncio.gather(*(run(engine, prompt, p) for p in params))

    for p, (tokens, logprobs, _) in zip(params, asyncio.run(main())):
        assert len(logprobs) == len(tokens) == 9
        for token, got, expected in zip(tokens, logprobs, reference_logprobs(tiny_fp32, prompt, tokens)):
            # raw distribution: temperature and top_k change which token is chosen, not the reported numbers
            assert got.logprob == pytest.approx(float(expected[token]), abs=1e-4)
            assert len(got.top) == p.logprobs
            values, ids = expected.topk(p.logprobs) if p.logprobs else (expected[:0], expected[:0].long())
            assert [t for t, _ in got.top] == ids.tolist()
            assert [v for _, v in got.top] == pytest.approx(values.tolist(), abs=1e-4)
        if p.greedy:
            assert all(lp.top[0][0] == t for t, lp in zip(tokens, logprobs))


def test_asking_for_logprobs_leaves_greedy_tokens_unchanged_and_none_are_sent_unasked(engine):
    prompt = list(range(40, 60))

    async def main():
        return await asyncio.gather(run(engine, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)),
                                    run(engine, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                                       logprobs=3)))

    (plain, none, deltas), (asked, logprobs, _) = asyncio.run(main())
    assert plain == asked and none == [] and all(d.logprobs is None for d in deltas) and len(logprobs) == 12


def test_token_logprobs_rows_ask_for_different_k_and_failed_rows_get_none():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    out = token_logprobs(logits, [2, None, 0, 4], [5, 6, -1, 29])
    assert out[1] is None and out[2] is None  # not asked; NaN logits (-1)
    full = logits.log_softmax(-1)
    assert out[0].logprob == pytest.approx(float(full[0, 5]), abs=1e-6)
    assert [t for t, _ in out[0].top] == full[0].topk(2).indices.tolist()
    assert len(out[3].top) == 4 and out[3].logprob == pytest.approx(float(full[3, 29]), abs=1e-6)


def test_logprobs_outside_0_to_20_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_choices_of_one_prompt_submitted_together_compute_its_kv_once(engine):
    """What the pool does for n > 1: n requests of one prompt at once. The first computes the prompt; the others wait
    for its full blocks, take them from the prefix cache and copy the KV of its last, partial block, so that each
    computes only the prompt's last token. Their tokens are those each gives alone, when it computes the tail itself."""
    prompt = list(range(100, 145))  # 45 tokens: 5 full blocks of 8 and 5 tokens more
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=9 + i) for i in range(4)]

    async def main():
        together = await asyncio.gather(*(run(engine, prompt, p) for p in params))
        alone = [await run(engine, prompt, p) for p in params]
        return together, alone

    together, alone = asyncio.run(main())
    assert sorted(deltas[-1].stats.cached_prompt_tokens for _, _, deltas in together) == [0, 44, 44, 44]
    assert [deltas[-1].stats.cached_prompt_tokens for _, _, deltas in alone] == [40] * 4  # no running donor
    assert [tokens for tokens, _, _ in together] == [tokens for tokens, _, _ in alone]
    assert len({tuple(tokens) for tokens, _, _ in together}) > 1  # each its own noise
