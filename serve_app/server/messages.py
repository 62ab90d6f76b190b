"""What travels between the ingress and a pool: `TextRequest` in, `TextDelta`s back.

Plain dataclasses (no torch, no pydantic): Ray pickles them between the ingress and pool replicas. An error raised
inside a pool travels as data, an `ErrorInfo` with a code from the API's error table (serve_app/api/error_table.py),
because exceptions lose their type in transit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine.outputs import EngineStats
from serve_app.engine.params import SamplingParams


@dataclass
class ChatPrompt:
    """A chat turn: the pool applies ChatGLM2's chat template (`[Round n]` rounds, an optional system text)."""

    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None

    def history_after(self, answer: str) -> list[list[str]]:
        """The history a client keeps after this turn: the rounds kept, then [query, answer]."""
        return [list(pair) for pair in self.history] + [[self.query, answer]]

    def summary(self) -> str:  # for the request log line
        return self.query


@dataclass
class RawPrompt:
    """A completion prompt (/v1/completions, /tokenize): no chat template, just the [gMASK] sop prefix."""

    text: str

    def summary(self) -> str:
        return self.text


@dataclass
class TokenPrompt:
    """Prompt token ids (/v1/completions with ids): the model's whole input, as given."""

    ids: list[int]

    def summary(self) -> str:
        return f"<{len(self.ids)} token ids>"


Prompt = ChatPrompt | RawPrompt | TokenPrompt  # turned into model input in one place: ChatGLM2Server._prompt_ids


@dataclass
class TextRequest:
    """What the ingress asks of a pool: a prompt (one of the three kinds) and how to sample its reply.

    `context_strict` asks for OpenAI's semantics: a prompt plus `params.max_new_tokens` past the pool's context is a
    `context_length_exceeded` error. Without it (the official api.py) the reply is capped by the context instead.
    `caller` is set by the ingress's PoolClient when it sends the request.
    """

    request_id: str
    params: SamplingParams
    prompt: Prompt
    stop: list[str] = field(default_factory=list)
    context_strict: bool = False
    n: int = 1  # choices, sharing the prompt's prefill; with a seed, choice i samples with seed + i
    adapter: str | None = None  # a fine-tuned adapter of the pool (the app's `adapters:`), loaded by multiplexing
    # The ingress replica's Ray actor name: the pool stops the generation if that actor dies (server/caller_watch.py).
    caller: str | None = None


@dataclass
class ErrorInfo:
    """An error raised inside a pool: `code` is a key of serve_app.api.error_table.ERRORS."""

    code: str
    message: str


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenText:
    """A token as OpenAI's logprobs show it: its text, and its UTF-8 bytes (None for special tokens)."""

    token: str
    bytes: list[int] | None


@dataclass
class LogprobEntry:
    """A generated token's logprob, and the most likely tokens' (SamplingParams.logprobs)."""

    token: TokenText
    logprob: float
    top: list[tuple[TokenText, float]] = field(default_factory=list)


@dataclass
class TextDelta:
    """One streamed piece of a reply. The last one has finish_reason (and usage), or error instead. With n choices,
    `index` says whose piece it is and each choice has a last delta of its own (an error ends them all)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    logprobs: list[LogprobEntry] | None = None  # one per token this delta carries, when asked for
    index: int = 0


@dataclass
class Tokens:
    """A pool's answer to tokenize (the ids) or detokenize (their text), with the pool's context in tokens."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    max_seq_len: int = 0
    error: ErrorInfo | None = None


@dataclass
class ReplicaStats:
    """A pool replica's answer to `engine_stats`: its engine's live load, and where it runs."""

    engine: EngineStats
    replica_id: str
    node_id: str
    gpu_ids: list[str]  # the GPU ids Ray gave this replica (its share is logical)
    memory_plan: dict | None  # gpu_share.MemoryPlan.as_dict() on a GPU
