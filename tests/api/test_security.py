"""API keys on every protocol, CORS and the body limit, against the running application.

One Ray + Serve start for the module: configs/local.yaml with one pool, `api_keys_env` set and the keys passed to the
replicas the documented way (the application's `runtime_env.env_vars`), HTTP and gRPC proxies on free ports. Keys,
CORS and the body limit are the ingress's: the pool runs the fake engine (tests/fake_engine.py), whose replies still
stream through the real pool deployment, Ray and both proxies.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from tests import serving
from tests.serving import local_config, running

pytestmark = pytest.mark.slow
POOL = "chatglm2-6b"
ENV = "TEST_CHATGLM2_API_KEYS"
KEY = f"sk-test-{secrets.token_hex(16)}"
OTHER_KEY = f"sk-other-{secrets.token_hex(16)}"
ALLOWED = "https://chat.allowed.example"
LIMIT = 4096
APP = (("application", "chatglm2"),)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    import ray

    config = local_config(tiny_checkpoint, fake_engine={"token_delay_s": 0.002},
                          pools=[{"model": POOL, "precision": "fp32"}], api_keys_env=ENV, require_api_keys=True, cors_origins=[ALLOWED],
                          max_body_bytes=LIMIT)
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {ENV: f"{OTHER_KEY}, {KEY}"}}
    with running(config, grpc=True) as (url, grpc_port):
        yield url, grpc_port, Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


@pytest.fixture(scope="module")
def base_url(cluster):
    return cluster[0]


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster[1]}")
    yield ChatGLM2Stub(channel)
    channel.close()


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


CHAT = {"model": POOL, "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 4}
ROUTES = [("/v1/chat/completions", CHAT), ("/", {"prompt": "你好", "history": [], "max_length": 32}),
          ("/chatglm", {"prompt": "你好", "history": [], "max_length": 32}),
          ("/chat", {"query": "你好", "history": [], "max_length": 32}),
          ("/stream", {"query": "你好", "history": [], "max_length": 32}),
          ("/v1/completions", {"model": POOL, "prompt": "你好", "max_tokens": 4}),
          ("/tokenize", {"prompt": "你好"}), ("/detokenize", {"tokens": [5, 6]}),
          ("GET /v1/models", None), ("GET /openapi.json", None), ("GET /docs", None)]
ROUTE_IDS = [path for path, _ in ROUTES]
NO_KEYS = [{}, auth("sk-wrong"), {"Authorization": KEY}, {"Authorization": "Bearer"}]


def call(base_url: str, path: str, body, headers: dict) -> httpx.Response:
    if path.startswith("GET "):
        return httpx.get(base_url + path.removeprefix("GET "), headers=headers, timeout=60)
    return httpx.post(base_url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("headers", NO_KEYS, ids=["none", "wrong", "no-scheme", "empty"])
def test_http_routes_need_a_key(base_url, path, body, headers):
    response = call(base_url, path, body, headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert KEY not in response.text


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
def test_http_routes_with_a_key(base_url, path, body):
    for key in (KEY, OTHER_KEY):
        response = call(base_url, path, body, auth(key))
        assert response.status_code == 200, response.text


def test_openai_client_with_the_key(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data if getattr(m, "parent", None) is None] == [POOL]
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason == "length"
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**CHAT)


def test_health_and_ui_are_open(base_url):
    assert httpx.get(f"{base_url}/health", timeout=30).json()["status"] == "ok"
    page = httpx.get(f"{base_url}/ui", timeout=30)
    assert page.status_code == 200 and 'id="api-key"' in page.text
    assert httpx.get(f"{base_url}/v1/models", timeout=30).status_code == 401


def ws_exchange(url: str, headers: dict | None = None) -> tuple[list[dict], int]:
    payload = json.dumps({"query": "你好", "history": [], "max_length": 32, "temperature": 0})
    return serving.ws_exchange(url, payload, headers)


def ws_refused(url: str, headers: dict | None = None) -> tuple[int, dict]:
    """A handshake the server refuses: (HTTP status, the error object of the body)."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        ws_exchange(url, headers)
    response = refused.value.response
    return response.status_code, json.loads(response.body)["error"]


def test_websocket_needs_a_key_before_the_handshake_is_accepted(base_url):
    for url, headers in [(f"{base_url}/ws", None), (f"{base_url}/ws", auth("sk-wrong")),
                         (f"{base_url}/ws?api_key=sk-wrong", None), (f"{base_url}/ws?api_key=", None)]:
        status, error = ws_refused(url, headers)
        assert (status, error["code"]) == (401, "invalid_api_key")
    for url, headers in [(f"{base_url}/ws", auth()), (f"{base_url}/ws?api_key={KEY}", None)]:
        messages, code = ws_exchange(url, headers)
        assert code == 1000 and messages and "resp" in messages[-1]


def test_websocket_origin_must_be_the_services_own_or_allowed(base_url):
    """A page elsewhere cannot drive /ws from a user's browser; clients that send no Origin are not browsers."""
    own = base_url  # the origin of the page the ingress serves at /ui
    for origin in ("https://evil.example", "http://127.0.0.1.evil.example", "null"):
        status, error = ws_refused(f"{base_url}/ws", {"Origin": origin, **auth()})
        assert (status, error["code"]) == (403, "origin_not_allowed"), origin
    for headers in ({"Origin": ALLOWED, **auth()}, {"Origin": own, **auth()}, auth()):
        messages, code = ws_exchange(f"{base_url}/ws", headers)
        assert code == 1000 and messages and "resp" in messages[-1], headers


GRPC_METHODS = ["Generate", "StreamGenerate", "StreamChat"]


def grpc_call(stub, method: str, metadata):
    if method == "StreamChat":
        return list(stub.StreamChat(pb.ChatRequest(query="你好", max_length=32), metadata=metadata, timeout=60))
    request = pb.GenerateRequest(prompt="你好", max_length=32)
    if method == "Generate":
        return stub.Generate(request, metadata=metadata, timeout=60)
    return list(stub.StreamGenerate(request, metadata=metadata, timeout=60))


@pytest.mark.parametrize("method", GRPC_METHODS)
def test_grpc_needs_a_key(stub, method):
    for metadata in [APP, APP + (("authorization", "Bearer sk-wrong"),), APP + (("authorization", KEY),),
                     APP + (("authorization", "Bearer"),)]:
        with pytest.raises(grpc.RpcError) as refused:
            grpc_call(stub, method, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for key in (KEY, OTHER_KEY):
        assert grpc_call(stub, method, APP + (("authorization", f"Bearer {key}"),))


def test_cors_preflight_and_headers(base_url):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{base_url}/v1/chat/completions", headers={"Origin": ALLOWED, **preflight}, timeout=30)
    assert allowed.status_code in (200, 204)
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{base_url}/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight},
                          timeout=30)
    assert "access-control-allow-origin" not in other.headers
    # Actual requests: the allowed origin can read both answers and errors; another origin gets no header.
    ok = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, headers={"Origin": ALLOWED, **auth()}, timeout=60)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    denied = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, headers={"Origin": ALLOWED}, timeout=60)
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ALLOWED
    foreign = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example",
                                                                               **auth()}, timeout=60)
    assert "access-control-allow-origin" not in foreign.headers


def test_body_over_the_limit_is_413(base_url):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=big, headers=auth(), timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        data = json.dumps(big).encode()
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    response = httpx.post(f"{base_url}/v1/chat/completions", content=chunked(),
                          headers={"Content-Type": "application/json", **auth()}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    small = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, headers=auth(), timeout=60)
    assert small.status_code == 200


def test_keys_never_logged(cluster):
    logs_dir = cluster[2]
    logs = list(logs_dir.glob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        assert KEY not in text and OTHER_KEY not in text, f"an API key is in {path.name}"
