"""Next-token choice from logits: greedy, temperature and nucleus (top_p) sampling.

Pure functions over fp32 logits. Sampled choices draw from a per-request `torch.Generator`, so a request's seed fixes
its tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits; the request fails rather than emitting garbage."""


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (token ids only; text-level stop strings live above the engine)."""

    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + generated tokens, the official meaning
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {self.max_length}")

    @property
    def greedy(self) -> bool:
        # Dividing fp32 logits by a tinier temperature overflows to inf; such a temperature means greedy anyway.
        return self.temperature < GREEDY_BELOW

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed % 2**64)  # any integer: manual_seed takes 64 bits
        return generator


def check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise NonFiniteLogitsError("the model produced NaN/Inf logits (numerical overflow); the request was stopped")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass before it already reaches top_p.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop_sorted[..., 0] = False  # the most likely token stays, even for a top_p that rounds to 0 in fp32
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] fp32 -> next token id. Raises NonFiniteLogitsError on NaN/Inf."""
    check_finite(logits)
    if params.greedy:
        return int(logits.argmax())
    probs = top_p_filter(logits / params.temperature, params.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
