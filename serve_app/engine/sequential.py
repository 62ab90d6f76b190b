"""One request at a time: prefill the prompt, then decode token by token with a one-slot KV cache.

This is what the seeds' servers do for every request. The CLI uses it, and the benchmark uses it as the sequential
baseline the batching engine is compared with. Token ids only: text is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from serve_app.engine.params import SamplingParams, token_budget
from serve_app.engine.runner import ModelRunner, Work
from serve_app.engine.sampling import NON_FINITE_MESSAGE, NonFiniteLogitsError, request_seed
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
    # Eager, one slot: the same model and sampling code as the engine, without its batching or decode graphs.
    runner = ModelRunner(loaded, 1, len(prompt_ids) + budget, graphs=False)
    seed = request_seed(params)
    work = Work(list(prompt_ids), 0, 0, params, seed)
    generated: list[int] = []
    finish_reason = "length"
    while len(generated) < budget:
        (token,) = runner.step([work])
        if token < 0:
            raise NonFiniteLogitsError(NON_FINITE_MESSAGE)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops:
            finish_reason = "stop"
            break
        work = Work([token], 0, len(prompt_ids) + len(generated) - 1, params, seed)
    return GenerationOutput(list(prompt_ids), generated, finish_reason)
