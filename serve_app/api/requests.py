"""Request bodies of every protocol -> the `TextRequest` a pool runs, with the app's defaults and prompt checks."""

from __future__ import annotations

import uuid

from serve_app.api.error_table import APIError
from serve_app.api.schemas import (
    ApiPyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    StreamChatRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    split_messages,
)
from serve_app.api.ingress_config import IngressConfig
from serve_app.engine.params import SamplingParams
from serve_app.server.messages import ChatPrompt, RawPrompt, TextRequest, TokenPrompt


class RequestBuilder:
    def __init__(self, config: IngressConfig):
        self.config = config

    def params(self, *, temperature=None, top_p=None, max_length=None, max_new_tokens=None, seed=None,
               ignore_eos=False) -> SamplingParams:
        d = self.config.defaults
        if max_length is None and max_new_tokens is None:
            max_length = d.max_length
        return SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_p=d.top_p if top_p is None else top_p,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            seed=seed,
            ignore_eos=ignore_eos,
        )

    def check_prompt(self, text: str, param: str) -> None:
        if not text.strip():
            raise APIError("invalid_request", f"{param} is empty", param=param)
        self.check_length(text, param)

    def check_length(self, text: str, param: str) -> None:
        if len(text) > self.config.max_prompt_chars:
            raise APIError("context_length_exceeded",
                           f"{param} is longer than {self.config.max_prompt_chars} characters", param=param)

    def api_py(self, body: ApiPyRequest) -> TextRequest:
        """The official api.py: the whole history is kept."""
        self.check_prompt(body.prompt, "prompt")
        return TextRequest(
            request_id=uuid.uuid4().hex,
            params=self.params(temperature=body.temperature, top_p=body.top_p, max_length=body.max_length),
            prompt=ChatPrompt(body.prompt, list(body.history)),
        )

    def chat_turn(self, body: StreamChatRequest) -> TextRequest:
        """The explorer's streaming API over HTTP (/chat, /stream) and WebSocket."""
        return self.turn(body.query, body.history, temperature=body.temperature, top_p=body.top_p,
                         max_length=body.max_length)

    def turn(self, query: str, history: list[tuple[str, str]], *, temperature: float | None = None,
             top_p: float | None = None, max_length: int | None = None) -> TextRequest:
        """A turn of the explorer's streaming API (HTTP, WebSocket, gRPC) from values already within its fields' bounds:
        the last `max_history_rounds` rounds kept."""
        self.check_prompt(query, "query")
        keep = self.config.max_history_rounds
        return TextRequest(
            request_id=uuid.uuid4().hex,
            params=self.params(temperature=temperature, top_p=top_p, max_length=max_length),
            prompt=ChatPrompt(query, list(history)[-keep:] if keep else []),
        )

    def chat_completion(self, body: ChatCompletionRequest) -> TextRequest:
        system, history, query = split_messages(body.messages)
        self.check_prompt(query, "messages")
        return TextRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            params=self.params(temperature=body.temperature, top_p=body.top_p,
                               max_new_tokens=body.max_completion_tokens or body.max_tokens, seed=body.seed,
                               ignore_eos=body.ignore_eos),
            prompt=ChatPrompt(query, history, system),
            stop=body.stop or [],
            context_strict=True,
        )

    def completion(self, body: CompletionRequest) -> TextRequest:
        """A text prompt gets the [gMASK] sop prefix; token ids are the model's whole input, as given."""
        if isinstance(body.prompt, list):
            prompt = TokenPrompt(body.prompt)
        else:
            self.check_prompt(body.prompt, "prompt")
            prompt = RawPrompt(body.prompt)
        return TextRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            params=self.params(temperature=body.temperature, top_p=body.top_p, max_new_tokens=body.max_tokens,
                               seed=body.seed, ignore_eos=body.ignore_eos),
            prompt=prompt,
            stop=body.stop or [],
            context_strict=True,
        )

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TextRequest:
        """The request whose prompt ids /tokenize reports: the chat completion or completion it describes."""
        if isinstance(body, TokenizeChatRequest):
            system, history, query = split_messages(body.messages)
            self.check_length(query, "messages")
            return TextRequest(uuid.uuid4().hex, SamplingParams(), ChatPrompt(query, history, system))
        self.check_length(body.prompt, "prompt")
        return TextRequest(uuid.uuid4().hex, SamplingParams(), RawPrompt(body.prompt))
