"""The protocols that re-send the whole answer so far (`POST /stream`'s `response`, `/ws`, gRPC `StreamChat`) on
the running application, for a long reply: they pace it by `limits.resend_divisor` (Stream.growing), so the text
received stays within a fixed multiple of the answer instead of growing with its square, and the history comes once,
with the final answer. One Ray + Serve start: one pool on the fake engine, a 400-token reply at 100 tokens a second
(one piece per token reaches the ingress, so an unpaced stream would be far past the bound).
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from serve_app.api.ingress_config import RequestLimits
from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from tests import serving
from tests.serving import local_config, running

pytestmark = pytest.mark.slow

POOL = "chatglm2-6b"
DIVISOR = RequestLimits().resend_divisor
HISTORY = [["你好", "你好👋！我是人工智能助手 ChatGLM2-6B。"], ["讲个故事", "从前有座山。"]]
PAYLOAD = {"query": "再讲一个长一点的 tell a longer one", "history": HISTORY, "max_length": 1024, "model": POOL}


def bound(answer: str) -> int:
    """Characters of answer that paced messages may carry in all: below `DIVISOR` characters every piece is sent
    (at most DIVISOR messages of at most DIVISOR characters), then each message is at least (1 + 1/DIVISOR) times
    the one before (a geometric sum up to the answer: (DIVISOR + 1) * len), plus the final answer once more."""
    return DIVISOR * DIVISOR + (DIVISOR + 2) * len(answer)


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    config = local_config(tiny_checkpoint, fake_engine={"token_delay_s": 0.01, "max_reply_tokens": 400},
                          pools=[{"model": POOL, "precision": "fp32"}])
    with running(config, grpc=True) as urls:
        yield urls


@pytest.fixture(scope="module")
def sse_events(service) -> list[dict]:
    response = httpx.post(f"{service[0]}/stream", json=PAYLOAD, timeout=120)
    assert response.status_code == 200
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def test_sse_deltas_add_up_and_responses_stay_within_the_bound(sse_events):
    *growing, final = sse_events
    answer = final["response"]
    assert len(answer) > 200 and len(growing) > 1  # a long answer, streamed
    assert final["finished"] is True and final["delta"] == "[EOS]"
    assert final["history"] == HISTORY + [[PAYLOAD["query"], answer]]
    assert "".join(event["delta"] for event in growing) == answer
    assert all(event["response"] == answer[:len(event["response"])] and not event["finished"] for event in growing)
    assert sum(len(event["response"]) for event in sse_events) <= bound(answer)


def test_websocket_sends_the_history_once_and_stays_within_the_bound(service, sse_events):
    messages, code = serving.ws_exchange(service[0] + "/ws", json.dumps(PAYLOAD))
    answer = sse_events[-1]["response"]  # the fake engine's reply is the same for the same prompt
    assert code == 1000 and len(messages) > 1
    assert all(set(m) == {"resp"} for m in messages[:-1])
    assert messages[-1] == {"resp": answer, "history": HISTORY + [[PAYLOAD["query"], answer]]}
    assert all(answer.startswith(m["resp"]) for m in messages)
    assert sum(len(m["resp"]) for m in messages) <= bound(answer)


def test_grpc_stream_chat_sends_the_history_once_and_stays_within_the_bound(service, sse_events):
    request = pb.ChatRequest(query=PAYLOAD["query"], history=[pb.Turn(query=q, response=r) for q, r in HISTORY],
                             max_length=PAYLOAD["max_length"], model=POOL)
    with grpc.insecure_channel(f"127.0.0.1:{service[1]}") as channel:
        messages = list(ChatGLM2Stub(channel).StreamChat(request, metadata=(("application", "chatglm2"),), timeout=120))
    answer = sse_events[-1]["response"]
    assert len(messages) > 1 and messages[-1].generated_text == answer
    assert [(t.query, t.response) for t in messages[-1].new_history] == [*map(tuple, HISTORY), (PAYLOAD["query"], answer)]
    assert not any(m.new_history for m in messages[:-1])
    assert all(answer.startswith(m.generated_text) for m in messages)
    assert sum(len(m.generated_text) for m in messages) <= bound(answer)
