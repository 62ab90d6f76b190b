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
class TokenDelta:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    stats: RequestStats | None = None  # on the last delta


@dataclass
class EngineStats:
    running: int
    waiting: int
    free_slots: int
    num_slots: int
    max_seq_len: int
    kv_tokens_in_use: int  # tokens of running sequences held in the KV cache (cached prefixes excluded)
    kv_capacity_tokens: int
    kv_cache_bytes: int
    cached_prefix_slots: int  # free slots still holding a finished sequence's KV for reuse
    total_requests: int
    finished: dict[str, int]  # finish reason -> count
    steps: int
    decode_path: str = ""  # ModelRunner.path: attention, graphs or eager, kernels; a fallback says so
    device_check: dict | None = None  # DeviceCheck.as_dict() of the check(s) run at start-up, None when not run
    kernels: dict[str, int] = field(default_factory=dict)  # quantized layers per kernel (LoadedModel.kernels)
    dense_kernels: dict[str, int] = field(default_factory=dict)  # other linears per path (LoadedModel.dense_kernels)
    memory_bytes: dict[str, int] = field(default_factory=dict)  # LoadedModel.memory_bytes() plus "kv_cache"
