"""Next-token choice from logits: greedy, temperature and nucleus (top_p) sampling.

Pure functions over fp32 logits. Sampled choices draw from a per-request `torch.Generator`, so a request's seed fixes
its tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from serve_app.engine.params import SamplingParams


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits; the request fails rather than emitting garbage."""


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own random stream (None when it decodes greedily): seeded from `params.seed`, else at random."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % 2**64)  # any integer: manual_seed takes 64 bits
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
