"""logprobs, n > 1 and structured output through the running application, driven by the official openai client:
configs/local.yaml on the tiny random-weight demo checkpoint (the demo service shared with the other API modules).

Logprobs are checked against the no-cache reference forward run in this process, structured replies against
jsonschema and pydantic, and n choices against the same request sent n times with seeds seed + i.
"""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow
POOL = "chatglm2-6b"


@pytest.fixture(scope="module")
def base_url(demo):
    return demo[0]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def messages(text="你好"):
    return [{"role": "user", "content": text}]


def test_chat_logprobs_are_the_reference_log_softmax_streamed_and_not(client, base_url, tiny_checkpoint):
    from serve_app.model.loader import load_model
    from tests.engine.test_logprobs import reference_logprobs

    body = dict(model=POOL, messages=messages(), temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
                extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(**body)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 6
    prompt = httpx.post(f"{base_url}/tokenize", json={"model": POOL, "messages": messages()}, timeout=60).json()
    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    tokens = []
    sequence = list(prompt["tokens"])
    for _ in range(6):  # greedy with the reference forward: the served reply's tokens, and their logprobs
        logits = loaded.model(torch.tensor([sequence]), torch.arange(len(sequence))[None], last_only=True)[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        sequence.append(token)
    expected = reference_logprobs(loaded, prompt["tokens"], tokens)
    for entry, token, reference in zip(content, tokens, expected):
        assert entry.logprob == pytest.approx(float(reference[token]), abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(reference.topk(3).values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.bytes is None or bytes(entry.bytes).decode("utf-8", "replace") == entry.token or \
            entry.token.startswith("bytes:")
    stream = client.chat.completions.create(**body, stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert "".join(e.token for e in content).strip() == answer.choices[0].message.content.strip() or any(
        e.token.startswith("bytes:") for e in content)


def test_legacy_completion_logprobs_and_refusals(client):
    got = client.completions.create(model=POOL, prompt="hello", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    logprobs = got.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6 for top, lp in
               zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=POOL, prompt="hello", max_tokens=2, logprobs=6)
    assert refused.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=POOL, messages=messages(), max_tokens=2, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"
    plain = client.chat.completions.create(model=POOL, messages=messages(), max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_n_choices_share_one_prompt_each_with_its_own_seed(client):
    body = dict(model=POOL, messages=messages("讲个故事"), temperature=1.0, max_tokens=8, seed=7,
                extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(**body, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    texts = [c.message.content for c in answer.choices]
    alone = [client.chat.completions.create(**{**body, "seed": 7 + i}).choices[0].message.content for i in range(3)]
    assert texts == alone and len(set(texts)) > 1
    assert answer.usage.completion_tokens == 24
    single = client.chat.completions.create(**body)
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    assert client.chat.completions.create(**body, n=3).choices[1].message.content == texts[1]  # reproducible
    stream = client.chat.completions.create(**body, n=3, stream=True)
    pieces, finished = {0: "", 1: "", 2: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert [pieces[i] for i in range(3)] == texts and finished == {0: "length", 1: "length", 2: "length"}
    completions = client.completions.create(model=POOL, prompt="hello", max_tokens=4, n=2, seed=1, temperature=1,
                                            extra_body={"ignore_eos": True})
    assert [c.index for c in completions.choices] == [0, 1]


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=3)


def test_parse_returns_a_pydantic_object_from_random_weights(client):
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(model=POOL, messages=messages("Who are you? JSON."),
                                                   response_format=Person, temperature=temperature, seed=3,
                                                   max_tokens=200)
        person = completion.choices[0].message.parsed
        assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema_streamed_and_not(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}, "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4}},
              "required": ["ok", "n", "items"], "additionalProperties": False}
    formats = [{"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}]
    for response_format in formats:
        for stream in (False, True):
            body = dict(model=POOL, messages=messages(), max_tokens=100, temperature=0.7, seed=5,
                        response_format=response_format)
            if stream:
                text = "".join(c.delta.content or "" for chunk in client.chat.completions.create(**body, stream=True)
                               for c in chunk.choices)
            else:
                text = client.chat.completions.create(**body).choices[0].message.content
            jsonschema.validate(json.loads(text), schema)
    # json_object: an object; the reply is cut by max_tokens when the random weights ramble inside a string
    reply = client.chat.completions.create(model=POOL, messages=messages(), max_tokens=300, temperature=0,
                                           response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_bad_schemas_and_unsupported_formats_are_400s(client, base_url):
    for bad in ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                {"type": "string", "minLength": 5, "maxLength": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=POOL, messages=messages(), max_tokens=5, response_format={
                "type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
        assert refused.value.body["code"] == "invalid_request"
    reply = httpx.post(f"{base_url}/v1/chat/completions", json={"model": POOL, "messages": messages(),
                       "response_format": {"type": "xml"}}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("response_format"), reply.text
    after = client.chat.completions.create(model=POOL, messages=messages(), max_tokens=3)  # nothing broke
    assert after.choices[0].finish_reason in ("stop", "length")
