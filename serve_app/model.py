"""ChatGLM2 as a compact PyTorch module whose parameter names are the checkpoint's names.

The model computes what the official code computes (pre-norm blocks, fused QKV with bias, multi-query attention with
`multi_query_group_num` key/value heads, rotary embedding on the first half of each head with interleaved pairs,
SwiGLU MLP whose first half is the gate). It reads and writes a slot-addressed `KVCache`: every running sequence owns
one slot, and one forward call can mix slots of different lengths, which is what continuous batching needs.

`load_model` builds the module on the meta device and assigns checkpoint tensors one at a time, quantizing the four
block linears on the fly for int8/int4 (or taking the official pre-quantized tensors as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.checkpoint import ChatGLM2Config, CheckpointError, expected_shapes, is_quantized_weight, iter_tensors, read_config

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Quantized layers multiply in bf16 whatever the model's dtype: PyTorch's weight-only kernels are SIMD on CPU only for
# bf16 activations (7-15x faster than fp32 there) and tinygemm int4 on GPU takes bf16 only. The rounding this adds is
# far below the quantization error; norms, attention and the residual stream keep the model's dtype.
KERNEL_DTYPE = torch.bfloat16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in fp32 whatever the activation dtype, as the official code does.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotary_tables(config: ChatGLM2Config, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, kv_channels // 4] for the rotated first half of each head."""
    rot_dim = config.kv_channels // 2
    base = 10000.0 * config.rope_ratio
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    # The official cache is computed in fp32 and then cast to the model's dtype.
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim]; cos/sin [B, T, head_dim // 4]. Rotates adjacent pairs of the first half."""
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))  # [B, T, heads, rot_dim/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


class KVCache:
    """Keys (after rotation) and values for `num_slots` sequences of up to `max_len` tokens each.

    k, v: [num_layers, num_slots, kv_heads, max_len, head_dim]. Memory is allocated once, up front.
    """

    def __init__(self, config: ChatGLM2Config, num_slots: int, max_len: int, *, dtype, device):
        shape = (config.num_layers, num_slots, config.kv_heads, max_len, config.kv_channels)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_rows, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, cache: KVCache | None, slots) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.query_key_value(x)  # [B, T, (heads + 2 * kv_heads) * head_dim]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = apply_rotary(q.unflatten(-1, (self.heads, self.head_dim)), cos, sin)  # [B, T, heads, D]
        k = apply_rotary(k.unflatten(-1, (self.kv_heads, self.head_dim)), cos, sin)  # [B, T, kv_heads, D]
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))

        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv_heads, T, D]
            key_positions = positions  # [B, T]
        else:
            layer_k, layer_v = cache.k[self.layer_number], cache.v[self.layer_number]
            rows = slots[:, None].expand(batch, length)
            layer_k[rows, :, positions] = k.to(layer_k.dtype)
            layer_v[rows, :, positions] = v.to(layer_v.dtype)
            span = int(positions.max()) + 1
            # Narrow to the used span before gathering the batch's slots: far cheaper than advanced indexing.
            keys = layer_k[:, :, :span].index_select(0, slots).to(q.dtype)  # [B, kv_heads, span, D]
            values = layer_v[:, :, :span].index_select(0, slots).to(q.dtype)
            key_positions = torch.arange(span, device=x.device).expand(batch, span)
        # A query sees every key at or before its own position; the rest of a slot is stale or empty.
        mask = key_positions[:, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.dense(out.transpose(1, 2).flatten(2))  # [B, T, hidden]


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # the first half is the SiLU gate
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM2Config, layer_number: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, cache, slots):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, positions, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, n) for n in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)


class ChatGLM2ForCausalLM(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.encoder.final_layernorm.weight.dtype

    def rope(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < max_len:
            device = self.transformer.encoder.final_layernorm.weight.device
            length = max(max_len, min(self.config.seq_length, 4096))
            self._rope = rotary_tables(self.config, length, device, self.compute_dtype)
        return self._rope

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions [B, T]; slots [B] (with a cache). Returns fp32 logits [B, T or 1, padded_vocab]."""
        t = self.transformer
        cos, sin = self.rope(int(positions.max()) + 1)
        cos, sin = cos[positions], sin[positions]  # [B, T, D/4]
        x = t.embedding.word_embeddings(input_ids).to(self.compute_dtype)  # [B, T, hidden]
        for layer in t.encoder.layers:
            x = layer(x, cos, sin, positions, cache, slots)
        if last_only:
            x = x[:, -1:]
        x = t.encoder.final_layernorm(x)
        head = t.output_layer
        return F.linear(x.to(head.weight.dtype), head.weight).float()


@dataclass
class LoadedModel:
    model: ChatGLM2ForCausalLM
    config: ChatGLM2Config
    checkpoint: Path
    precision: str  # resolved: fp32 | bf16 | fp16 | int8 | int4
    dtype: torch.dtype  # activation dtype
    device: torch.device

    def weight_bytes(self) -> int:
        """Bytes held by parameters and buffers (quantized weights at their packed size)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(device)


def resolve_precision(precision: str, config: ChatGLM2Config, device: torch.device) -> tuple[str, torch.dtype]:
    """(weights precision, activation dtype). `auto` never picks half precision on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    stored_bits = config.quantization_bit
    if precision == "auto":
        precision = {4: "int4", 8: "int8"}.get(stored_bits, "fp16" if device.type == "cuda" else "fp32")
    if stored_bits and precision != f"int{stored_bits}":
        raise CheckpointError(
            f"this checkpoint is pre-quantized to int{stored_bits}; it can only be served as int{stored_bits} "
            f"(asked for {precision}); point the pool at the full-precision checkpoint instead"
        )
    if precision in _FLOAT_DTYPES:
        return precision, _FLOAT_DTYPES[precision]
    # Quantized layers compute in fp16 on GPU and fp32 on CPU, where half matmuls are slow or missing.
    return precision, torch.float16 if device.type == "cuda" else torch.float32


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, attr, tensor)


def load_model(checkpoint: Path | str, precision: str = "auto", device: str = "auto") -> LoadedModel:
    """Build ChatGLM2 from an official checkpoint directory without holding two copies of its weights.

    Raises CheckpointError for a missing file, a wrong model_type, a missing or unexpected tensor, or a shape that
    disagrees with config.json.
    """
    from serve_app import quant

    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    torch_device = resolve_device(device)
    precision, dtype = resolve_precision(precision, config, torch_device)
    bits = {"int8": 8, "int4": 4}.get(precision, 0)
    # Embedding and output layer stay fp16 in quantized models, as officially (also on CPU: the output layer is a
    # memory-bound GEMV there, as fast in fp16 as in fp32, and fp32 copies would cost 2 GB more for the 6B model).
    side_dtype = torch.float16 if bits else dtype

    with torch.device("meta"):
        model = ChatGLM2ForCausalLM(config)
    shapes = expected_shapes(config)
    pending_quantized: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()

    def install_quantized(layer: str, stored: torch.Tensor, scale: torch.Tensor) -> None:
        parent_name, _, child = layer.rpartition(".")
        old = model.get_submodule(layer)
        bias = old.bias if getattr(old, "bias", None) is not None and old.bias.device.type != "meta" else None
        new = quant.QuantizedLinear.from_official(stored, scale, bits, dtype=KERNEL_DTYPE, device=torch_device, bias=bias)
        setattr(model.get_submodule(parent_name), child, new)

    for name, tensor in iter_tensors(checkpoint):
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # derivable from the config
        layer = name.rpartition(".")[0]
        if config.quantization_bit and name.endswith(".weight_scale"):
            pending_quantized.setdefault(layer, {})["scale"] = tensor
            seen.add(name)
        elif name not in shapes:
            raise CheckpointError(f"unexpected tensor {name!r} in {checkpoint}: is this a ChatGLM2 checkpoint?")
        elif is_quantized_weight(name) and config.quantization_bit:
            out_features, in_features = shapes[name]
            packed_in = in_features // 2 if config.quantization_bit == 4 else in_features
            if tuple(tensor.shape) != (out_features, packed_in) or tensor.dtype != torch.int8:
                raise CheckpointError(
                    f"{name}: expected int8 {[out_features, packed_in]} for quantization_bit="
                    f"{config.quantization_bit}, found {tensor.dtype} {list(tensor.shape)}"
                )
            pending_quantized.setdefault(layer, {})["weight"] = tensor
        else:
            if tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(
                    f"{name}: shape {list(tensor.shape)} disagrees with config.json (expected {list(shapes[name])})"
                )
            if is_quantized_weight(name) and bits:
                q, scale = quant.quantize_rows(tensor.to(torch.float16), bits)  # q int8 [out, in]
                install_quantized(layer, quant.pack_int4(q) if bits == 4 else q, scale)
            else:
                target = side_dtype if name.startswith(("transformer.embedding", "transformer.output_layer")) else dtype
                module = model.get_submodule(layer)
                if isinstance(module, quant.QuantizedLinear):  # the qkv bias arrived after its weight
                    module.bias = tensor.to(device=torch_device, dtype=dtype)
                else:
                    # copy=True: never keep a view of the memory-mapped shard (the file may change later).
                    _set_tensor(model, name, tensor.to(device=torch_device, dtype=target, copy=True))
        seen.add(name)
        pending = pending_quantized.get(layer)
        if pending is not None and len(pending) == 2:
            install_quantized(layer, pending["weight"], pending["scale"])
            del pending_quantized[layer]

    missing = [name for name in shapes if name not in seen and not name.endswith("inv_freq")]
    if config.quantization_bit:
        missing += [f"{layer}.{'weight' if 'weight' not in parts else 'weight_scale'}" for layer, parts in pending_quantized.items()]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    model.eval()
    return LoadedModel(model, config, checkpoint, precision, dtype, torch_device)
