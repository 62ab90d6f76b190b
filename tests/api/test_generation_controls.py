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


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def test_tool_calls_required_and_named_streamed_and_not(client):
    for tool_choice, names in (("required", {"get_weather", "get_time"}),
                               ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):
        for seed in (1, 2):
            answer = client.chat.completions.create(model=POOL, messages=messages("天气?"), tools=[WEATHER, CLOCK],
                                                    tool_choice=tool_choice, temperature=1.0, seed=seed,
                                                    max_tokens=120)
            choice = answer.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
            schema = WEATHER["function"]["parameters"] if call.function.name == "get_weather" else \
                {"type": "object", "additionalProperties": False}
            jsonschema.validate(json.loads(call.function.arguments), schema)
    stream = client.chat.completions.create(model=POOL, messages=messages("天气?"), tools=[WEATHER],
                                            tool_choice="required", temperature=1.0, seed=1, max_tokens=120,
                                            stream=True)
    chunks = [c for chunk in stream for c in chunk.choices]
    calls = [tc for c in chunks if c.delta.tool_calls for tc in c.delta.tool_calls]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and chunks[-1].finish_reason == "tool_calls"
    assert "city" in json.loads(calls[0].function.arguments)


def test_tool_choices_that_cannot_be_honoured_are_400s_naming_why(client, base_url):
    for fields, param, says in (({"tools": [WEATHER]}, "tool_choice", "auto"),
                                ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "no tool-call format"),
                                ({"tool_choice": "required"}, "tool_choice", "needs tools"),
                                ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                      "function": {"name": "nope"}}},
                                 "tool_choice", "not in tools"),
                                ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "duplicate")):
        reply = httpx.post(f"{base_url}/v1/chat/completions", json={"model": POOL, "messages": messages(),
                                                                    "max_tokens": 4, **fields}, timeout=60)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and says in error["message"], error
    # "none": the plain reply OpenAI defines for it
    plain = client.chat.completions.create(model=POOL, messages=messages(), tools=[WEATHER], tool_choice="none",
                                           max_tokens=3)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")


def test_langchain_with_structured_output_by_function_calling(base_url):
    from langchain_openai import ChatOpenAI

    class Weather(BaseModel):
        """The weather to look up."""

        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)

    model = ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model=POOL, temperature=0.8, max_tokens=120,
                       max_retries=0)
    structured = model.with_structured_output(Weather, method="function_calling")
    result = structured.invoke("明天北京天气怎么样?")
    assert isinstance(result, Weather) and 1 <= result.days <= 7
