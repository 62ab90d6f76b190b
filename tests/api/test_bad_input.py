"""Malformed and hostile input on every protocol gets a clear 4xx at once, and hurts nobody.

One Ray + Serve start for the module (configs/local.yaml: two pools with one replica each on the tiny checkpoint,
a 256-token context and a 2000-character prompt limit, HTTP and gRPC proxies). First the HTTP API is fuzzed from its
own OpenAPI document with schemathesis (valid and invalid requests; every response must match the document, never be
a 5xx, and invalid requests must be refused); then explicit tables of bad input for HTTP, SSE, WebSocket and gRPC;
last, a check that all of it left the service as it found it: the same replicas, idle engines, no KV in use.

The fuzzing budget is FUZZ_EXAMPLES per operation and phase (default 25, with a fixed seed so CI is repeatable);
set FUZZ_EXAMPLES=500 FUZZ_RANDOM=1 for a longer, randomized run.
"""

from __future__ import annotations

import json
import os

import grpc
import httpx
import pytest

from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from tests import serving
from tests.serving import engine_stats, local_config, running

pytestmark = pytest.mark.slow
APP = "chatglm2"
POOLS = ["chatglm2-6b", "chatglm2-6b-int4"]
MAX_PROMPT_CHARS = 2000
MAX_SEQ_LEN = 256
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ_RANDOM = os.environ.get("FUZZ_RANDOM") == "1"
METADATA = (("application", APP),)


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    """(HTTP base URL, gRPC port, {pool: replica id at the start})."""
    config = local_config(tiny_checkpoint, max_prompt_chars=MAX_PROMPT_CHARS,
                          engine={"max_batch_size": 4, "max_seq_len": MAX_SEQ_LEN, "max_waiting": 16},
                          pools=[{"model": POOLS[0], "precision": "fp32"}, {"model": POOLS[1], "precision": "int4"}])
    app = config["applications"][0]
    app["deployments"] = [d for d in app["deployments"] if d["name"] == "ChatIngress"] + [
        {"name": pool, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}} for pool in POOLS]
    with running(config, grpc=True) as (base_url, grpc_port):
        yield base_url, grpc_port, {pool: engine_stats(pool).replica_id for pool in POOLS}


@pytest.fixture(scope="module")
def base_url(service):
    return service[0]


# ---- property-based fuzzing from the OpenAPI document ------------------------------------------------------------


def test_http_api_fuzzed_from_its_openapi_document(base_url, tmp_path):
    """schemathesis's own runner (coverage and fuzzing phases), valid and invalid requests for every operation.

    Every check but positive_data_acceptance: a request the schema allows may still be refused for reasons a schema
    cannot say (a prompt past the context in tokens, messages that end with an assistant turn). `--checks all` turns
    on schemathesis's response-time check (10 s by default): its limit here is the request timeout, so it catches a
    stalled request, not a slow machine (a whole-context answer took 20 s on a CI machine busy with other work)."""
    import subprocess
    import sys

    report = tmp_path / "report.json"
    seed = [] if FUZZ_RANDOM else ["--seed", "20261122"]
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--mode", "all", "--max-examples", str(FUZZ_EXAMPLES),
         "--workers", "1", "--request-timeout", "60", "--max-response-time", "60", "--report", "json", "--report-json-path", str(report), *seed],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    summary = json.loads(report.read_text())
    assert summary["operations"] | {"skip_reasons": []} == {"total": 10, "selected": 10, "tested": 10, "errored": 0,
                                                            "skipped": 0, "skip_reasons": []}
    assert summary["test_cases"]["generated"] >= 10 * FUZZ_EXAMPLES
    # Each operation also got requests it accepted: the fuzzing reached the model, not only the validators.
    accepted = {operation: sum(phase["accepted"] for phase in rates.values())
                for operation, rates in summary["valid_rates"].items()}
    assert len(accepted) == 10 and all(accepted.values()), accepted


# ---- HTTP and SSE: explicit bad input on every route ------------------------------------------------------------

GOOD = {
    "/": {"prompt": "你好", "history": [], "max_length": 64},
    "/chatglm": {"prompt": "你好", "history": [], "max_length": 64},
    "/chat": {"query": "你好", "history": [], "max_length": 64},
    "/stream": {"query": "你好", "history": [], "max_length": 64},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4},
    "/v1/chat/completions#stream": {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4,
                                    "stream": True},
    "/v1/completions": {"prompt": "你好", "max_tokens": 4},
}
TEXT = {"/": "prompt", "/chatglm": "prompt", "/chat": "query", "/stream": "query", "/v1/completions": "prompt"}
WITH_HISTORY = ["/", "/chatglm", "/chat", "/stream"]


def text_field(route: str) -> str:
    return TEXT.get(route, "messages.0.content")


def with_text(route: str, text) -> dict:
    body = json.loads(json.dumps(GOOD[route]))
    if route.startswith("/v1/chat"):
        body["messages"][0]["content"] = text
    else:
        body[text_field(route)] = text
    return body


def raw(route: str, **replace: str) -> bytes:
    """The good body as JSON text with some values replaced by raw JSON text (e.g. NaN, which json.dumps won't)."""
    body = with_text(route, "@text@") if "text" in replace else dict(GOOD[route])
    text = json.dumps(body | {key: f"@{key}@" for key in replace if key != "text"}, ensure_ascii=False)
    for key, value in replace.items():
        text = text.replace(f'"@{key}@"', value)
    return text.encode()


PAST_CONTEXT = "你好 朋友 " * 120  # within the character limit, past the 256-token context

# (case id, body for a route, expected status, expected param (None: any), expected code (None: any))
CASES = [
    ("invalid-json", lambda r: b'{"prompt": "hi", ', 400, None, None),
    ("not-utf8", lambda r: raw(r, text='"@ hi"').replace(b'"@ hi"', b'"\xff\xfe hi"'), 400, None, "invalid_json"),
    ("lone-surrogate", lambda r: raw(r, text='"\\ud800 hi"'), 400, "text", None),
    ("array-body", lambda r: b"[]", 400, None, None),
    ("empty-body", lambda r: b"", 400, None, None),
    ("text-not-string", lambda r: with_text(r, 5), 400, "text", None),
    ("number-as-string", lambda r: GOOD[r] | {"temperature": "0.5"}, 400, "temperature", None),
    ("nan", lambda r: raw(r, temperature="NaN"), 400, "temperature", None),
    ("infinity", lambda r: raw(r, top_p="Infinity"), 400, "top_p", None),
    ("top-p-out-of-range", lambda r: GOOD[r] | {"top_p": 1.5}, 400, "top_p", None),
    ("unknown-field", lambda r: GOOD[r] | {"bogus": 1}, 400, "bogus", None),
    ("blank-prompt", lambda r: with_text(r, " \n\t "), 400, None, None),
    ("oversized-prompt", lambda r: with_text(r, "x" * (MAX_PROMPT_CHARS + 1)), 400, None, "context_length_exceeded"),
    ("past-context", lambda r: with_text(r, PAST_CONTEXT), 400, None, "context_length_exceeded"),
    ("unknown-model", lambda r: GOOD[r] | {"model": "gpt-4"}, 404, "model", "model_not_found"),
]
HISTORY_CASES = [[["only one"]], [["a", "b", "c"]], ["ab"], "not a list", [[1, 2]]]


def post(base_url: str, route: str, body) -> httpx.Response:
    path = route.split("#")[0]
    if isinstance(body, bytes):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(base_url + path, json=body, timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")  # never a stream that then fails
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("route", list(GOOD))
@pytest.mark.parametrize(("make", "status", "param", "code"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_http_bad_input_gets_a_clear_4xx(base_url, route, make, status, param, code):
    param = text_field(route) if param == "text" else param
    assert_error(post(base_url, route, make(route)), status, param, code)


@pytest.mark.parametrize("route", WITH_HISTORY)
@pytest.mark.parametrize("history", HISTORY_CASES, ids=["one", "three", "string-item", "string", "numbers"])
def test_history_that_is_not_pairs_of_strings_is_400(base_url, route, history):
    response = post(base_url, route, GOOD[route] | {"history": history})
    assert_error(response, 400)
    assert response.json()["error"]["param"].startswith("history")


@pytest.mark.parametrize("route", list(GOOD))
def test_missing_required_field_is_400(base_url, route):
    required = "messages" if route.startswith("/v1/chat") else text_field(route)
    body = {key: value for key, value in GOOD[route].items() if key != required}
    assert_error(post(base_url, route, body), 400, required, "invalid_request")


def test_the_same_requests_still_succeed(base_url):
    """The table's baseline bodies are good: each error above comes from the one thing changed."""
    for route, body in GOOD.items():
        response = post(base_url, route, body | {"temperature": 0})
        assert response.status_code == 200, (route, response.text)


HUGE = 10**40  # past every machine integer
ABSURD_INTEGERS = [  # (route, body, expected status, expected code)
    ("/v1/chat/completions", GOOD["/v1/chat/completions"] | {"seed": HUGE}, 200, None),  # any integer seeds
    ("/v1/completions", GOOD["/v1/completions"] | {"seed": -HUGE}, 200, None),
    ("/", GOOD["/"] | {"max_length": HUGE}, 200, None),  # the official meaning: capped at the pool's context
    ("/stream", GOOD["/stream"] | {"max_length": HUGE}, 200, None),
    ("/v1/chat/completions", GOOD["/v1/chat/completions"] | {"max_tokens": HUGE}, 400, "context_length_exceeded"),
    ("/v1/completions", GOOD["/v1/completions"] | {"max_tokens": HUGE}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [5, 6, HUGE], "max_tokens": 4}, 400, "invalid_request"),
    ("/detokenize", {"tokens": [HUGE]}, 400, "invalid_request"),
    ("/v1/completions", raw("/v1/completions", max_tokens="9" * 5000), 400, None),  # past Python's int digits
    ("/v1/chat/completions", raw("/v1/chat/completions", seed="9" * 5000), 400, None),
]


@pytest.mark.parametrize(("route", "body", "status", "code"), ABSURD_INTEGERS,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(ABSURD_INTEGERS)])
def test_absurd_integers_are_served_or_refused_never_a_5xx(base_url, route, body, status, code):
    response = post(base_url, route, body)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, code=code)


def test_unknown_route_and_wrong_method_are_openai_style(base_url):
    assert_error(httpx.post(f"{base_url}/v2/chat", json={}, timeout=30), 404, code="not_found")
    wrong_method = httpx.get(f"{base_url}/v1/chat/completions", timeout=30)
    assert_error(wrong_method, 405, code="method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


# ---- WebSocket -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "param"), [
    (b'{"query": "\xff\xfe"}', None),  # a binary frame that is not UTF-8
    ('{"query": "\\ud800"}', None),
    ('{"query": "hi", "temperature": NaN}', "temperature"),
    ('{"query": "hi", "history": [["a"]]}', "history.0"),
    ('{"query": "hi", "bogus": 1}', "bogus"),
    ("[]", None),
    (json.dumps({"query": PAST_CONTEXT}), None),
], ids=["not-utf8", "lone-surrogate", "nan", "history", "unknown-field", "array", "past-context"])
def test_websocket_bad_input_gets_one_error_and_policy_close(base_url, payload, param):
    messages, code = serving.ws_exchange(base_url + "/ws", payload)
    assert code == 1008
    assert len(messages) == 1 and set(messages[0]["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert messages[0]["error"]["param"] == param


# ---- gRPC ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(service):
    channel = grpc.insecure_channel(f"127.0.0.1:{service[1]}")
    yield channel
    channel.close()


GOOD_GENERATE = pb.GenerateRequest(prompt="hi", max_length=32).SerializeToString()
UNDECODABLE = {
    "not-utf8": GOOD_GENERATE.replace(b"hi", b"\xff\xfe"),
    "corrupt": b"\x0a\xff\xff\xff\xff\x0f",
    "truncated": GOOD_GENERATE[:-1],
}


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate", "StreamChat"])
@pytest.mark.parametrize("payload", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_grpc_undecodable_message_is_invalid_argument(channel, method, payload):
    call = (channel.unary_unary if method == "Generate" else channel.unary_stream)(
        f"/chatglm2.ChatGLM2/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as error:
        result = call(payload, metadata=METADATA, timeout=30)
        list(result) if method != "Generate" else result
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid chatglm2." in error.value.details()


@pytest.mark.parametrize(("request_", "says"), [
    (pb.GenerateRequest(prompt="hi", temperature=float("nan")), "temperature: Input should be a finite number"),
    (pb.GenerateRequest(prompt="hi", top_p=float("inf")), "top_p: Input should be a finite number"),
    (pb.GenerateRequest(prompt="x" * (MAX_PROMPT_CHARS + 1)), "characters"),
    (pb.GenerateRequest(prompt=PAST_CONTEXT), "context"),
], ids=["nan", "infinite", "oversized", "past-context"])
def test_grpc_bad_values_are_invalid_argument(channel, request_, says):
    stub = ChatGLM2Stub(channel)
    for call in (stub.Generate, lambda r, **kw: list(stub.StreamGenerate(r, **kw))):
        with pytest.raises(grpc.RpcError) as error:
            call(request_, metadata=METADATA, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in error.value.details()


# ---- and nothing broke ---------------------------------------------------------------------------------------


def test_service_is_unharmed(service):
    """Runs last: the replicas that took all of the above are the ones that started (none crashed and was
    replaced), their engines are idle with no KV in use, and each pool still answers."""
    base_url, _, replica_ids = service

    def idle(pool: str) -> bool:
        stats = engine_stats(pool)
        return stats.engine.running == 0 and stats.engine.waiting == 0 and stats.engine.kv_tokens_in_use == 0

    for pool in POOLS:
        serving.wait_for(lambda pool=pool: idle(pool), 30, f"{pool} to be idle")
        assert engine_stats(pool).replica_id == replica_ids[pool]
        response = post(base_url, "/v1/chat/completions", GOOD["/v1/chat/completions"] | {"model": pool})
        assert response.status_code == 200 and response.json()["model"] == pool
