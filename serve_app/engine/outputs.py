"""What the engine hands out: a request's token deltas and stats, and the engine's own stats.

Plain dataclasses in a torch-free module: they cross Ray to the ingress (inside `ReplicaStats`), which loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused from an earlier sequence
    ttft_s: float | None  # submission to first token; None when no token was generated
    decode_tokens_per_s: float  # tokens after the first, per second after the first
    total_s: float


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely tokens' (SamplingParams.logprobs)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class TokenDelta:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    stats: RequestStats | None = None  # on the last delta
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


@dataclass
class EngineStats:
    running: int
    waiting: int
    free_slots: int  # rows a new sequence can still take (max_batch_size less the running ones)
    num_slots: int  # max_batch_size: sequences decoded together
    max_seq_len: int
    kv_tokens_in_use: int  # tokens of the blocks running sequences hold (cached prefixes no one holds excluded)
    kv_capacity_tokens: int  # num_blocks * block_size
    kv_cache_bytes: int
    cached_blocks: int  # blocks no sequence holds that keep a prefix for reuse (evicted first when blocks run out)
    total_requests: int
    finished: dict[str, int]  # finish reason -> count
    steps: int
    block_size: int = 0  # tokens per KV block
    num_blocks: int = 0
    free_blocks: int = 0  # holding nothing
    used_blocks: int = 0  # in running sequences' block tables
    prefix_hit_blocks: int = 0  # blocks shared from the prefix cache since start-up
    evicted_blocks: int = 0  # cached blocks reused for new KV since start-up
    preemptions: int = 0  # sequences sent back to the queue for want of blocks since start-up
    decode_path: str = ""  # ModelRunner.path: attention, graphs or eager, kernels; a fallback says so
    device_check: dict | None = None  # DeviceCheck.as_dict() of the check(s) run at start-up, None when not run
    kernels: dict[str, int] = field(default_factory=dict)  # quantized layers per kernel (LoadedModel.kernels)
    dense_kernels: dict[str, int] = field(default_factory=dict)  # other linears per path (LoadedModel.dense_kernels)
    memory_bytes: dict[str, int] = field(default_factory=dict)  # LoadedModel.memory_bytes() plus "kv_cache"
    adapters: dict[str, str] = field(default_factory=dict)  # loaded adapter -> its kind ("ptuning" | "lora")
