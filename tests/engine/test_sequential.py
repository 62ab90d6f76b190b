"""Generation properties and the `generate` command as a user runs it."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from serve_app.engine.errors import ContextLengthExceeded
from serve_app.engine.params import SamplingParams
from serve_app.engine.sampling import NonFiniteLogitsError, choose_token, nucleus_drop, request_seed
from serve_app.engine.sequential import generate
from serve_app.model.checkpoint import iter_tensors, read_config, write_checkpoint
from tests.serving import run_cli


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer):
    return tiny_tokenizer.build_chat_input("你好，请介绍一下你自己。", [])


def test_greedy_is_deterministic(tiny_fp32, prompt):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert generate(tiny_fp32, prompt, params).token_ids == generate(tiny_fp32, prompt, params).token_ids


def test_seed_reproduces_and_differs(tiny_fp32, prompt):
    def run(seed):
        return generate(tiny_fp32, prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=seed,
                                                           max_new_tokens=16, ignore_eos=True)).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_limits_are_respected(tiny_fp32, prompt):
    out = generate(tiny_fp32, prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    out = generate(tiny_fp32, prompt, SamplingParams(max_length=len(prompt) + 3, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"  # max_length counts the prompt too


def test_prompt_past_the_limit_is_rejected(tiny_fp32, prompt):
    with pytest.raises(ContextLengthExceeded, match="max_length"):
        generate(tiny_fp32, prompt, SamplingParams(max_length=len(prompt)))
    with pytest.raises(ContextLengthExceeded, match="context window"):
        generate(tiny_fp32, [5] * 2048, SamplingParams())


def test_eos_stops_generation(tmp_path, tiny_checkpoint, prompt):
    """A checkpoint whose eos is the 4th greedy token stops right there, with the eos included."""
    from serve_app.model.loader import load_model

    free = generate(load_model(tiny_checkpoint, "fp32", "cpu"), prompt, SamplingParams(max_new_tokens=8,
                                                                                      ignore_eos=True))
    eos = free.token_ids[3]
    assert eos not in free.token_ids[:3]
    config = read_config(tiny_checkpoint)
    from dataclasses import replace

    out = write_checkpoint(tmp_path / "eos", replace(config, eos_token_id=eos), iter_tensors(tiny_checkpoint),
                           tokenizer_model=tiny_checkpoint / "tokenizer.model")
    stopped = generate(load_model(out, "fp32", "cpu"), prompt, SamplingParams(max_new_tokens=8))
    assert stopped.token_ids == free.token_ids[:4] and stopped.finish_reason == "stop"


def test_calls_reuse_one_kv_cache_and_give_the_same_tokens(tiny_fp32, prompt, monkeypatch):
    """The one-slot runner is kept across calls: a second call allocates nothing, tokens are those of a fresh cache;
    a call that outgrows it allocates once more; a call made while another runs (from its callback) gets its own."""
    import dataclasses

    from serve_app.engine import runner as runner_module
    from serve_app.engine import sequential

    allocated = []

    class CountingCache(runner_module.KVCache):
        def __init__(self, config, num_slots, slot_len, **kwargs):
            allocated.append(slot_len)
            super().__init__(config, num_slots, slot_len, **kwargs)

    monkeypatch.setattr(runner_module, "KVCache", CountingCache)
    loaded = dataclasses.replace(tiny_fp32)  # another LoadedModel: nothing kept for it yet
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=12, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = generate(loaded, prompt, sampled).token_ids
    assert generate(loaded, prompt, sampled).token_ids == first
    short = generate(loaded, prompt[:5], greedy).token_ids
    assert allocated == [len(prompt) + 12]
    sequential.release()
    assert generate(loaded, prompt, sampled).token_ids == first  # a fresh cache: the same tokens
    assert generate(loaded, prompt, dataclasses.replace(sampled, max_new_tokens=30)).token_ids[:12] == first
    assert len(allocated) == 3 and allocated[-1] >= len(prompt) + 30

    inner = []
    outer = generate(loaded, prompt, sampled, on_token=lambda _: inner.append(generate(loaded, prompt[:5], greedy)))
    assert outer.token_ids == first and [out.token_ids for out in inner] == [short] * 12
    assert len(allocated) == 4  # the inner calls' own runner, once


def test_nan_logits_fail_clearly(tiny_checkpoint, prompt):
    from serve_app.model.loader import load_model

    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    loaded.model.transformer.encoder.final_layernorm.weight.data[0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="NaN/Inf"):
        generate(loaded, prompt, SamplingParams(max_new_tokens=3))


def test_multi_turn_history_changes_the_prompt(tiny_tokenizer):
    first = tiny_tokenizer.build_chat_input("hi", [])
    second = tiny_tokenizer.build_chat_input("again", [("hi", "hello")])
    assert tiny_tokenizer.decode(second).startswith("[Round 1]") and "[Round 2]" in tiny_tokenizer.decode(second)
    assert second[:2] == first[:2]


def test_top_p_and_top_k_keep_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))  # sorted, descending
    drop = nucleus_drop(logits, torch.tensor([0.7, 0.01, 1.0]), torch.tensor([4, 4, 3]))
    assert (~drop).tolist() == [[True, True, False, False], [True, False, False, False], [True, True, True, False]]


@given(logits=arrays(np.float32, st.integers(1, 64), elements=st.floats(-(2.0**100), 2.0**100, width=32)),
       temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(0.0, 1e-6)),
       top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True), st.floats(1e-45, 1e-6)),
       seed=st.one_of(st.none(), st.integers(-2**200, 2**200)))
@settings(max_examples=300, deadline=None)
def test_any_finite_logits_and_allowed_params_give_a_token(logits, temperature, top_p, seed):
    """Whatever the API lets through (temperature in [0, 2], top_p in (0, 1], any integer seed) picks a real token:
    tiny temperatures and top_p values that vanish in fp32 once turned into NaN probabilities and a 500."""
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    logits = torch.from_numpy(logits)
    token = choose_token(logits, params, request_seed(params))
    assert 0 <= token < logits.numel()
    assert logits[token] > float("-inf")
    if params.greedy or top_p < 1e-6:  # greedy, or a nucleus that holds only the most likely token
        assert logits[token] == logits.max()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0),
                                 dict(temperature=float("nan"))])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)



def test_stop_ids_are_the_stop_tokens_and_eos_unless_ignored():
    from serve_app.engine.params import stop_ids

    assert stop_ids(SamplingParams(stop_token_ids=(7, 9)), eos_token_id=2) == {2, 7, 9}
    assert stop_ids(SamplingParams(stop_token_ids=(7,), ignore_eos=True), eos_token_id=2) == {7}


def test_generate_json_command(tiny_checkpoint, tiny_fp32, tiny_tokenizer):
    history = [["你好", "你好！"]]
    run = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "今天天气怎么样？",
               "--history", json.dumps(history, ensure_ascii=False), "--max-new-tokens", "10", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "usage"}
    expected_prompt = tiny_tokenizer.build_chat_input("今天天气怎么样？", history)
    assert result["prompt_token_ids"] == expected_prompt
    direct = generate(tiny_fp32, expected_prompt, SamplingParams(max_new_tokens=10))
    assert result["token_ids"] == direct.token_ids
    assert result["text"] == tiny_tokenizer.decode(direct.token_ids).strip()
    assert result["usage"]["completion_tokens"] == len(direct.token_ids)


def test_generate_streams_text(tiny_checkpoint):
    run = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "hello", "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_generate_reports_a_bad_checkpoint(tmp_path):
    run = run_cli("generate", "--checkpoint", str(tmp_path), "--prompt", "hello")
    assert run.returncode == 2 and "config.json not found" in run.stderr
