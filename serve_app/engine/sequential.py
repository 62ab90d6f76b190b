"""One request at a time: prefill the prompt, then decode token by token with a one-slot KV cache.

This is what the seeds' servers do for every request. The CLI uses it, and the benchmark uses it as the sequential
baseline the batching engine is compared with. Token ids only: text is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from serve_app.engine.params import SamplingParams, token_budget
from serve_app.engine.sampling import choose_token, make_generator
from serve_app.model.chatglm2 import KVCache
from serve_app.model.loader import LoadedModel


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the stop token included when there is one
    finish_reason: str  # "stop" | "length"


def stop_ids(loaded: LoadedModel, params: SamplingParams) -> frozenset[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.add(loaded.config.eos_token_id)
    return frozenset(ids)


def generate(
    loaded: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    on_token: Callable[[int], None] | None = None,
    context_len: int | None = None,
) -> GenerationOutput:
    """Generate for one prompt; `on_token` is called with each new id as soon as it is chosen."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    context_len = context_len or loaded.config.seq_length
    budget = token_budget(len(prompt_ids), params, context_len)
    stops = stop_ids(loaded, params)
    device = loaded.device
    cache = KVCache(loaded.config, 1, len(prompt_ids) + budget, dtype=loaded.dtype, device=device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    generator = make_generator(params, "cpu")

    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    generated: list[int] = []
    finish_reason = "length"
    while len(generated) < budget:
        logits = loaded.model(ids, positions, cache, slots, last_only=True)[0, -1].cpu()
        token = choose_token(logits, params, generator)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops:
            finish_reason = "stop"
            break
        position = len(prompt_ids) + len(generated) - 1
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[position]], device=device)
    return GenerationOutput(list(prompt_ids), generated, finish_reason)
