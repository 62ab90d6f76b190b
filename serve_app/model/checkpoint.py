"""ChatGLM2 checkpoints on disk, in the official layout.

Reading never executes anything shipped in the directory: the config is parsed as JSON, `.bin` shards are opened
with `torch.load(weights_only=True, mmap=True)` and safetensors through `safe_open`, one shard at a time, so a 6B
checkpoint can be streamed into a model without holding two copies of it. Writing produces exactly the layout the
official release uses (config field names, tensor names, shard names and index files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

# The four linear layers of each block that the official int4/int8 format quantizes.
QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

# What the official release ships beside the weights; kept so the original code can load what we write.
_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm2-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files, has the wrong model type, or disagrees with its config."""


@dataclass(frozen=True)
class ChatGLM2Config:
    """The fields of a ChatGLM2 `config.json` that decide the computation (names as in the file)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    kv_channels: int
    num_attention_heads: int
    multi_query_attention: bool
    multi_query_group_num: int
    padded_vocab_size: int
    seq_length: int
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    rope_ratio: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    quantization_bit: int = 0

    @property
    def kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.kv_heads) * self.kv_channels

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.kv_heads * self.kv_channels * element

    @classmethod
    def from_dict(cls, raw: dict) -> ChatGLM2Config:
        model_type = raw.get("model_type")
        if model_type != "chatglm":
            raise CheckpointError(f"config.json has model_type {model_type!r}; a ChatGLM2 checkpoint has 'chatglm'")
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items() if f.default is MISSING and name not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks required field(s): {', '.join(missing)}")
        values = {name: raw[name] for name in known if name in raw and raw[name] is not None}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        unsupported = {
            "rmsnorm": (self.rmsnorm, True),
            "post_layer_norm": (self.post_layer_norm, True),
            "add_bias_linear": (self.add_bias_linear, False),
            "apply_residual_connection_post_layernorm": (self.apply_residual_connection_post_layernorm, False),
            "original_rope": (self.original_rope, True),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise CheckpointError(f"config.json sets {name}={value}; ChatGLM2 models use {wanted} (unsupported)")
        if self.quantization_bit not in (0, 4, 8):
            raise CheckpointError(f"config.json sets quantization_bit={self.quantization_bit}; supported: 4, 8 or none")
        if self.kv_channels % 4:
            raise CheckpointError(f"kv_channels={self.kv_channels} must be a multiple of 4 (rotary half-dims pairs)")
        if self.num_attention_heads % self.kv_heads:
            raise CheckpointError("num_attention_heads must be a multiple of multi_query_group_num")

    def to_official_dict(self) -> dict:
        """config.json as the official release writes it (plus the fields its python class needs)."""
        raw = {
            "_name_or_path": "THUDM/chatglm2-6b",
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": _AUTO_MAP,
            "apply_query_key_layer_scaling": True,
            "attention_softmax_in_fp32": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "bias_dropout_fusion": True,
            "fp32_residual_connection": False,
            "tie_word_embeddings": False,
            "use_cache": True,
            "transformers_version": "4.27.1",
        }
        raw.update(asdict(self))
        if raw["rope_ratio"] == 1.0:
            del raw["rope_ratio"]  # chatglm2-6b's file has no such field
        if not raw["quantization_bit"]:
            del raw["quantization_bit"]
        return raw


def read_config(checkpoint: Path | str) -> ChatGLM2Config:
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {checkpoint} a ChatGLM2 checkpoint directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return ChatGLM2Config.from_dict(raw)


def weight_files(checkpoint: Path | str) -> list[Path]:
    """The weight shards of a checkpoint, safetensors preferred when both formats are present."""
    root = Path(checkpoint)
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            absent = [name for name in shards if not (root / name).is_file()]
            if absent:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(absent)}")
            return [root / name for name in shards]
        if (root / single_name).is_file():
            return [root / single_name]
    raise CheckpointError(
        f"no weights in {root}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}"
    )


def iter_tensors(checkpoint: Path | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard; only one shard is mapped at a time."""
    for path in weight_files(checkpoint):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        else:
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # pickle errors, truncated zip, non-tensor payloads refused by weights_only
                raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {exc}") from exc
            names = list(shard)
            for name in names:
                yield name, shard.pop(name)
            del shard


class ShardWriter:
    """Writes tensors into official-style shards as they come, never holding more than one shard in memory."""

    def __init__(self, out: Path, *, safetensors: bool = False, max_shard_bytes: int | None = None):
        self.out = Path(out)
        self.safetensors = safetensors
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self._written):05d}.tmp"
        if self.safetensors:
            from safetensors.torch import save_file

            save_file(self._pending, str(path), metadata={"format": "pt"})
        else:
            torch.save(self._pending, path)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._written:
            self._flush()
        suffix = "safetensors" if self.safetensors else "bin"
        if len(self._written) == 1:
            final = self.out / (SAFETENSORS_SINGLE if self.safetensors else BIN_SINGLE)
            os.replace(self._written[0][0], final)
            return [final]
        count = len(self._written)
        stem = "model" if self.safetensors else "pytorch_model"
        weight_map, finals = {}, []
        for number, (tmp, names) in enumerate(self._written, start=1):
            final = self.out / f"{stem}-{number:05d}-of-{count:05d}.{suffix}"
            os.replace(tmp, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        index_name = SAFETENSORS_INDEX if self.safetensors else BIN_INDEX
        (self.out / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return finals


def write_checkpoint(
    out: Path | str,
    config: ChatGLM2Config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    tokenizer_model: Path | bytes | None = None,
    safetensors: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, tokenizer files and the tensors (consumed lazily) in the official layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_official_dict(), indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    if tokenizer_model is not None:
        data = tokenizer_model if isinstance(tokenizer_model, bytes) else Path(tokenizer_model).read_bytes()
        (out / TOKENIZER_FILE).write_bytes(data)
    writer = ShardWriter(out, safetensors=safetensors, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    return out


def expected_shapes(config: ChatGLM2Config) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes of an unquantized checkpoint, in the official order."""
    hidden, ffn, vocab = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (vocab, hidden)}
    for n in range(config.num_layers):
        p = f"transformer.encoder.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.query_key_value.weight"] = (config.qkv_rows, hidden)
        if config.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (config.qkv_rows,)
        shapes[p + "self_attention.dense.weight"] = (hidden, config.num_attention_heads * config.kv_channels)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * ffn, hidden)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (hidden, ffn)
    shapes["transformer.encoder.final_layernorm.weight"] = (hidden,)
    shapes["transformer.rotary_pos_emb.inv_freq"] = (config.kv_channels // 4,)
    shapes["transformer.output_layer.weight"] = (vocab, hidden)
    return shapes


def is_quantized_weight(name: str) -> bool:
    return name.endswith(".weight") and any(f".{layer}." in name for layer in QUANTIZED_LINEARS)


def quantized_tensors(checkpoint: Path | str, bits: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in the official pre-quantized format: the four block linears become
    `...weight` (int8; int4 packed two per byte) + `...weight_scale` (fp16 [out]); everything else is carried over."""
    from serve_app.model.quant import pack_int4, quantize_rows

    for name, tensor in iter_tensors(checkpoint):
        if not is_quantized_weight(name):
            yield name, tensor
            continue
        q, scale = quantize_rows(tensor.to(torch.float16), bits)  # q int8 [out, in], scale fp16 [out]
        yield name, pack_int4(q) if bits == 4 else q  # int4: [out, in / 2]
        yield name + "_scale", scale


def quantize_checkpoint(src: Path | str, out: Path | str, bits: int, *, max_shard_bytes: int | None = None) -> Path:
    """Write `src` (full precision) to `out` as an official int8/int4 checkpoint, one tensor at a time."""
    from dataclasses import replace

    if bits not in (4, 8):
        raise CheckpointError(f"--bits must be 4 or 8, not {bits}")
    config = read_config(src)
    if config.quantization_bit:
        raise CheckpointError(f"{src} is already quantized (quantization_bit={config.quantization_bit})")
    safetensors = weight_files(src)[0].suffix == ".safetensors"
    return write_checkpoint(
        out,
        replace(config, quantization_bit=bits),
        quantized_tensors(src, bits),
        tokenizer_model=Path(src) / TOKENIZER_FILE,
        safetensors=safetensors,
        max_shard_bytes=max_shard_bytes,
    )
