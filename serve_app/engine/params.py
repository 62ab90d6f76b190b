"""What a request asks of the engine: its sampling settings and token limits. Plain data: no torch, so the front end
can build and validate them."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine.errors import ContextLengthExceeded

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
MAX_REPETITION_PENALTY = 10.0  # well past any useful value (1.1 to 1.3 are usual); keeps logits finite
MAX_BIAS = 300  # logit_bias entries per request (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (token ids only; text-level stop strings live above the engine)."""

    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    min_p: float = 0.0  # keep only tokens at least min_p times as likely as the most likely one; 0 = off
    seed: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + generated tokens, the official meaning
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # (token id, bias) pairs added to the logits before temperature (OpenAI's logit_bias); at most MAX_BIAS of them
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    min_tokens: int = 0  # the stop ids (eos unless ignore_eos, stop_token_ids) cannot be chosen before this many
    # transformers' / the official generate's: logits of every token seen (prompt and output) divided by it when
    # positive, multiplied when negative; 1 = off
    repetition_penalty: float = 1.0
    # OpenAI's, over generated tokens: logit -= presence * (count > 0) + frequency * count; 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no logprobs; k: each chosen token's logprob and the k most likely tokens' (0 <= k <= MAX_TOP_LOGPROBS),
    # from the model's raw distribution: log-softmax of its logits before bias, penalties, temperature and filters
    logprobs: int | None = None
    # a JSON Schema as JSON text: the reply is constrained to JSON that matches it (engine/structured.py)
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] (0 = off), not {self.min_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {self.max_length}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, not {self.min_tokens}")
        if len(self.logit_bias) > MAX_BIAS or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_BIAS} logit_bias entries and {MAX_STOP_TOKEN_IDS} stop_token_ids")
        if any(token < 0 or not -100.0 <= bias <= 100.0 for token, bias in self.logit_bias):
            raise ValueError("logit_bias needs token ids >= 0 and biases in [-100, 100]")
        if any(token < 0 for token in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if not (0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1 = off), not "
                             f"{self.repetition_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (top alternatives), not {self.logprobs}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty needs the sequence's token counts."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def token_ids(self) -> set[int]:
        """Every token id these settings name (checked against the vocabulary by the engine)."""
        return {token for token, _ in self.logit_bias} | set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        # Dividing fp32 logits by a tinier temperature overflows to inf; such a temperature means greedy anyway.
        return self.temperature < GREEDY_BELOW


def stop_ids(params: SamplingParams, eos_token_id: int) -> frozenset[int]:
    """The token ids that end a request: its stop_token_ids, and the model's eos unless ignore_eos."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.add(eos_token_id)
    return frozenset(ids)


def token_budget(prompt_len: int, params: SamplingParams, max_seq_len: int) -> int:
    """How many tokens may be generated; raises ContextLengthExceeded when none may.

    `max_length` counts prompt plus generated tokens (the official meaning); `max_new_tokens` counts generated ones;
    both are capped by the context window.
    """
    total = min(max_seq_len, params.max_length or max_seq_len)
    if prompt_len >= total:
        limit = "max_length" if params.max_length and params.max_length < max_seq_len else "context window"
        raise ContextLengthExceeded(
            f"the prompt is {prompt_len} tokens, which leaves no room to generate within the {limit} of {total} tokens"
        )
    budget = total - prompt_len
    return min(budget, params.max_new_tokens) if params.max_new_tokens else budget
