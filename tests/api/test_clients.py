"""The explorer's other clients against the running application: WebSocket, gRPC (generated stub) and the CLI chat.

One Ray + Serve start for the module (HTTP and gRPC proxies on free ports), two pools on the tiny demo checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from websockets.sync.client import connect

from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from tests import serving
from tests.serving import engine_stats

pytestmark = pytest.mark.slow
POOLS = ["chatglm2-6b", "chatglm2-6b-int8"]  # two of the demo service's three
METADATA = (("application", "chatglm2"),)


@pytest.fixture(scope="module")
def ports(demo):
    """(HTTP port, gRPC port) of the demo service."""
    return int(demo[0].rsplit(":", 1)[1]), demo[1]


@pytest.fixture(scope="module")
def base_url(ports):
    return f"http://127.0.0.1:{ports[0]}"


@pytest.fixture(scope="module")
def stub(ports):
    channel = grpc.insecure_channel(f"127.0.0.1:{ports[1]}")
    yield ChatGLM2Stub(channel)
    channel.close()


def greedy_answer(base_url: str, query: str, model: str = "chatglm2-6b", max_tokens: int = 8) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": query}], "temperature": 0,
            "max_tokens": max_tokens}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


# ---- WebSocket --------------------------------------------------------------------------------------------------


def ws_exchange(base_url: str, payload: str) -> tuple[list[dict], int]:
    return serving.ws_exchange(base_url + "/ws", payload)


def test_websocket_streams_growing_answer_then_closes_normally(base_url):
    history = [["你好", "你好👋！"]]
    payload = {"query": "介绍一下你自己", "history": history, "max_length": 64, "temperature": 0,
               "model": "chatglm2-6b-int8"}
    messages, code = ws_exchange(base_url, json.dumps(payload))
    assert code == 1000
    assert messages and all(set(m) == {"resp"} for m in messages[:-1]) and set(messages[-1]) == {"resp", "history"}
    for before, after in itertools.pairwise(messages):
        assert after["resp"].startswith(before["resp"]) and len(after["resp"]) > len(before["resp"])
    final = messages[-1]
    assert final["history"] == history + [[payload["query"], final["resp"]]]


@pytest.mark.parametrize(("payload", "param"), [
    ("{not json", None),
    (json.dumps({"query": 5}), "query"),
    (json.dumps({"query": ""}), "query"),
    (json.dumps({"query": "x" * 40000}), "query"),
    (json.dumps({"query": "hi", "model": "no-such-model"}), None),
])
def test_websocket_bad_input_gets_error_and_policy_close(base_url, payload, param):
    messages, code = ws_exchange(base_url, payload)
    assert code == 1008
    assert len(messages) == 1 and set(messages[0]["error"]) >= {"message", "type", "code"}
    if param:
        assert messages[0]["error"]["param"] == param


def aborted(pool: str) -> int:
    return engine_stats(pool).engine.finished.get("abort", 0)


def wait_for_abort(pool: str, before: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while aborted(pool) == before:
        assert time.monotonic() < deadline, f"{pool}: the abandoned request was not aborted"
        time.sleep(0.2)


def test_websocket_disconnect_mid_answer_aborts_generation(base_url):
    before = aborted("chatglm2-6b-int8")
    with connect(base_url.replace("http", "ws") + "/ws", open_timeout=30) as ws:
        ws.send(json.dumps({"query": "写一首长诗", "temperature": 0.9, "model": "chatglm2-6b-int8"}))
        ws.recv(timeout=60)
    wait_for_abort("chatglm2-6b-int8", before)


# ---- gRPC -------------------------------------------------------------------------------------------------------


def test_grpc_stream_generate_grows_to_the_unary_answer(stub):
    request = pb.GenerateRequest(prompt="你好", do_sample=False, max_length=40, model="chatglm2-6b")
    unary = stub.Generate(request, metadata=METADATA)
    assert unary.model == "chatglm2-6b" and unary.generated_text
    stream = [m.generated_text for m in stub.StreamGenerate(request, metadata=METADATA)]
    assert stream[-1] == unary.generated_text
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(stream))


def test_grpc_generate_default_pool_and_sampling(stub):
    request = pb.GenerateRequest(prompt="你好", max_length=30, temperature=0.8, top_p=0.9)
    assert stub.Generate(request, metadata=METADATA).model == POOLS[0]


def test_grpc_stream_chat_returns_new_history(stub):
    history = [pb.Turn(query="你好", response="你好👋！")]
    request = pb.ChatRequest(query="你是谁", history=history, do_sample=False, max_length=64, model="chatglm2-6b-int8")
    messages = list(stub.StreamChat(request, metadata=METADATA))
    final = messages[-1]
    assert [(t.query, t.response) for t in final.new_history] == [("你好", "你好👋！"), ("你是谁", final.generated_text)]
    assert not any(m.new_history for m in messages[:-1])  # the history comes once, with the final answer


@pytest.mark.parametrize(("request_", "code"), [
    (pb.GenerateRequest(prompt="hi", model="no-such-model"), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", max_length=-3), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_errors_have_status_codes(stub, request_, code):
    with pytest.raises(grpc.RpcError) as unary:
        stub.Generate(request_, metadata=METADATA)
    assert unary.value.code() == code
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.StreamGenerate(request_, metadata=METADATA))
    assert streamed.value.code() == code


def test_grpc_stream_chat_empty_query_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.StreamChat(pb.ChatRequest(query="  "), metadata=METADATA))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- CLI chat through a pseudo-terminal -------------------------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal, read until expected text appears."""

    def __init__(self, args: list[str]):
        master, slave = pty.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.master, self.output = master, ""

    def expect(self, text: str, start: int = 0, timeout_s: float = 120.0) -> int:
        """Wait for `text` in the output after position `start`; return the position just past it."""
        deadline = time.monotonic() + timeout_s
        while text not in self.output[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{text!r} not seen; output so far: {self.output!r}")
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    self.output += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # the child closed the terminal
                    raise TimeoutError(f"{text!r} not seen before exit; output: {self.output!r}") from None
        return self.output.index(text, start) + len(text)

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            os.close(self.master)


def chat_session(args: list[str], expected_answer: str) -> None:
    term = Terminal([sys.executable, "-m", "serve_app.cli", "chat", "--max-new-tokens", "8", *args])
    at = term.expect("用户：")
    term.send("你好")
    reply_at = term.expect("ChatGLM2：", at)
    next_prompt = term.expect("用户：", reply_at)
    assert term.output[reply_at:next_prompt].strip().removesuffix("用户：").strip() == expected_answer.strip()
    term.send("clear")
    at = term.expect("history cleared", next_prompt)
    term.send("stop")
    assert term.wait() == 0


def test_cli_chat_over_http_streams_and_exits(base_url):
    chat_session(["--url", base_url, "--model", "chatglm2-6b"], greedy_answer(base_url, "你好"))


def test_cli_chat_in_process_matches_the_server(base_url, tiny_checkpoint):
    chat_session(["--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "--device", "cpu"],
                 greedy_answer(base_url, "你好"))
