"""The packed forward: several sequences' prefill chunks and decode tokens in one call give what each gives alone,
with either attention backend."""

from __future__ import annotations

import pytest
import torch

from serve_app.model.attention import FlexSlotAttention, GatherAttention, SlotViewAttention, Span, plan_step
from serve_app.model.chatglm2 import KVCache


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(loaded, tokens: list[int]) -> torch.Tensor:
    """Every position's logits from the no-cache reference path: [T, vocab]."""
    return loaded.model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", [SlotViewAttention(), FlexSlotAttention(), GatherAttention()],
                         ids=["slot-view", "flex", "gather"])
def test_packed_step_equals_each_sequence_alone(tiny_fp32, backend):
    model, config = tiny_fp32.model, tiny_fp32.config
    a, b, c = ids(20, 1), ids(9, 2), ids(13, 3)
    cache = KVCache(config, num_blocks=4, block_size=128, dtype=torch.float32, device="cpu")
    # Step 1: a's first 12 tokens (chunk), b's whole prompt but its last token, in one call.
    first = [Span(0, 12, 3, 0), Span(12, 8, 1, 0)]
    model.forward_packed(plan_step(first, a[:12] + b[:8], 128, "cpu"), cache, backend)
    # Step 2: a's last 8 (a chunk at an offset), b's decode token, c's whole prompt: 3 spans, 8 + 1 + 13 tokens.
    second = [Span(0, 8, 3, 12), Span(8, 1, 1, 8), Span(9, 13, 0, 0)]
    plan = plan_step(second, a[12:] + b[8:] + c, 128, "cpu", logit_rows=list(range(22)))
    got = model.forward_packed(plan, cache, backend)  # [22, vocab]
    expected = torch.cat([full_logits(tiny_fp32, a)[12:], full_logits(tiny_fp32, b)[8:], full_logits(tiny_fp32, c)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Step 3: decode only (the flex backend's own path): one token each for a, b and c.
    nxt = [5, 6, 7]
    third = [Span(0, 1, 3, 20), Span(1, 1, 1, 9), Span(2, 1, 0, 13)]
    got = model.forward_packed(plan_step(third, nxt, 128, "cpu"), cache, backend)
    expected = torch.stack([full_logits(tiny_fp32, seq + [t])[-1] for seq, t in zip((a, b, c), nxt)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_step_writes_only_its_own_slots(tiny_fp32):
    cache = KVCache(tiny_fp32.config, num_blocks=3, block_size=32, dtype=torch.float32, device="cpu", scratch=True)
    tiny_fp32.model.forward_packed(plan_step([Span(0, 5, 1, 0)], ids(5, 4), 32, "cpu"), cache)
    touched = torch.stack(cache.k).abs().sum(dim=(0, 1, 3, 4)) > 0  # per slot
    assert touched.tolist() == [False, True, False, False] and cache.scratch_block == 3


def test_plan_reads_token_positions_from_spans():
    plan = plan_step([Span(0, 3, 2, 5), Span(3, 1, 0, 9)], [7, 8, 9, 10], 16, "cpu")
    assert plan.positions.tolist() == [5, 6, 7, 9]
    assert plan.write_index.tolist() == [2 * 16 + 5, 2 * 16 + 6, 2 * 16 + 7, 9]
    assert plan.logit_rows.tolist() == [2, 3]
    assert (plan.decode_rows.tolist(), plan.decode_tables.tolist(), plan.decode_lens.tolist()) == ([3], [[0]], [10])
    decode = plan_step([Span(0, 1, 2, 5), Span(1, 1, 0, 9)], [1, 2], 16, "cpu")
    assert decode.decode_tables.tolist() == [[2], [0]] and decode.decode_lens.tolist() == [6, 10]
    assert decode.decode_rows is None  # all rows
    prefill = plan_step([Span(0, 2, 1, 0)], [1, 2], 16, "cpu")
    assert prefill.decode_tables is None and prefill.decode_rows is None
    with pytest.raises(ValueError):
        plan_step([Span(0, 2, 0, 0)], [1], 16, "cpu")


def test_random_model_equals_the_demo_checkpoint(tiny_fp32):
    """Random weights made in memory (the benchmarks' --random-weights) are the demo checkpoint's weights."""
    from serve_app.model.demo import random_model

    loaded = random_model("tiny", "fp32", "cpu")
    assert loaded.config.padded_vocab_size == tiny_fp32.config.padded_vocab_size
    tokens = torch.tensor([ids(12, 5)])
    torch.testing.assert_close(loaded.model(tokens, torch.arange(12)[None]),
                               tiny_fp32.model(tokens, torch.arange(12)[None]), rtol=0, atol=0)
    assert random_model("tiny", "int8", "cpu").precision == "int8"


@pytest.mark.slow
def test_compiled_flex_decode_equals_eager():
    """The GPU path compiles flex_decode as a whole (block mask included); dynamo must trace it. Compiling for CPU
    takes a minute or two here, hence slow."""
    from serve_app.model.attention import flex_decode

    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 4 * 256, 32, generator=generator)  # [1, G, slots * slot_len, D] each
    slots, lens = torch.tensor([2, 0, 3]), torch.tensor([5, 140, 256])
    q = torch.randn(3, 8, 1, 32, generator=generator)
    compiled = torch.compile(flex_decode)(q, keys, values, slots, lens, 256)
    torch.testing.assert_close(compiled, flex_decode(q, keys, values, slots, lens, 256), rtol=1e-4, atol=1e-4)
