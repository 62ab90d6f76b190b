"""Request validation as the ingress applies it: which bodies pass, and the 400 each refused body turns into.

Fast (no Ray): the same pydantic models and `validation_error` the HTTP, WebSocket and gRPC front ends use.
tests/api/test_bad_input.py sends these shapes through the running service.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from serve_app.api.error_table import APIError, validation_error
from serve_app.api.schemas import (
    ApiPyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    StreamChatRequest,
    split_messages,
)


def refused(model: type[BaseModel], body: str | dict) -> APIError:
    with pytest.raises(ValidationError) as caught:
        # as FastAPI does: the standard json module first (it keeps lone surrogates and reads NaN), then the model
        model.model_validate(json.loads(body if isinstance(body, str) else json.dumps(body)))
    return validation_error(caught.value)


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "你好"}], **fields}


@pytest.mark.parametrize("fields, param, says", [
    ({"max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"max_tokens": 2.5}, "max_tokens", "valid integer"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": True}, "temperature", "valid number"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"top_k": 2.5}, "top_k", "valid integer"),
    ({"top_k": 10**7}, "top_k", "less than or equal to 1000000"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ({"min_p": "0.1"}, "min_p", "valid number"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "should match pattern"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300 items"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0", "greater than or equal to 0"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64 items"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"stream": "true"}, "stream", "valid boolean"),
    ({"stream": 1}, "stream", "valid boolean"),
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"response_format": {"type": "yaml"}}, "response_format", "does not match any of the expected tags"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "Field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.json_schema.name", "should match pattern"),
    ({"audio": {"voice": "alloy"}}, "audio", "Extra inputs are not permitted"),
    ({"n": True}, "n", "valid integer"),
    ({"logprobs": 0}, "logprobs", "valid boolean"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"repetition_penalty": 11.0}, "repetition_penalty", "less than or equal to 10"),
    ({"repetition_penalty": "1.1"}, "repetition_penalty", "valid number"),
    ({"stop": ""}, "stop.0", "at least 1 character"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
    ({"seed": "1"}, "seed", "valid integer"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "valid boolean"),
    ({"functions": []}, "functions", "Extra inputs are not permitted"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 129}, "tools", "at most 128 items"),
    ({"tool_choice": "sometimes"}, "tool_choice", "Input should be"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "Field required"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content", "lone surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content",
     "Input should be"),
])
def test_chat_completion_fields_are_strict(fields, param, says):
    error = refused(ChatCompletionRequest, chat(**fields))
    assert (error.status, error.param, error.code) == (400, param, "invalid_request")
    assert says in error.message and error.message.startswith(f"{param}: ")


def test_numbers_json_calls_integers_and_any_integer_seed_are_accepted():
    body = ChatCompletionRequest.model_validate(chat(max_tokens=5.0, n=1.0, seed=2**200))
    assert (body.max_tokens, body.n, body.seed) == (5, 1, 2**200)
    assert ChatCompletionRequest.model_validate(chat(stop="\n")).stop == ["\n"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_numbers_are_refused(field, literal):
    # Python's json module writes (and pydantic reads) these non-standard literals.
    error = refused(StreamChatRequest, f'{{"query": "hi", "{field}": {literal}}}')
    assert error.param == field and error.message == f"{field}: Input should be a finite number"


@pytest.mark.parametrize("model, body, param, says", [
    (ApiPyRequest, {"prompt": "hi", "history": [["only one"]]}, "history.0", "must be a [query, response] pair"),
    (ApiPyRequest, {"prompt": "hi", "history": [["a", "b", "c"]]}, "history.0", "not 3 items"),
    (ApiPyRequest, {"prompt": "hi", "history": ["ab"]}, "history.0", "pair of strings"),
    (ApiPyRequest, {"prompt": "hi", "history": "not a list"}, "history", "valid list"),
    (ApiPyRequest, {"prompt": "hi", "history": [["a", 1]]}, "history.0.1", "valid string"),
    (ApiPyRequest, {"prompt": "hi", "history": [["a", "\udfff"]]}, "history.0.1", "lone surrogate"),
    (ApiPyRequest, {"history": []}, "prompt", "Field required"),
    (ApiPyRequest, {"prompt": "hi", "max_length": 0}, "max_length", "greater than or equal to 1"),
    (StreamChatRequest, {"query": "\ud83d"}, "query", "lone surrogate"),
    (StreamChatRequest, {"query": "hi", "model": 7}, "model", "valid string"),
    (CompletionRequest, {"prompt": ["a", "b"]}, "prompt", "exactly one prompt per request"),
    (CompletionRequest, {"prompt": []}, "prompt", "exactly one prompt per request"),
    (CompletionRequest, {"prompt": [True]}, "prompt", "valid string"),
    (CompletionRequest, {"prompt": [1, "a"]}, "prompt.1", "valid integer"),  # token ids: every item an id
    (CompletionRequest, {"prompt": [5, -1]}, "prompt.1", "greater than or equal to 0"),
    (CompletionRequest, {"prompt": [[1], [2]]}, "prompt", "exactly one prompt per request"),
    (CompletionRequest, {"prompt": [[]]}, "prompt", "at least 1 item"),
    (CompletionRequest, {"prompt": "x", "echo": 0}, "echo", "valid boolean"),
    (CompletionRequest, {"prompt": "x", "echo": True}, "echo", "only false is supported"),
])
def test_seed_api_and_completion_bodies(model, body, param, says):
    error = refused(model, body)
    assert error.param == param and says in error.message


@pytest.mark.parametrize("prompt, expected", [
    ("hi", "hi"), (["hi"], "hi"), ([64790, 64792, 5], [64790, 64792, 5]), ([[7, 8]], [7, 8]), ([3.0], [3])])
def test_a_completion_prompt_is_text_or_token_ids(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == expected


def test_a_body_that_is_not_an_object_has_no_param():
    error = refused(ApiPyRequest, "[1, 2]")
    assert error.param is None and "valid dictionary" in error.message


def test_a_conversation_must_end_with_the_user():
    messages = ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])).messages
    with pytest.raises(APIError, match="must end with a user message") as caught:
        split_messages(messages)
    assert caught.value.status == 400 and caught.value.param == "messages"


@pytest.mark.parametrize("top_k, kept", [(None, 0), (-1, 0), (0, 0), (1, 1), (40, 40), (40.0, 40)])
def test_top_k_reaches_the_engine_with_off_as_0(top_k, kept):
    """vLLM's top_k extension on both OpenAI routes: -1 and 0 (and leaving it out) keep every token."""
    from serve_app.api.ingress_config import IngressConfig
    from serve_app.api.requests import RequestBuilder

    builder = RequestBuilder(IngressConfig(pool_names=["p"]))
    extra = {} if top_k is None else {"top_k": top_k}
    assert builder.chat_completion(ChatCompletionRequest.model_validate(chat(**extra))).params.top_k == kept
    completion = CompletionRequest.model_validate({"prompt": "你好", **extra})
    assert builder.completion(completion).params.top_k == kept


def test_min_p_reaches_the_engine():
    from serve_app.api.ingress_config import IngressConfig
    from serve_app.api.requests import RequestBuilder

    builder = RequestBuilder(IngressConfig(pool_names=["p"]))
    assert builder.chat_completion(ChatCompletionRequest.model_validate(chat(min_p=0.05))).params.min_p == 0.05
    assert builder.chat_completion(ChatCompletionRequest.model_validate(chat())).params.min_p == 0.0
    assert builder.completion(CompletionRequest.model_validate({"prompt": "x", "min_p": 0.2})).params.min_p == 0.2


def test_logit_bias_stop_token_ids_and_min_tokens_reach_the_engine():
    from serve_app.api.ingress_config import IngressConfig
    from serve_app.api.requests import RequestBuilder

    builder = RequestBuilder(IngressConfig(pool_names=["p"]))
    fields = {"logit_bias": {"5": 10, "7": -100.0}, "stop_token_ids": [3, 4], "min_tokens": 2}
    params = builder.chat_completion(ChatCompletionRequest.model_validate(chat(**fields))).params
    assert (params.logit_bias, params.stop_token_ids, params.min_tokens) == (((5, 10.0), (7, -100.0)), (3, 4), 2)
    completion = builder.completion(CompletionRequest.model_validate({"prompt": "x", **fields})).params
    assert completion.logit_bias == params.logit_bias and completion.min_tokens == 2
    plain = builder.chat_completion(ChatCompletionRequest.model_validate(chat())).params
    assert (plain.logit_bias, plain.stop_token_ids, plain.min_tokens) == ((), (), 0)
