"""EngineConfig: the engine's limits, defined once.

A plain dataclass (no torch, no pydantic) so the engine runs where neither the Serve stack nor pydantic is installed.
The Serve config validates it as the `engine:` field of AppArgs (serve_app/config.py): each field's `metadata` gives
its description and lower bound, which `__post_init__` enforces with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal


def _field(default, description: str, minimum: int | None = None):
    return field(default=default, metadata={"description": description, "minimum": minimum})


ATTENTION_BACKENDS = ("auto", "slot-view", "flex", "gather")  # serve_app.model.attention.BACKENDS


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = _field(16, "sequences decoded together (= KV cache slots)", 1)
    max_seq_len: int | None = _field(None, "context cap in tokens; default min(the model's seq_length, 8192)", 2)
    kv_cache_bytes: int | None = _field(None, "KV memory budget; fewer slots than max_batch_size if needed", 1)
    max_waiting: int = _field(64, "requests queued in the engine beyond its free slots before 503s", 0)
    prefill_chunk: int = _field(512, "prompt tokens prefilled per step, so long prompts do not stall decodes", 1)
    prefix_caching: bool = _field(True, "reuse the KV a finished sequence leaves in its slot (multi-turn chats)")
    attention: Literal["auto", "slot-view", "flex", "gather"] = _field(
        "auto", "attention over the slot cache (serve_app/model/attention.py); auto: flex on CUDA, slot-view on CPU")
    cuda_graphs: bool | None = _field(None, "replay decode steps from captured CUDA graphs; default: on CUDA only")
    compile_decode: bool | None = _field(
        None, "torch.compile each graph bucket's whole decode step before capturing it; default: off (until a GPU "
        "measurement shows it faster: scripts/gpu_check.sh compares both)")
    device_check: bool | None = _field(
        None, "before serving, compare a few decode steps of the serving path with the eager reference on the same "
        "device (serve_app/engine/device_check.py); default: on CUDA only")
    fallback: Literal["eager"] | None = _field(
        None, "when the device check fails: none (default) refuses to start; eager serves on slot-view attention "
        "without graphs (and dequantize + matmul if the kernels fail too), with a warning, the path in the engine "
        "stats and the chatglm2_decode_fallback metric")

    def context_len(self, model_seq_length: int) -> int:
        """The engine's context cap for a model: max_seq_len, else min(the model's seq_length, 8192)."""
        return self.max_seq_len or min(model_seq_length, 8192)

    def __post_init__(self) -> None:
        if self.fallback not in (None, "eager"):
            raise ValueError(f"fallback must be eager or unset, not {self.fallback!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, not {self.attention!r}")
        for spec in fields(self):
            value, minimum = getattr(self, spec.name), spec.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{spec.name} must be >= {minimum}, not {value}")
