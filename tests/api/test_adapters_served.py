"""Adapters through the running application (configs/local.yaml's demo adapters on the tiny demo checkpoint, the
demo service shared with the other API modules): picked by `model` on every protocol, listed by /v1/models, loaded
by Serve's multiplexing. The served tokens are checked against the engine run in this process with the same adapter
files (tests/engine/test_adapters.py checks that engine against transformers' GLM and peft)."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from serve_app.api.protos import chatglm2_pb2 as pb
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub
from tests import serving

pytestmark = pytest.mark.slow
POOL = "chatglm2-6b"
METADATA = (("application", "chatglm2"),)


def messages(text="你好"):
    return [{"role": "user", "content": text}]


def ask(client, model, **extra):
    answer = client.chat.completions.create(model=model, messages=messages(), temperature=0, max_tokens=8,
                                            extra_body={"ignore_eos": True}, **extra)
    return answer


@pytest.fixture(scope="module")
def expected(base_url, tiny_checkpoint):
    """name -> the reply text of the engine in this process with that adapter (fp32, as the chatglm2-6b pool)."""
    from serve_app.engine.engine import Engine, EngineConfig
    from serve_app.engine.params import SamplingParams
    from serve_app.model.adapters import read_adapter
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer

    prompt = httpx.post(f"{base_url}/tokenize", json={"model": POOL, "messages": messages()}, timeout=60).json()
    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    tokenizer = ChatGLM2Tokenizer(tiny_checkpoint)
    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_seq_len=512, max_adapters=2))
    adapters = tiny_checkpoint.parent / f"{tiny_checkpoint.name}-adapters"
    out = {}

    async def run(adapter):
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        return [t async for d in engine.generate(prompt["tokens"], params, adapter=adapter) for t in d.token_ids]

    try:
        for name in ("demo-ptuning", "demo-lora", None):
            if name is not None:
                engine.add_adapter(name, read_adapter(adapters / name, loaded.config))
            out[name] = tokenizer.decode(asyncio.run(run(name)))
    finally:
        asyncio.run(engine.shutdown())
    return out


def test_models_lists_adapters_with_their_pools(client):
    cards = {model.id: model for model in client.models.list().data}
    assert cards["demo-ptuning"].parent == POOL and cards["demo-lora"].parent == POOL
    assert cards["chatglm2-6b-int8:demo-ptuning"].parent == "chatglm2-6b-int8"
    assert "chatglm2-6b-int8:demo-lora" not in cards  # not enabled there
    assert getattr(cards[POOL], "parent", None) is None


def test_openai_chat_by_adapter_name_streamed_and_not(client, expected):
    for name in ("demo-ptuning", "demo-lora"):
        answer = ask(client, name)
        assert answer.model == name
        assert answer.choices[0].message.content == expected[name]
        stream = client.chat.completions.create(model=f"{POOL}:{name}", messages=messages(), temperature=0,
                                                max_tokens=8, stream=True, extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert {c.model for c in chunks} == {f"{POOL}:{name}"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[name]
    assert ask(client, POOL).choices[0].message.content == expected[None]
    assert expected["demo-ptuning"] != expected[None] and expected["demo-lora"] != expected[None]


def test_adapter_on_a_quantized_pool(client):
    base = ask(client, "chatglm2-6b-int4").choices[0].message.content
    tuned = ask(client, "chatglm2-6b-int4:demo-lora")
    assert tuned.model == "chatglm2-6b-int4:demo-lora" and tuned.choices[0].message.content != base


def test_unknown_or_disabled_adapter_is_404_model_not_found(base_url):
    for model in ("no-such-adapter", "chatglm2-6b-int8:demo-lora", "nope:demo-lora"):
        response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": model, "messages": messages()},
                              timeout=60)
        assert response.status_code == 404, model
        assert response.json()["error"]["code"] == "model_not_found"


def test_api_py_chat_stream_websocket_and_grpc_take_the_adapter(base_url, demo, expected):
    want = expected["demo-ptuning"]
    body = {"prompt": "你好", "history": [], "max_length": 2048, "temperature": 0.01, "top_p": 0.01,
            "model": "demo-ptuning"}
    official = httpx.post(f"{base_url}/", json=body, timeout=60).json()
    assert official["status"] == 200 and official["response"].startswith(want[:3])  # near-greedy: the same start
    greedy = {"query": "你好", "model": "demo-ptuning", "temperature": 0, "max_length": 64}
    chat = httpx.post(f"{base_url}/chat", json=greedy, timeout=60)
    assert chat.status_code == 200, chat.text
    received, code = serving.ws_exchange(base_url + "/ws", json.dumps(greedy))
    assert code == 1000 and received[-1]["resp"] == chat.json()["response"]
    assert chat.json()["response"].startswith(want[:3])  # the same greedy tokens as the OpenAI route's
    channel = grpc.insecure_channel(f"127.0.0.1:{demo[1]}")
    try:
        reply = ChatGLM2Stub(channel).Generate(pb.GenerateRequest(prompt="你好", do_sample=False, max_length=40,  # 17 + 32 prefix
                                                                  model="demo-ptuning"), metadata=METADATA)
        assert reply.model == "demo-ptuning" and reply.generated_text
        with pytest.raises(grpc.RpcError) as error:
            ChatGLM2Stub(channel).Generate(pb.GenerateRequest(prompt="hi", model="no-such-adapter"),
                                           metadata=METADATA)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
