"""Demo checkpoints in the official ChatGLM2 layout, with random weights and a tokenizer trained here.

No machine of this project can download the real weights, so tests, the CPU demo and the benchmarks run on these.
Every tensor has the official name, shape and dtype (fp16); tensors are generated one at a time from a seed derived
from their name, so the 6b preset is written shard by shard without ever holding the model in memory, and the same
preset always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from serve_app.model.checkpoint import ChatGLM2Config, expected_shapes, write_checkpoint

SPECIAL_TOKENS = 5  # [MASK] [gMASK] [sMASK] sop eop, appended after the SentencePiece vocabulary


def _config(**fields) -> ChatGLM2Config:
    base = dict(multi_query_attention=True, multi_query_group_num=2, layernorm_epsilon=1e-5, add_qkv_bias=True)
    return ChatGLM2Config(**(base | fields))


# name -> (config with a placeholder vocabulary, SentencePiece vocabulary size)
PRESETS: dict[str, tuple[ChatGLM2Config, int]] = {
    # Builds and loads in well under a second: for tests.
    "tiny": (_config(num_layers=2, hidden_size=128, ffn_hidden_size=384, kv_channels=32, num_attention_heads=4,
                     padded_vocab_size=0, seq_length=2048), 1000),
    # ~150M parameters with ChatGLM2's proportions (head dim 128, 2 kv groups): CPU benchmarks.
    "small": (_config(num_layers=10, hidden_size=1024, ffn_hidden_size=3456, kv_channels=128, num_attention_heads=8,
                      padded_vocab_size=0, seq_length=8192), 8000),
    # The real chatglm2-6b shapes (12.5 GB in fp16): GPU benchmarks and memory figures.
    "6b": (_config(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128, num_attention_heads=32,
                   padded_vocab_size=65024, seq_length=32768), 8000),
}


def preset_config(preset: str, sp_vocab_size: int) -> ChatGLM2Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config, _ = PRESETS[preset]
    if config.padded_vocab_size:
        return config
    # Like the real model, leave padding rows past the tokenizer's ids (64794 ids in 65024 rows there).
    vocab = sp_vocab_size + SPECIAL_TOKENS
    return replace(config, padded_vocab_size=math.ceil((vocab + 1) / 64) * 64)


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_tensors(config: ChatGLM2Config, seed: int = 0, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Official names and shapes, fp16. Scaled so activations stay O(1) and logits are spread out (no ties).

    Made on `device` (the same seed gives different values on different device types: their generators differ)."""
    for name, shape in expected_shapes(config).items():
        generator = torch.Generator(device=device).manual_seed(_seed(name, seed))
        if name.endswith("inv_freq"):
            rot_dim = config.kv_channels // 2
            tensor = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
        elif name.endswith("layernorm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
        elif name.endswith(".bias"):
            tensor = 0.1 * torch.randn(shape, generator=generator, device=device)
        elif "word_embeddings" in name:
            tensor = torch.randn(shape, generator=generator, device=device)
        else:
            fan_in = shape[1]
            gain = 4.0 if "output_layer" in name else 1.0
            tensor = torch.randn(shape, generator=generator, device=device) * (gain / math.sqrt(fan_in))
        yield name, tensor.to(torch.float16)


def write_demo_checkpoint(
    out: Path | str,
    preset: str = "tiny",
    *,
    safetensors: bool = False,
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of `preset` to `out` in the official layout; returns `out`."""
    from serve_app.model.tokenizer import ChatGLM2Tokenizer, train_demo_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "tokenizer.model"
        train_demo_tokenizer(model_path, PRESETS[preset][1])
        sp_vocab = ChatGLM2Tokenizer(model_path).sp_vocab_size
        config = preset_config(preset, sp_vocab)
        if preset == "6b" and max_shard_bytes is None:
            max_shard_bytes = 2 * 1024**3  # 7 shards, like the official release
        return write_checkpoint(
            out,
            config,
            random_tensors(config, seed),
            tokenizer_model=model_path,
            safetensors=safetensors,
            max_shard_bytes=max_shard_bytes,
        )


def random_model(
    preset: str, precision: str = "auto", device: str = "auto", *, seed: int = 0, weights_device: str | None = None,
    pack_cpu_linears: bool = True,
):
    """A LoadedModel of `preset` with random weights made directly on the target device: no checkpoint, no tokenizer.

    For benchmarks where no checkpoint can be written or read (a GPU machine with only torch). `weights_device`
    makes the tensors elsewhere first (e.g. "cpu", so a CPU and a GPU model get identical weights). The config uses
    the preset's nominal SentencePiece size, so padded_vocab_size is that of a demo checkpoint of the preset.
    """
    from serve_app.model.loader import build_model, resolve_device

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = preset_config(preset, PRESETS[preset][1])
    tensors = random_tensors(config, seed, weights_device or resolve_device(device))
    return build_model(config, tensors, Path(f"random-{preset}"), precision, device, pack_cpu_linears=pack_cpu_linears)
