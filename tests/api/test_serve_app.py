"""The running application, driven as clients drive it: the official openai client, raw SSE, api.py-style JSON.

One Ray + Serve start for the module: configs/local.yaml (three pools) deployed on the tiny demo checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.serving import engine_stats, wait_for

pytestmark = pytest.mark.slow
POOLS = ["chatglm2-6b", "chatglm2-6b-int8", "chatglm2-6b-int4"]
GREEDY = {"temperature": 0, "max_tokens": 12}


def messages(text="你好"):
    return [{"role": "user", "content": text}]


def test_models_lists_the_pools(client):
    # (then configs/local.yaml's demo adapters, each with its parent pool: tests/api/test_adapters_served.py)
    assert [m.id for m in client.models.list().data if getattr(m, "parent", None) is None] == POOLS


@pytest.mark.parametrize("pool", POOLS)
def test_openai_stream_equals_non_stream(client, pool):
    full = client.chat.completions.create(model=pool, messages=messages(), **GREEDY)
    assert full.model == pool and full.object == "chat.completion"
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=pool, messages=messages(), stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_stream_carries_at_most_one_chunk_per_coalescing_window_with_the_same_text(client):
    """The default coalescing (50 ms) as a client sees it: a pool's messages of one stream are at least a window
    apart (the first and the final one aside), so a reply of T seconds comes in at most 2 + T / 0.05 text chunks
    whatever the machine's speed, and the chunks concatenate to the non-streamed answer. The tiny demo makes 64 tokens
    in a fraction of a second here: ~4 chunks, against ~25 with a 5 ms window and ~42 with none."""
    body = {"model": POOLS[2], "prompt": "hello", "max_tokens": 64, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**body)
    start = time.monotonic()
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    elapsed = time.monotonic() - start
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 64
    assert len(texts) <= 2 + elapsed / 0.05, (len(texts), elapsed)


def test_stop_strings_and_seed(client):
    full = client.chat.completions.create(model=POOLS[0], messages=messages("hello"), temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model=POOLS[0], messages=messages("hello"), temperature=0, max_tokens=24,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content.rstrip() == text[: text.index(stop)].rstrip()

    def sampled(seed):
        return client.chat.completions.create(model=POOLS[2], messages=messages(), temperature=1.0, top_p=0.9,
                                              seed=seed, max_tokens=16).choices[0].message.content

    assert sampled(7) == sampled(7)


def test_system_message_changes_the_prompt(client):
    plain = client.chat.completions.create(model=POOLS[0], messages=messages(), **GREEDY)
    with_system = client.chat.completions.create(
        model=POOLS[0], messages=[{"role": "system", "content": "Answer in English."}, *messages()], **GREEDY)
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens


def test_completions_endpoint(client):
    out = client.completions.create(model=POOLS[1], prompt="[Round 1]\n\n问：你好\n\n答：", max_tokens=8,
                                    temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8


def tokenize(base_url, **body) -> dict:
    reply = httpx.post(f"{base_url}/tokenize", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_completions_take_token_ids(client, base_url):
    """A prompt given as token ids is the model's whole input: the same ids as the text give the same answer."""
    text = "[Round 1]\n\n问：你好\n\n答："
    ids = tokenize(base_url, model=POOLS[1], prompt=text)["tokens"]
    by_text = client.completions.create(model=POOLS[1], prompt=text, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=POOLS[1], prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    chunks = list(client.completions.create(model=POOLS[1], prompt=[ids], max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_text.choices[0].text
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as outside:
        client.completions.create(model=POOLS[1], prompt=[*ids, 10**6], max_tokens=2)
    assert outside.value.body["code"] == "invalid_request" and "vocabulary" in outside.value.body["message"]
    with pytest.raises(openai.BadRequestError) as negative:
        client.completions.create(model=POOLS[1], prompt=[-1], max_tokens=2)
    assert negative.value.body["param"] == "prompt.0"


def test_tokenize_counts_what_usage_counts_and_detokenize_inverts_it(client, base_url):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model=POOLS[0], messages=conversation, **GREEDY)
    counted = tokenize(base_url, model=POOLS[0], messages=conversation)
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens
    assert counted["max_model_len"] == 2048  # configs/local.yaml's engine.max_seq_len
    bare = tokenize(base_url, prompt="hello world", add_special_tokens=False)
    full = tokenize(base_url, prompt="hello world")
    assert full["tokens"][2:] == bare["tokens"] and full["count"] == bare["count"] + 2  # [gMASK] sop first
    back = httpx.post(f"{base_url}/detokenize", json={"model": POOLS[2], "tokens": full["tokens"]}, timeout=60)
    assert back.status_code == 200 and back.json() == {"prompt": "hello world"}
    unknown = httpx.post(f"{base_url}/tokenize", json={"model": "gpt-4", "prompt": "x"}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    outside = httpx.post(f"{base_url}/detokenize", json={"tokens": [10**6]}, timeout=60)
    assert outside.status_code == 400 and outside.json()["error"]["code"] == "invalid_request"


def test_openai_routes_refuse_what_the_context_cannot_hold_and_api_py_caps_it(client, base_url):
    """OpenAI: prompt + max_tokens past the context is a 400 context_length_exceeded, before any token, streaming or
    not. The official api.py keeps its meaning: max_length counts prompt + reply and is capped by the context."""
    def chat_tokens(repeats: int) -> int:
        return tokenize(base_url, messages=messages("问题 " * repeats))["count"]

    per_repeat = chat_tokens(101) - chat_tokens(100)
    repeats = 100 + (2044 - chat_tokens(100)) // per_repeat  # a prompt a few tokens short of the 2048 context
    prompt_tokens = chat_tokens(repeats)
    assert 2048 - 64 < prompt_tokens < 2048
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=POOLS[0], messages=messages("问题 " * repeats), max_tokens=64,
                                           temperature=0, stream=stream)
        assert refused.value.body["code"] == "context_length_exceeded"
        assert f"{prompt_tokens} in the prompt, 64 in the completion" in refused.value.body["message"]
    capped = httpx.post(f"{base_url}/", json={"prompt": "问题 " * repeats, "max_length": 4096, "temperature": 0},
                        timeout=120)
    assert capped.status_code == 200, capped.text
    fits = client.chat.completions.create(model=POOLS[0], messages=messages("问题 " * repeats),
                                          max_tokens=2048 - prompt_tokens, temperature=0)
    assert fits.usage.prompt_tokens == prompt_tokens


def test_official_api_py(base_url):
    body = {"prompt": "你好", "history": [["hi", "hello"]], "max_length": 64, "top_p": 0.7, "temperature": 0.95}
    reply = httpx.post(f"{base_url}/", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert set(data) == {"response", "history", "status", "time"} and data["status"] == 200
    assert data["history"] == [["hi", "hello"], ["你好", data["response"]]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", data["time"])
    assert reply.headers["x-chatglm2-model"] == POOLS[0]


def test_seed_streaming_api(base_url):
    body = {"query": "你好", "history": [], "max_length": 40, "temperature": 0}
    chat = httpx.post(f"{base_url}/chat", json=body, timeout=60).json()
    assert chat["success"] is True and chat["history"] == [["你好", chat["response"]]]
    events, deltas = [], []
    with httpx.stream("POST", f"{base_url}/stream", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append(event)
                deltas.append(json.loads(line[6:]))
    assert set(events) == {"delta"}
    final = deltas[-1]
    assert final["finished"] is True and final["delta"] == "[EOS]" and final["query"] == "你好"
    assert "".join(d["delta"] for d in deltas[:-1]) == final["response"] == chat["response"]
    assert all(not d["finished"] for d in deltas[:-1])


def test_concurrent_streams_to_all_pools(base_url, client):
    expected = {pool: client.chat.completions.create(model=pool, messages=messages(f"q{i}"), **GREEDY)
                .choices[0].message.content for i, pool in enumerate(POOLS)}

    async def one(aclient, i, pool):
        stream = await aclient.chat.completions.create(model=pool, messages=messages(f"q{i}"), stream=True, **GREEDY)
        return pool, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        jobs = [one(aclient, i, pool) for _ in range(3) for i, pool in enumerate(POOLS)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len(results) == 9
    for pool, text in results:
        assert text == expected[pool]


def test_auto_routing_reports_the_pool(client):
    out = client.chat.completions.create(model="auto", messages=messages(), **GREEDY)
    assert out.model in POOLS


def test_errors_are_openai_style(client, base_url):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=messages())
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=POOLS[0], messages=messages("很长的问题 " * 3000), max_tokens=4)
    assert too_long.value.body["code"] in ("context_length_exceeded",)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=POOLS[0], messages=messages(), temperature=5)
    bad_json = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    bad_history = httpx.post(f"{base_url}/", json={"prompt": "x", "history": [["only one"]]}, timeout=30)
    assert bad_history.status_code == 400 and "history" in bad_history.json()["error"]["message"]
    assistant_last = httpx.post(f"{base_url}/v1/chat/completions", timeout=30,
                                json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert assistant_last.status_code == 400


def test_client_disconnect_frees_the_engine(base_url):

    body = {"model": POOLS[2], "messages": messages(), "stream": True, "temperature": 0, "max_tokens": 1500}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for count, _ in enumerate(response.iter_lines()):
            if count >= 6:
                break  # leave mid-stream
    def idle():
        stats = engine_stats(POOLS[2])
        return stats.engine.running == 0 and stats.engine.waiting == 0 and stats.engine.kv_tokens_in_use == 0

    wait_for(idle, 30, "the engine to drop the abandoned stream")


def test_http_load_tester(base_url, tmp_path):
    """`bench --url`: every pool and level measured, eos ignored so each request yields max_new_tokens, a plot."""
    import subprocess
    import sys

    plot = tmp_path / "sweep.png"
    run = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "bench", "--url", base_url, "--models", f"{POOLS[0]},{POOLS[2]}",
         "--concurrency", "1,3", "--requests", "3", "--prompt-tokens", "8", "--max-new-tokens", "6",
         "--plot", str(plot), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])["results"]
    assert [(r["model"], r["concurrency"]) for r in results] == [(POOLS[0], 1), (POOLS[0], 3), (POOLS[2], 1),
                                                                 (POOLS[2], 3)]
    assert all(r["requests"] == 3 and r["output_tokens"] == 18 and r["ttft_p50_s"] > 0 for r in results)
    # The prompts sent were exactly --prompt-tokens long, by the server's own count.
    assert all(r["prompt_tokens_sent"] == r["prompt_tokens_usage"] == 8 for r in results)
    assert "prompt tokens sent 8, usage 8; output tokens asked 6, usage 6" in run.stdout
    assert "3/3 requests" in run.stderr  # the progress display
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compares_in_process_with_served(base_url, tiny_checkpoint):
    """`bench --checkpoint --url`: the same requests both ways, alternating rounds, and the ratio."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "bench", "--checkpoint", str(tiny_checkpoint), "--url", base_url,
         "--models", POOLS[0], "--concurrency", "1,2", "--requests", "2", "--prompt-tokens", "8",
         "--max-new-tokens", "4", "--rounds", "2", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert [(r["round"], r["concurrency"], r["mode"]) for r in result["rows"]] == [
        (1, 1, "engine"), (1, 1, "http"), (1, 2, "engine"), (1, 2, "http"),
        (2, 1, "http"), (2, 1, "engine"), (2, 2, "http"), (2, 2, "engine")]
    assert all(r["output_tokens"] == 8 for r in result["rows"])
    assert [(r["round"], r["concurrency"]) for r in result["ratios"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["throughput_ratio"] > 0 for r in result["ratios"])
    assert "median over rounds, concurrency 2" in run.stdout


def test_soak_script_runs_clean(base_url):
    """scripts/soak.py as docs/soak.md runs it, for 15 s: every request (bad ones and abandoned streams included)
    accounted for as expected, memory sampled, exit code 0."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    run = subprocess.run([sys.executable, str(script), "--url", base_url, "--minutes", "0.25", "--concurrency", "2",
                          "--sample-s", "3"], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "unexpected: 0" in run.stdout and "result: PASS" in run.stdout
    assert re.search(r"^\| chatglm2-6b-int4 \| [\d.]+ \|", run.stdout, re.MULTILINE)  # a memory row per pool


@pytest.mark.parametrize("pool", POOLS)
def test_top_k_1_and_min_p_1_sample_the_greedy_answer(client, pool):
    """vLLM's top_k extension through the openai client: with top_k 1 only the most likely token is left, so any seed
    at temperature 1 gives the greedy answer (on chat and on completions); top_k 3 gives other answers for some
    seed."""
    greedy = client.chat.completions.create(model=pool, messages=messages(), **GREEDY).choices[0].message.content
    sampled = {client.chat.completions.create(model=pool, messages=messages(), temperature=1.0, max_tokens=12,
                                              seed=seed, extra_body={"top_k": 1}).choices[0].message.content
               for seed in range(3)}
    assert sampled == {greedy}
    wider = {client.chat.completions.create(model=pool, messages=messages(), temperature=1.0, max_tokens=12,
                                            seed=seed, extra_body={"top_k": 3}).choices[0].message.content
             for seed in range(4)}
    assert wider - {greedy}
    completion = client.completions.create(model=pool, prompt="hello", **GREEDY).choices[0].text
    assert client.completions.create(model=pool, prompt="hello", temperature=1.0, max_tokens=12, seed=7,
                                     extra_body={"top_k": 1}).choices[0].text == completion
    # min_p 1 keeps only the most likely token too
    assert client.chat.completions.create(model=pool, messages=messages(), temperature=1.0, max_tokens=12, seed=5,
                                          extra_body={"min_p": 1.0}).choices[0].message.content == greedy


def test_logit_bias_stop_token_ids_and_min_tokens_through_the_openai_client(client, base_url):
    """A +100 bias makes greedy decoding repeat one token; naming that token in stop_token_ids ends the reply at it
    (finish "stop"); min_tokens 3 bans it for the first three tokens, so the reply ends at the fourth; a bias on an
    id past the vocabulary is a 400."""
    pool, token = POOLS[0], 200
    text = httpx.post(f"{base_url}/detokenize", json={"model": pool, "tokens": [token] * 12}, timeout=60).json()
    forced = client.chat.completions.create(model=pool, messages=messages(), **GREEDY,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == text["prompt"].strip()
    body = {"model": pool, "prompt": "hello", "temperature": 0, "max_tokens": 12}
    stopped = client.completions.create(**body, logit_bias={str(token): 100}, extra_body={"stop_token_ids": [token]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    later = client.completions.create(**body, logit_bias={str(token): 100},
                                      extra_body={"stop_token_ids": [token], "min_tokens": 3})
    assert later.choices[0].finish_reason == "stop" and later.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**body, logit_bias={"999999": 5})
    assert refused.value.body["code"] == "invalid_request" and "999999" in refused.value.body["message"]


def test_penalties_through_the_openai_client_equal_the_references(client, base_url, tiny_checkpoint):
    """frequency_penalty and presence_penalty (OpenAI's fields) and repetition_penalty (vLLM's extension, through
    extra_body) on a token-id completion: the reply is what greedy decoding gives with transformers' repetition
    penalty and OpenAI's formula applied at each step of the no-cache reference forward, in this process. A +20
    bias on one token makes the unpenalized reply a loop; the penalties break it."""
    from serve_app.engine.params import SamplingParams
    from serve_app.model.loader import load_model
    from tests.engine.test_penalties import reference_tokens

    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    prompt = [323, 261, 334, 334, 327]  # the tiny checkpoint's ids of "hello hello", as the model's whole input
    fields = {"frequency_penalty": 2.0, "presence_penalty": 2.0, "repetition_penalty": 1.5}
    body = {"model": POOLS[0], "prompt": prompt, "temperature": 0, "max_tokens": 12, "logit_bias": {"200": 20}}

    def text_of(params: SamplingParams) -> str:
        ids = reference_tokens(loaded, prompt, 12, params)
        reply = httpx.post(f"{base_url}/detokenize", json={"model": POOLS[0], "tokens": ids}, timeout=60)
        return reply.json()["prompt"]

    got = client.completions.create(**body, frequency_penalty=fields["frequency_penalty"],
                                    presence_penalty=fields["presence_penalty"],
                                    extra_body={"repetition_penalty": fields["repetition_penalty"],
                                                "ignore_eos": True})
    penalized = text_of(SamplingParams(logit_bias=((200, 20.0),), **fields))
    assert got.choices[0].text == penalized
    plain = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert plain.choices[0].text == text_of(SamplingParams(logit_bias=((200, 20.0),))) != penalized
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=POOLS[0], prompt=prompt, max_tokens=2, frequency_penalty=3.0)
    assert refused.value.body["param"] == "frequency_penalty"
    # The official api.py route and the explorer's /chat take repetition_penalty too, within the same bounds.
    for route, body in (("/", {"prompt": "你好"}), ("/chat", {"query": "你好"})):
        reply = httpx.post(f"{base_url}{route}", json={**body, "max_length": 64, "repetition_penalty": 1.2,
                                                       "temperature": 0.01}, timeout=60)
        assert reply.status_code == 200, reply.text
        bad = httpx.post(f"{base_url}{route}", json={**body, "repetition_penalty": 0}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "repetition_penalty", bad.text
