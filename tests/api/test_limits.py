"""The request limits (`limits:` in the app's args, api/ingress_config.py `RequestLimits`) on every protocol.

First the one place they are applied, `RequestBuilder`, for every request kind at and one past each bound; then the
running application (one Ray + Serve start: one pool on the fake engine, small limits, HTTP and gRPC proxies, the gRPC
proxy's own cap set the documented way): every route, the WebSocket and every gRPC method refuse what is past a
limit with their typed error before anything reaches the pool, accept what is at it, and the pool's engine saw only
the accepted requests.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from serve_app.api.error_table import APIError
from serve_app.api.ingress_config import IngressConfig, RequestLimits
from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from serve_app.api.requests import RequestBuilder
from serve_app.api.schemas import (
    ApiPyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    StreamChatRequest,
    TokenizeChatRequest,
    split_messages,
)
from serve_app.config import AppArgs
from tests import serving
from tests.serving import engine_stats, environment, local_config, running

LIMITS = RequestLimits(max_body_bytes=16_384, max_prompt_chars=200, max_total_prompt_chars=1000, max_history_turns=8,
                       max_messages=10, max_stop_chars=16, max_prompt_tokens=50, request_timeout_s=2.0)
POOL = "chatglm2-6b"
GRPC_PROXY_CAP = 65_536  # RAY_SERVE_GRPC_MAX_MESSAGE_SIZE for the test cluster's proxies
METADATA = (("application", "chatglm2"),)


def turns(n: int, chars: int = 2) -> list[list[str]]:
    return [["q" * (chars // 2), "r" * (chars - chars // 2)] for _ in range(n)]


def messages(n: int) -> list[dict]:
    """n messages ending with a user message, alternating user and assistant."""
    return [{"role": "user" if (n - 1 - i) % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]


# ---- the config ------------------------------------------------------------------------------------------------


def test_limits_are_one_section_and_the_flat_keys_still_work():
    args = AppArgs(checkpoint="/ckpt", max_body_bytes=10, max_prompt_chars=20, limits={"max_messages": 3})
    assert args.ingress_config().limits == RequestLimits(max_body_bytes=10, max_prompt_chars=20, max_messages=3)
    with pytest.raises(ValueError, match="given twice"):
        AppArgs(checkpoint="/ckpt", max_body_bytes=10, limits={"max_body_bytes": 20})
    with pytest.raises(ValueError, match="max_mesages"):
        AppArgs(checkpoint="/ckpt", limits={"max_mesages": 3})


# ---- RequestBuilder: the one place -----------------------------------------------------------------------------

BUILDER = RequestBuilder(IngressConfig(pool_names=[POOL], limits=LIMITS, max_history_rounds=0))


def refused(build, code: str, param: str) -> APIError:
    with pytest.raises(APIError) as error:
        build()
    assert (error.value.code, error.value.param) == (code, param), error.value.message
    return error.value


@pytest.mark.parametrize(("kind", "text_field"), [(ApiPyRequest, "prompt"), (StreamChatRequest, "query")])
def test_chat_turns(kind, text_field):
    build = BUILDER.api_py if kind is ApiPyRequest else BUILDER.chat_turn

    def body(text="hi", history=()):
        return kind.model_validate({text_field: text, "history": list(history)})

    build(body(history=turns(8)))  # at the bound
    assert "9 rounds; at most 8" in refused(lambda: build(body(history=turns(9))), "invalid_request", "history").message
    build(body("x" * 200))
    refused(lambda: build(body("x" * 201)), "context_length_exceeded", text_field)
    if kind is ApiPyRequest:  # the official api.py keeps the whole history: all of it counts
        build(body("x" * 200, turns(4, 200)))  # 1000 characters in all
        refused(lambda: build(body("x" * 201, turns(4, 200))), "context_length_exceeded", text_field)
        refused(lambda: build(body("x", turns(5, 200))), "context_length_exceeded", text_field)
    else:  # /chat, /stream, WebSocket and gRPC keep max_history_rounds (0 here): what is dropped does not count
        assert build(body("x" * 200, turns(8, 200))).prompt.history == []


def test_grpc_turn_counts_the_history_it_was_sent():
    BUILDER.turn("hi", [("q", "r")] * 8)
    refused(lambda: BUILDER.turn("hi", [("q", "r")] * 9), "invalid_request", "history")


def test_chat_completions():
    def body(msgs, **extra):
        return ChatCompletionRequest.model_validate({"messages": msgs, **extra})

    BUILDER.chat_completion(body(messages(10)))
    refused(lambda: BUILDER.chat_completion(body(messages(11))), "invalid_request", "messages")
    system = {"role": "system", "content": "s" * 899}
    BUILDER.chat_completion(body([system, {"role": "user", "content": "u" * 101}]))
    refused(lambda: BUILDER.chat_completion(body([system, {"role": "user", "content": "u" * 102}])),
            "context_length_exceeded", "messages")
    earlier = [{"role": "user", "content": "u" * 200}, {"role": "assistant", "content": "a" * 200}] * 2
    refused(lambda: BUILDER.chat_completion(body([*earlier, {"role": "user", "content": "u" * 201}])),
            "context_length_exceeded", "messages")
    BUILDER.chat_completion(body(messages(1), stop=["s" * 16] * 4))
    refused(lambda: BUILDER.chat_completion(body(messages(1), stop=["ok", "s" * 17])), "invalid_request", "stop")


def test_completions_and_tokens():
    BUILDER.completion(CompletionRequest(prompt=list(range(50))))
    refused(lambda: BUILDER.completion(CompletionRequest(prompt=list(range(51)))), "invalid_request", "prompt")
    refused(lambda: BUILDER.completion(CompletionRequest(prompt="x" * 201)), "context_length_exceeded", "prompt")
    refused(lambda: BUILDER.completion(CompletionRequest(prompt="hi", stop="s" * 17)), "invalid_request", "stop")
    BUILDER.check_token_ids(list(range(50)), "tokens")
    refused(lambda: BUILDER.check_token_ids(list(range(51)), "tokens"), "invalid_request", "tokens")
    tokenize = TokenizeChatRequest.model_validate({"messages": messages(11)})
    refused(lambda: BUILDER.tokenize(tokenize), "invalid_request", "messages")


def test_split_messages_joins_a_long_run_of_one_role_in_linear_time():
    """20,000 user messages in a row (a 1 MiB body holds more): one join, not one per message."""
    run = [{"role": "user", "content": "x" * 40}] * 20_000
    system, history, query = split_messages(ChatCompletionRequest.model_validate({"messages": run}).messages)
    assert (system, history) == (None, []) and query == "\n\n".join(["x" * 40] * 20_000)


# ---- the running application -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    """(HTTP base URL, gRPC port, the engine's request count once up)."""
    config = local_config(tiny_checkpoint, fake_engine={"token_delay_s": 0.001, "max_reply_tokens": 4},
                          pools=[{"model": POOL, "precision": "fp32"}], limits=LIMITS.model_dump(),
                          engine={"max_seq_len": 2048})
    # Ray's processes read the proxy's cap from their environment, which they inherit from the one starting Ray.
    with environment(RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=str(GRPC_PROXY_CAP)), running(config, grpc=True) as urls:
        yield *urls, engine_stats(POOL).engine.total_requests


@pytest.fixture(scope="module")
def base_url(service):
    return service[0]


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(f"127.0.0.1:{service[1]}",
                                    options=[("grpc.max_send_message_length", 4 * GRPC_PROXY_CAP)])
    yield ChatGLM2Stub(channel)
    channel.close()


def chat(msgs: list[dict], **extra) -> dict:
    return {"messages": msgs, "max_tokens": 4, **extra}


# (route, body past a limit, expected status, code, param)
PAST = [
    ("/", {"prompt": "hi", "history": turns(9)}, 400, "invalid_request", "history"),
    ("/", {"prompt": "x" * 100, "history": turns(5, 200)}, 400, "context_length_exceeded", "prompt"),
    ("/chatglm", {"prompt": "hi", "history": turns(9)}, 400, "invalid_request", "history"),
    ("/chat", {"query": "hi", "history": turns(9)}, 400, "invalid_request", "history"),
    ("/stream", {"query": "hi", "history": turns(9)}, 400, "invalid_request", "history"),
    ("/stream", {"query": "x" * 201}, 400, "context_length_exceeded", "query"),
    ("/v1/chat/completions", chat(messages(11)), 400, "invalid_request", "messages"),
    ("/v1/chat/completions", chat(messages(11), stream=True), 400, "invalid_request", "messages"),
    ("/v1/chat/completions", chat([{"role": "system", "content": "s" * 900}, {"role": "user", "content": "u" * 101}]),
     400, "context_length_exceeded", "messages"),
    ("/v1/chat/completions", chat(messages(1), stop=["s" * 17]), 400, "invalid_request", "stop"),
    ("/v1/completions", {"prompt": list(range(51)), "max_tokens": 4}, 400, "invalid_request", "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": "s" * 17, "max_tokens": 4}, 400, "invalid_request", "stop"),
    ("/tokenize", {"messages": messages(11)}, 400, "invalid_request", "messages"),
    ("/tokenize", {"prompt": "x" * 201}, 400, "context_length_exceeded", "prompt"),
    ("/detokenize", {"tokens": list(range(51))}, 400, "invalid_request", "tokens"),
    ("/v1/chat/completions", chat([{"role": "user", "content": "u" * 17_000}]), 413, "request_too_large", None),
]
AT = [
    ("/", {"prompt": "x" * 200, "history": turns(4, 200)}),
    ("/chat", {"query": "hi", "history": turns(8)}),
    ("/stream", {"query": "x" * 200, "history": turns(8)}),
    ("/v1/chat/completions", chat(messages(10), stop=["s" * 16] * 4)),
    ("/v1/completions", {"prompt": list(range(50)), "max_tokens": 4}),
    ("/tokenize", {"messages": messages(10)}),
    ("/detokenize", {"tokens": list(range(50))}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("route", "body", "status", "code", "param"), PAST,
                         ids=[f"{route}-{code}-{param}" for route, _, _, code, param in PAST])
def test_http_past_a_limit_is_a_typed_4xx(base_url, route, body, status, code, param):
    response = httpx.post(base_url + route, json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


@pytest.mark.slow
@pytest.mark.parametrize(("route", "body"), AT, ids=[route for route, _ in AT])
def test_http_at_a_limit_is_served(base_url, route, body):
    response = httpx.post(base_url + route, json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_websocket_message_past_the_size_limit_is_closed_1009(base_url):
    payload = json.dumps({"query": "hi", "history": turns(1, 17_000)})
    received, code = serving.ws_exchange(base_url + "/ws", payload)
    assert code == 1009
    assert [m["error"]["code"] for m in received] == ["request_too_large"]


@pytest.mark.slow
@pytest.mark.parametrize(("payload", "code", "param"), [
    ({"query": "hi", "history": turns(9)}, "invalid_request", "history"),
    ({"query": "x" * 201}, "context_length_exceeded", "query"),
], ids=["history-turns", "query-chars"])
def test_websocket_past_a_count_limit_is_closed_1008(base_url, payload, code, param):
    received, close = serving.ws_exchange(base_url + "/ws", json.dumps(payload))
    assert close == 1008
    assert [(m["error"]["code"], m["error"]["param"]) for m in received] == [(code, param)]


@pytest.mark.slow
def test_websocket_at_the_limits_is_served(base_url):
    received, close = serving.ws_exchange(base_url + "/ws", json.dumps({"query": "x" * 200, "history": turns(8)}))
    assert close == 1000 and received and "resp" in received[-1]


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        result = call()
        list(result) if not isinstance(result, pb.GenerateResponse) else result
    return error.value


@pytest.mark.slow
def test_grpc_message_past_the_size_limit_is_resource_exhausted(stub):
    big = pb.GenerateRequest(prompt="x" * 20_000, max_length=32)  # over 16,384 bytes, under the proxy's cap
    chat = pb.ChatRequest(query="hi", history=[pb.Turn(query="q" * 20_000, response="r")], max_length=32)
    for call in (lambda: stub.Generate(big, metadata=METADATA, timeout=30),
                 lambda: stub.StreamGenerate(big, metadata=METADATA, timeout=30),
                 lambda: stub.StreamChat(chat, metadata=METADATA, timeout=30)):
        error = grpc_error(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than 16384 bytes" in error.details()


@pytest.mark.slow
def test_grpc_message_past_the_proxy_cap_is_refused_by_the_proxy(stub):
    """Past RAY_SERVE_GRPC_MAX_MESSAGE_SIZE the proxy refuses the message before decoding it."""
    huge = pb.GenerateRequest(prompt="x" * (GRPC_PROXY_CAP + 1))
    error = grpc_error(lambda: stub.Generate(huge, metadata=METADATA, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


@pytest.mark.slow
def test_grpc_past_a_count_limit_is_invalid_argument(stub):
    history = [pb.Turn(query="q", response="r")] * 9
    error = grpc_error(lambda: stub.StreamChat(pb.ChatRequest(query="hi", history=history), metadata=METADATA,
                                               timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 8" in error.details()
    answers = list(stub.StreamChat(pb.ChatRequest(query="hi", history=history[:8], max_length=512),
                                   metadata=METADATA, timeout=30))
    assert answers and len(answers[-1].new_history) == 9  # the 8 rounds sent (max_history_rounds is 10), then this one


def http_exchange(base_url: str, head: bytes, parts: list[bytes], pause_s: float) -> bytes:
    """Send `head`, then each part with `pause_s` between them, over a raw socket; the response."""
    import socket
    import time

    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for part in parts:
            time.sleep(pause_s)
            sock.sendall(part)
        response = sock.recv(65536)
        head, _, body = response.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (more := sock.recv(65536)):
            body += more
        return head + b"\r\n\r\n" + body


def slow_post(path: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{size}\r\n\r\n".encode()


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_http_body_that_stalls_is_408(base_url, framing):
    """A client that sends part of its body and stops holds nothing past request_timeout_s (2 s here)."""
    body = json.dumps(chat(messages(1))).encode()
    if framing == "content-length":
        head, first = slow_post("/v1/chat/completions", len(body)), body[:10]
    else:
        head, first = slow_post("/v1/chat/completions", None), b"%x\r\n%s\r\n" % (10, body[:10])
    response = http_exchange(base_url, head + first, [], 0)
    status = response.split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 408 Request Timeout", response[:300]
    assert b'"request_timeout"' in response


@pytest.mark.slow
def test_http_body_that_arrives_slowly_but_in_time_is_served(base_url):
    body = json.dumps(chat(messages(1))).encode()
    parts = [body[i : i + 8] for i in range(0, len(body), 8)]
    response = http_exchange(base_url, slow_post("/v1/chat/completions", len(body)) + parts[0], parts[1:],
                                pause_s=1.5 / len(parts))
    assert response.startswith(b"HTTP/1.1 200"), response[:300]


@pytest.mark.slow
def test_chunked_body_to_a_streaming_route_is_served(base_url):
    """A body without Content-Length is read by the ingress's middleware and replayed to the route; the stream's
    disconnect listener then reads past the replayed body (this once recursed without end)."""
    data = json.dumps({"query": "hi", "history": []}).encode()
    response = httpx.post(base_url + "/stream", content=iter([data[:5], data[5:]]),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 200 and '"finished": true' in response.text.replace('"finished":true', '"finished": true')


@pytest.mark.slow
def test_websocket_that_sends_no_request_is_closed(base_url):
    from websockets.sync.client import connect

    with connect(base_url.replace("http", "ws", 1) + "/ws", open_timeout=30) as ws:
        error = json.loads(ws.recv(timeout=30))["error"]
        assert error["code"] == "request_timeout"
        with pytest.raises(Exception):
            ws.recv(timeout=30)
        assert ws.close_code == 1008


@pytest.mark.slow
def test_only_the_accepted_requests_reached_the_engine(service):
    """Runs last: the engine's request count grew by the requests served above, not by any refused one."""
    http = len([r for r, _ in AT if r not in ("/tokenize", "/detokenize")]) + 2  # + the slow body, the chunked one
    served = http + 1 + 1  # + WebSocket, gRPC
    assert engine_stats(POOL).engine.total_requests - service[2] == served
