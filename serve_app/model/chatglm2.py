"""ChatGLM2 as a compact PyTorch module whose parameter names are the checkpoint's names.

The model computes what the official code computes (pre-norm blocks, fused QKV with bias, multi-query attention with
`multi_query_group_num` key/value heads, rotary embedding on the first half of each head with interleaved pairs,
SwiGLU MLP whose first half is the gate). It reads and writes a paged `KVCache`: every running sequence owns the
blocks of its block table, and one packed forward (`forward_packed`) runs the decode tokens and prefill chunks of any
number of sequences together, which is what continuous batching needs. Attention itself lives in serve_app.model.attention.

serve_app.model.loader builds it from a checkpoint directory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.attention import SlotViewAttention, Span, StepPlan, plan_step
from serve_app.model.checkpoint import ChatGLM2Config
from serve_app.model.cpu_linear import PackedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in fp32 whatever the activation dtype, as the official code does.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotary_tables(config: ChatGLM2Config, num_positions: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [num_positions, kv_channels // 4] for the rotated first half of each head."""
    rot_dim = config.kv_channels // 2
    base = 10000.0 * config.rope_ratio
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32, device=device), inv_freq)
    # The official cache is computed in fp32 and then cast to the model's dtype.
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos/sin [..., head_dim // 4]. Rotates adjacent pairs of the first half."""
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))  # [..., heads, rot_dim/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


class KVCache:
    """Keys (after rotation) and values in `num_blocks` blocks of `block_size` tokens (serve_app.model.attention: a
    sequence's positions live in the blocks of its block table, at most `table_width` of them). A slot cache is one
    block per sequence, as long as its context (`table_width` 1).

    k[layer], v[layer]: [kv_heads, blocks, block_size, head_dim], one tensor per layer, each of them its own
    allocation: a layer's [kv_heads, blocks * block_size, head_dim] is one contiguous view, which the flex backend
    reads as a single key sequence, and no layer's view starts at an offset into a larger tensor (inductor's CPU flex
    kernel ignores such an offset and reads layer 0's keys for every layer). With `scratch`, one more block past
    `num_blocks` takes the writes of padding rows (CUDA-graph buckets) so they never touch a real sequence. Memory
    is allocated once, up front.
    """

    def __init__(self, config: ChatGLM2Config, num_blocks: int, block_size: int, *, dtype, device,
                 scratch: bool = False, table_width: int = 1):
        shape = (config.kv_heads, num_blocks + int(scratch), block_size, config.kv_channels)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.table_width = table_width
        self.scratch_block = num_blocks if scratch else None
        # Each block's index in the tables that use it (attention.decode_block_mask), on the device and mirrored here.
        blocks = num_blocks + int(scratch)
        self.block_logical = torch.zeros(blocks, dtype=torch.int64, device=device)
        self._logical = [0] * blocks

    def note_tables(self, tables) -> None:
        """Record where each block of these tables sits in them, before a step reads them (one small copy when a
        table has a block at a new index, none otherwise)."""
        changed = {}
        for table in tables:
            for index, block in enumerate(table):
                if self._logical[block] != index:
                    changed[block] = index
        if changed:
            for block, index in changed.items():
                self._logical[block] = index
            self.block_logical[torch.tensor(list(changed), device=self.block_logical.device)] = torch.tensor(
                list(changed.values()), device=self.block_logical.device)

    def copy_positions(self, copies: list[tuple[int, int, int]]) -> None:
        """For each (src, dst, count): positions [0, count) of block src into block dst, keys and values, every
        layer (a sequence taking the KV another computed for the same tokens at the same positions)."""
        for src, dst, count in copies:
            for cache in (self.k, self.v):
                for layer in cache:
                    layer[:, dst, :count] = layer[:, src, :count]

    def disjoint_tables(self, rows: int, length: int) -> list[tuple[int, ...]]:
        """Block tables of `length` tokens for up to `rows` sequences that share no block (checks and benchmarks that
        run on a cache outside an engine): as many rows as the cache holds."""
        per_row = -(-length // self.block_size)
        if per_row > self.table_width:
            raise ValueError(f"{length} tokens exceed this cache's {self.max_positions} per sequence")
        rows = min(rows, self.num_blocks // per_row)
        return [tuple(range(r * per_row, (r + 1) * per_row)) for r in range(rows)]

    @property
    def max_positions(self) -> int:
        """The longest sequence a table can hold."""
        return self.block_size * self.table_width

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_rows, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def _qkv(self, x, cos, sin):
        qkv = self.query_key_value(x)  # [..., (heads + 2 * kv_heads) * head_dim]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = apply_rotary(q.unflatten(-1, (self.heads, self.head_dim)), cos, sin)  # [..., heads, D]
        k = apply_rotary(k.unflatten(-1, (self.kv_heads, self.head_dim)), cos, sin)  # [..., kv_heads, D]
        return q, k, v.unflatten(-1, (self.kv_heads, self.head_dim))

    def forward(self, x, cos, sin, plan: StepPlan, cache: KVCache, attention) -> torch.Tensor:
        """x [N, hidden] packed tokens; writes their K/V into the cache, then attends through `attention`."""
        q, k, v = self._qkv(x, cos, sin)  # q [N, heads, D], k/v [N, kv_heads, D]
        layer_k, layer_v = cache.k[self.layer_number], cache.v[self.layer_number]  # [G, blocks, block_size, D]
        flat_k = layer_k.view(self.kv_heads, -1, self.head_dim)  # [G, blocks * block_size, D]
        flat_v = layer_v.view(self.kv_heads, -1, self.head_dim)
        flat_k.index_copy_(1, plan.write_index, k.transpose(0, 1).to(flat_k.dtype))
        flat_v.index_copy_(1, plan.write_index, v.transpose(0, 1).to(flat_v.dtype))
        return self.dense(attention(q, layer_k, layer_v, plan))  # [N, hidden]

    def forward_full(self, x, cos, sin) -> torch.Tensor:
        """x [B, T, hidden] whole sequences, no cache: plain causal attention (the reference path)."""
        q, k, v = self._qkv(x, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )  # [B, heads, T, D]
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

    def forward(self, x, cos, sin, plan: StepPlan, cache: KVCache, attention):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, plan, cache, attention)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_full(self, x, cos, sin):
        x = x + self.self_attention.forward_full(self.input_layernorm(x), cos, sin)
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

    def rope(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering every position up to seq_length (rounded up to a multiple of 1024, which covers a
        cache whose tables were rounded up to whole attention blocks), made once and never reallocated: captured CUDA
        graphs read them by address. `positions` (the most a cache's sequences can hold) is checked against them."""
        if self._rope is None:
            device = self.transformer.encoder.final_layernorm.weight.device
            length = -(-self.config.seq_length // 1024) * 1024
            self._rope = rotary_tables(self.config, length, device, self.compute_dtype)
        if positions > self._rope[0].shape[0]:
            raise ValueError(f"positions up to {positions} exceed the model's seq_length={self.config.seq_length}")
        return self._rope

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer.encoder.final_layernorm(x)
        head = self.transformer.output_layer
        return head(x.to(head.dtype if isinstance(head, PackedLinear) else head.weight.dtype)).float()

    @torch.inference_mode()
    def forward_packed(self, plan: StepPlan, cache: KVCache, attention=None) -> torch.Tensor:
        """One forward over a packed step: plan.input_ids [N] hold every span's tokens (see attention.plan_step).

        Writes the tokens' K/V into their blocks and returns fp32 logits [R, padded_vocab] for plan.logit_rows.
        Reads nothing back from the device: lengths and positions were known on the host when the plan was built.
        """
        return self.packed_step(plan, cache, attention)

    def packed_step(self, plan: StepPlan, cache: KVCache, attention=None) -> torch.Tensor:
        """`forward_packed` without its inference mode: what torch.compile traces (under no_grad), since a compiled
        region that enters inference mode fails on views of tensors made outside it."""
        t = self.transformer
        attention = attention or _SLOT_VIEWS
        attention.prepare(plan, cache)  # what every layer shares (the flex block mask), built once per step
        cos, sin = self.rope(cache.max_positions)  # tables covering the cache, so no position needs reading here
        cos, sin = cos[plan.positions], sin[plan.positions]  # [N, D/4]
        x = t.embedding.word_embeddings(plan.input_ids).to(self.compute_dtype)  # [N, hidden]
        for layer in t.encoder.layers:
            x = layer(x, cos, sin, plan, cache, attention)
        return self._logits(x[plan.logit_rows])  # [R, vocab]

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
        """input_ids, positions [B, T] (each row consecutive positions); slots [B] with a cache
        of one block per sequence (a slot cache).

        Returns fp32 logits [B, T or 1, padded_vocab]. Without a cache every row is a whole sequence from position
        0 (the reference path). With one, the rows become spans of a packed step; this convenience reads positions
        and slots back to the host, which the engine avoids by calling `forward_packed` with a plan it built.
        """
        batch, length = input_ids.shape
        if cache is None:
            cos, sin = self.rope(int(positions.max()) + 1)  # the reference path may read positions
            cos, sin = cos[positions], sin[positions]  # [B, T, D/4]
            x = self.transformer.embedding.word_embeddings(input_ids).to(self.compute_dtype)  # [B, T, hidden]
            for layer in self.transformer.encoder.layers:
                x = layer.forward_full(x, cos, sin)
            return self._logits(x[:, -1:] if last_only else x)
        starts, slot_ids = positions[:, 0].tolist(), slots.tolist()
        spans = [Span(b * length, length, slot_ids[b], starts[b]) for b in range(batch)]
        rows = [s.start + length - 1 for s in spans] if last_only else list(range(batch * length))
        plan = plan_step(spans, input_ids.reshape(-1).tolist(), cache.block_size, input_ids.device, rows)
        logits = self.forward_packed(plan, cache)
        return logits.view(batch, 1 if last_only else length, -1)


_SLOT_VIEWS = SlotViewAttention()
