"""ChatGLM2 as a compact PyTorch module whose parameter names are the checkpoint's names.

The model computes what the official code computes (pre-norm blocks, fused QKV with bias, multi-query attention with
`multi_query_group_num` key/value heads, rotary embedding on the first half of each head with interleaved pairs,
SwiGLU MLP whose first half is the gate). It reads and writes a slot-addressed `KVCache`: every running sequence owns
one slot, and one forward call can mix slots of different lengths, which is what continuous batching needs.

serve_app.model.loader builds it from a checkpoint directory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.checkpoint import ChatGLM2Config


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
