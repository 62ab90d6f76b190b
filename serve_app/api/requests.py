"""Request bodies of every protocol -> the `TextRequest` a pool runs, with the app's defaults and prompt checks.

Every request a protocol builds passes `RequestBuilder.bounded`, the one place the config's `limits` (api/ingress_config.py
`RequestLimits`) are applied to a prompt: its new message, its whole text, its history and its stop strings. The size
of the request itself (HTTP body, WebSocket message, gRPC message) is checked by each protocol before it is parsed.
"""

from __future__ import annotations

import uuid

from serve_app.api import tools
from serve_app.api.error_table import APIError
from serve_app.api.schemas import (
    ApiPyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    StreamChatRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    split_messages,
)
from serve_app.api.ingress_config import IngressConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.structured import ANY_OBJECT, canonical_schema
from serve_app.server.messages import ChatPrompt, RawPrompt, TextRequest, TokenPrompt


class RequestBuilder:
    def __init__(self, config: IngressConfig):
        self.config = config

    def params(self, *, temperature=None, top_p=None, max_length=None, max_new_tokens=None, seed=None,
               ignore_eos=False, top_k=None, min_p=None, logit_bias=None, stop_token_ids=(),
               min_tokens=0, repetition_penalty=None, presence_penalty=None,
               frequency_penalty=None, logprobs=None, json_schema=None) -> SamplingParams:
        d = self.config.defaults
        if max_length is None and max_new_tokens is None:
            max_length = d.max_length
        return SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            top_k=max(top_k or 0, 0),  # None, 0 and -1 are off
            min_p=min_p or 0.0,
            logit_bias=tuple((int(token), bias) for token, bias in (logit_bias or {}).items()),
            stop_token_ids=tuple(stop_token_ids),
            min_tokens=min_tokens,
            repetition_penalty=repetition_penalty or 1.0,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            seed=seed,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            json_schema=json_schema,
        )

    @staticmethod
    def openai_filters(body) -> dict:
        """The sampling fields of both OpenAI routes beyond temperature and top_p (vLLM's extensions included)."""
        return {"top_k": body.top_k, "min_p": body.min_p, "logit_bias": body.logit_bias,
                "stop_token_ids": body.stop_token_ids, "min_tokens": body.min_tokens,
                "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty}

    def check_prompt(self, text: str, param: str) -> None:
        if not text.strip():
            raise APIError("invalid_request", f"{param} is empty", param=param)
        self.check_length(text, param)

    def check_length(self, text: str, param: str) -> None:
        limit = self.config.limits.max_prompt_chars
        if len(text) > limit:
            raise APIError("context_length_exceeded", f"{param} is longer than {limit} characters", param=param)

    def check_count(self, items: list, limit: int, what: str, param: str) -> None:
        if len(items) > limit:
            raise APIError("invalid_request", f"{param} has {len(items)} {what}; at most {limit} are accepted",
                           param=param)

    def bounded(self, request: TextRequest, param: str) -> TextRequest:
        """`request` if its prompt and stop strings are within the limits, else the 400 that says which is not;
        `param` names the request field that holds the prompt."""
        limits = self.config.limits
        match request.prompt:
            case ChatPrompt(query, history, system):
                total = len(query) + len(system or "") + sum(len(q) + len(r) for q, r in history)
                if total > limits.max_total_prompt_chars:
                    raise APIError("context_length_exceeded", f"the prompt ({param}, with its history and system "
                                   f"text) is longer than {limits.max_total_prompt_chars} characters", param=param)
            case TokenPrompt(ids):
                self.check_token_ids(ids, param)
        for stop in request.stop:
            if len(stop) > limits.max_stop_chars:
                raise APIError("invalid_request", f"a stop string is longer than {limits.max_stop_chars} characters",
                               param="stop")
        return request

    def check_history(self, history: list, param: str = "history") -> None:
        self.check_count(history, self.config.limits.max_history_turns, "rounds", param)

    def check_messages(self, messages: list) -> None:
        self.check_count(messages, self.config.limits.max_messages, "messages", "messages")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        self.check_count(ids, self.config.limits.max_prompt_tokens, "token ids", param)

    def api_py(self, body: ApiPyRequest) -> TextRequest:
        """The official api.py: the whole history is kept."""
        self.check_prompt(body.prompt, "prompt")
        self.check_history(body.history)
        return self.bounded(TextRequest(
            request_id=uuid.uuid4().hex,
            params=self.params(temperature=body.temperature, top_p=body.top_p, max_length=body.max_length,
                               repetition_penalty=body.repetition_penalty),
            prompt=ChatPrompt(body.prompt, list(body.history)),
        ), "prompt")

    def chat_turn(self, body: StreamChatRequest) -> TextRequest:
        """The explorer's streaming API over HTTP (/chat, /stream) and WebSocket."""
        return self.turn(body.query, body.history, temperature=body.temperature, top_p=body.top_p,
                         max_length=body.max_length, repetition_penalty=body.repetition_penalty)

    def turn(self, query: str, history: list[tuple[str, str]], *, temperature: float | None = None,
             top_p: float | None = None, max_length: int | None = None,
             repetition_penalty: float | None = None) -> TextRequest:
        """A turn of the explorer's streaming API (HTTP, WebSocket, gRPC) from values already within its fields' bounds:
        the last `max_history_rounds` rounds kept."""
        self.check_prompt(query, "query")
        self.check_history(history)
        keep = self.config.max_history_rounds
        return self.bounded(TextRequest(
            request_id=uuid.uuid4().hex,
            params=self.params(temperature=temperature, top_p=top_p, max_length=max_length,
                               repetition_penalty=repetition_penalty),
            prompt=ChatPrompt(query, list(history)[-keep:] if keep else []),
        ), "query")

    def chat_completion(self, body: ChatCompletionRequest) -> TextRequest:
        self.check_messages(body.messages)
        system, history, query = split_messages(body.messages)
        self.check_prompt(query, "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("invalid_request", "top_logprobs needs logprobs: true", param="top_logprobs")
        return self.bounded(TextRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            params=self.params(temperature=body.temperature, top_p=body.top_p,
                               max_new_tokens=body.max_completion_tokens or body.max_tokens, seed=body.seed,
                               ignore_eos=body.ignore_eos, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                               json_schema=tools.call_schema(body) or self.json_schema(body.response_format),
                               **self.openai_filters(body)),
            prompt=ChatPrompt(query, history, system),
            stop=body.stop or [],
            context_strict=True,
            n=body.n,
        ), "messages")

    @staticmethod
    def json_schema(response_format) -> str | None:
        """response_format -> the JSON Schema text the reply is constrained to (None for text)."""
        match response_format:
            case JsonObjectFormat():
                return ANY_OBJECT
            case JsonSchemaFormat(json_schema=spec):
                return canonical_schema(spec.schema_)
        return None

    def completion(self, body: CompletionRequest) -> TextRequest:
        """A text prompt gets the [gMASK] sop prefix; token ids are the model's whole input, as given."""
        if isinstance(body.prompt, list):
            prompt = TokenPrompt(body.prompt)
        else:
            self.check_prompt(body.prompt, "prompt")
            prompt = RawPrompt(body.prompt)
        return self.bounded(TextRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            params=self.params(temperature=body.temperature, top_p=body.top_p, max_new_tokens=body.max_tokens,
                               seed=body.seed, ignore_eos=body.ignore_eos, logprobs=body.logprobs,
                               **self.openai_filters(body)),
            prompt=prompt,
            stop=body.stop or [],
            context_strict=True,
            n=body.n,
        ), "prompt")

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TextRequest:
        """The request whose prompt ids /tokenize reports: the chat completion or completion it describes."""
        if isinstance(body, TokenizeChatRequest):
            self.check_messages(body.messages)
            system, history, query = split_messages(body.messages)
            self.check_length(query, "messages")
            return self.bounded(TextRequest(uuid.uuid4().hex, SamplingParams(), ChatPrompt(query, history, system)),
                                "messages")
        self.check_length(body.prompt, "prompt")
        return self.bounded(TextRequest(uuid.uuid4().hex, SamplingParams(), RawPrompt(body.prompt)), "prompt")
