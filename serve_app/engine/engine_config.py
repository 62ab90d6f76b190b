"""EngineConfig: the engine's limits, defined once.

A plain dataclass, not a pydantic model, because the engine also runs where no pydantic is installed (the GPU check
machine). Each field is defined once: its type (a `Literal` for a choice, the attention backends taken from
serve_app/model/attention.py), its default, and in `metadata` its description and lower bound. The Serve config
embeds it as the `engine:` field of AppArgs (serve_app/config.py), where pydantic checks the types; `__post_init__`
checks the bounds, and the choices where no pydantic ran, with a message that names the field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Literal

from serve_app.model.attention import BACKENDS


def _field(default, description: str, minimum: int | None = None):
    return field(default=default, metadata={"description": description, "minimum": minimum})


@cache
def _choices() -> dict[str, tuple]:
    """field name -> its allowed values, for the Literal-typed fields (None allowed where the type says so)."""
    out = {}
    for name, hint in typing.get_type_hints(EngineConfig).items():
        args = typing.get_args(hint)
        literals = [a for a in (args if typing.get_origin(hint) is not Literal else (hint,))
                    if typing.get_origin(a) is Literal]
        if literals:
            out[name] = typing.get_args(literals[0]) + ((None,) if type(None) in args else ())
    return out


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = _field(16, "sequences decoded together (rows of a step)", 1)
    max_seq_len: int | None = _field(None, "context cap in tokens; default min(the model's seq_length, 8192)", 2)
    kv_cache_bytes: int | None = _field(
        None, "KV memory budget, in blocks of block_size tokens (default: max_batch_size sequences of max_seq_len); "
        "sequences take blocks as they grow, so more short ones fit than long ones", 1)
    block_size: int | None = _field(
        None, "tokens per KV block; default 64 on CPU (measured), 128 with the flex backend (its key block; a "
        "multiple of 128 there)", 1)
    max_waiting: int = _field(64, "requests queued in the engine beyond its free slots before 503s", 0)
    prefill_chunk: int = _field(512, "prompt tokens prefilled per step, so long prompts do not stall decodes", 1)
    prefix_caching: bool = _field(
        True, "keep full KV blocks keyed by their prefix and share them with later prompts that start the same way "
        "(system prompts, templates, earlier turns of a chat)")
    attention: Literal[BACKENDS] = _field(
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

    max_adapters: int = _field(
        0, "fine-tuned adapters (P-tuning v2 prefixes, LoRA) loaded at once; 0: none. LoRA takes a slot of the "
        "model's LoRA layers each (memory per targeted module: max_adapters * max_lora_rank * (in + out))", 0)
    max_lora_rank: int = _field(16, "the largest LoRA rank a slot holds (smaller ranks are padded with zeros)", 1)

    def max_seq_len_for(self, model_seq_length: int) -> int:
        """The engine's context cap for a model: max_seq_len, else min(the model's seq_length, 8192)."""
        return self.max_seq_len or min(model_seq_length, 8192)

    def __post_init__(self) -> None:
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:
                shown = ", ".join("unset" if a is None else str(a) for a in allowed)
                raise ValueError(f"{name} must be one of {shown}, not {getattr(self, name)!r}")
        for spec in fields(self):
            value, minimum = getattr(self, spec.name), spec.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{spec.name} must be >= {minimum}, not {value}")
