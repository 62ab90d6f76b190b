"""One request at a time: prefill the prompt, then decode token by token with a one-slot KV cache.

This is what the official api.py and the explorer's servers do for every request. The CLI uses it, and the benchmark uses it as the sequential
baseline the batching engine is compared with. Token ids only: text is the caller's.

The one-slot runner (its KV cache, and on CUDA its compiled attention kernel) is kept for the next call with the
same model: a call allocates only when the model changes or its prompt plus budget outgrows the kept cache, which then
grows to at least twice its length, up to the context window. The kept runner holds on to its model until a call
with another model, or `release()`. A call takes the runner while it runs, so concurrent calls each get their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.engine.params import SamplingParams, stop_ids, token_budget
from serve_app.engine.runner import ModelRunner, Work
from serve_app.engine.sampling import NON_FINITE_MESSAGE, NonFiniteLogitsError, request_seed
from serve_app.model.loader import LoadedModel


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the stop token included when there is one
    finish_reason: str  # "stop" | "length"


_lock = threading.Lock()
_kept: ModelRunner | None = None  # the last call's runner, while no call uses it


def _take_runner(loaded: LoadedModel, needed: int, max_seq_len: int) -> ModelRunner:
    """A one-slot runner for `loaded` whose cache holds `needed` tokens: the kept one when it fits."""
    global _kept
    with _lock:
        kept, _kept = _kept, None
    if kept is not None and kept.loaded is loaded:
        if kept.cache.max_positions >= needed:
            return kept
        needed = max(needed, min(2 * kept.cache.max_positions, max_seq_len))  # growing prompts (a chat) allocate rarely
    kept = None  # the old cache goes before the new one is allocated
    # Eager, one slot: the same model and sampling code as the engine, without its batching or decode graphs.
    return ModelRunner(loaded, 1, needed, graphs=False)


def _keep_runner(runner: ModelRunner) -> None:
    global _kept
    with _lock:
        if _kept is None:  # a concurrent call's runner may be back first: keep one
            _kept = runner


def release() -> None:
    """Drop the kept runner (its KV cache and its hold on the model)."""
    global _kept
    with _lock:
        _kept = None


def generate(
    loaded: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    on_token: Callable[[int], None] | None = None,
    max_seq_len: int | None = None,
) -> GenerationOutput:
    """Generate for one prompt; `on_token` is called with each new id as soon as it is chosen."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    max_seq_len = max_seq_len or loaded.config.seq_length
    budget = token_budget(len(prompt_ids), params, max_seq_len)
    stops = stop_ids(params, loaded.config.eos_token_id)
    runner = _take_runner(loaded, len(prompt_ids) + budget, max_seq_len)
    try:
        return _generate(runner, prompt_ids, params, budget, stops, on_token)
    finally:
        _keep_runner(runner)


def _generate(runner: ModelRunner, prompt_ids: list[int], params: SamplingParams, budget: int,
              stops: frozenset[int], on_token: Callable[[int], None] | None) -> GenerationOutput:
    seed = request_seed(params)
    row = 0 if params.penalized else None  # the one-slot runner's only history row
    if row is not None:
        runner.load_history(row, list(prompt_ids), [])
    work = Work(list(prompt_ids), 0, 0, params, seed, penalty_row=row)
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
        work = Work([token], 0, len(prompt_ids) + len(generated) - 1, params, seed, len(generated), row)
    return GenerationOutput(list(prompt_ids), generated, finish_reason)
