"""`routing: auto` and a long-context pool, on the running application: a prompt that does not fit the first pool's
context is served by the pool whose context holds it, on every protocol that leaves the choice to `auto`; a prompt no
pool holds is a 400 `context_length_exceeded` naming the longest context; a request that names its pool is never moved.
One Ray + Serve start: two pools on the fake engine, "chatglm2-6b" with a 256-token context and "chatglm2-6b-32k"
(the long-context pool, here 2,048 tokens: the tiny checkpoint's seq_length).
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve_app.api.ingress import POOL_HEADER
from tests.serving import local_config, running, ws_exchange

pytestmark = pytest.mark.slow

SHORT, LONG = "chatglm2-6b", "chatglm2-6b-32k"
MIDDLE_PROMPT = "讲一个很长的故事 tell me a long story " * 40  # between the two contexts (checked below)
HUGE_PROMPT = "讲一个很长的故事 tell me a long story " * 400  # past both


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    config = local_config(tiny_checkpoint, fake_engine={"token_delay_s": 0.001, "max_reply_tokens": 8}, routing="auto",
                          pools=[{"model": SHORT, "precision": "fp32", "engine": {"max_seq_len": 256}},
                                 {"model": LONG, "precision": "fp32", "engine": {"max_seq_len": 2048}}])
    with running(config) as (url, _):
        yield url


def prompt_tokens(url: str, pool: str, text: str) -> int:
    response = httpx.post(f"{url}/tokenize", json={"model": pool, "messages": [{"role": "user", "content": text}]},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def chat(url: str, text: str, model: str = "auto") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_the_prompts_fall_where_the_test_needs_them(service):
    assert 256 < prompt_tokens(service, SHORT, MIDDLE_PROMPT) < 2000
    assert prompt_tokens(service, SHORT, HUGE_PROMPT) > 2048


def test_auto_serves_a_short_prompt_on_the_first_pool_and_a_long_one_on_the_long_context_pool(service):
    short = chat(service, "你好")
    assert short.status_code == 200 and short.headers[POOL_HEADER] == SHORT
    long = chat(service, MIDDLE_PROMPT)
    assert long.status_code == 200, long.text
    assert long.headers[POOL_HEADER] == LONG and long.json()["model"] == LONG


def test_the_other_protocols_route_a_long_prompt_the_same_way(service):
    official = httpx.post(f"{service}/", json={"prompt": MIDDLE_PROMPT, "history": [], "model": "auto",
                                              "max_length": 1024}, timeout=60)
    assert official.status_code == 200 and official.headers[POOL_HEADER] == LONG
    explorer = httpx.post(f"{service}/stream", json={"query": MIDDLE_PROMPT, "history": [], "max_length": 1024},
                          timeout=60)  # no model: the app's routing, auto
    assert explorer.status_code == 200
    assert json.loads(explorer.text.strip().splitlines()[-1].removeprefix("data:"))["finished"] is True
    messages, code = ws_exchange(service + "/ws", json.dumps({"query": MIDDLE_PROMPT, "history": [],
                                                              "max_length": 1024}))
    assert code == 1000 and "history" in messages[-1]


def test_a_prompt_no_pool_holds_is_a_400_naming_the_longest_context(service):
    response = chat(service, HUGE_PROMPT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"the longest context is 2048 tokens ({LONG})" in error["message"]


def test_a_named_pool_is_never_changed(service):
    response = chat(service, MIDDLE_PROMPT, model=SHORT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "longest context" not in error["message"]
