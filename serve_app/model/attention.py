"""Attention over the slot KV cache, read in place: what one packed forward needs to know about its sequences.

A step packs every scheduled token into one row of N tokens: each sequence contributes a contiguous `Span` (a prefill
chunk or one decode token). The host knows every span's slot, first position and length, so nothing in here reads a
tensor back from the device.

Two backends, chosen by measurement (docs/design.md, "Attention"), and the old formulation as a baseline:

- `SlotViewAttention` (eager; the CPU path): one grouped matmul per span against the span's own slot, taken as a
  view of the cache (no gather, no boolean mask; each sequence reads exactly its own keys). Query heads are grouped
  by their key/value head, so multi-query attention is a [G, heads/G * T, D] x [G, D, L] product, never an expansion
  of K/V to all heads.
- `FlexSlotAttention` (the GPU decode path): `flex_attention` with the whole layer cache as one key/value sequence
  of `slots * max_len` tokens and a block mask that points each decode row at its own slot's blocks up to its length,
  so the kernel skips every other block. Its inputs are tensors of fixed shape (slot and length per row), so a decode
  step can be captured in a CUDA graph. In a mixed step the decode rows still go through flex and the prefill spans
  through the slot-view path.
- `GatherAttention` (`--attention gather`): what the engine did before, gathering every decode row's slot up to the
  longest row and calling SDPA with a boolean mask; kept so benchmarks can compare against it in one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

FLEX_BLOCK = 128  # key block of the flex block mask; the cache's max_len is a multiple of it for this backend


@dataclass(frozen=True)
class Span:
    """One sequence's tokens in a packed step: rows [start, start + length) at positions [position, + length)."""

    start: int
    length: int
    slot: int
    position: int

    @property
    def kv_len(self) -> int:
        return self.position + self.length


@dataclass
class StepPlan:
    """What every layer of one packed forward needs. Built on the host from spans; its tensors are on the device.

    input_ids, positions, write_index: [N] int64 (write_index = slot * max_len + position: where each token's K/V goes).
    logit_rows: [R] int64, the packed rows whose logits are wanted (usually each span's last token).
    decode_rows, decode_slots, decode_lens: [D] int64 for the one-token spans (the flex backend's inputs), None when
    there are none; decode_rows is None too when every span is one token (then the decode rows are all rows).
    """

    spans: list[Span]
    input_ids: Tensor
    positions: Tensor
    write_index: Tensor
    logit_rows: Tensor
    decode_slots: Tensor | None = None
    decode_lens: Tensor | None = None
    decode_rows: Tensor | None = None
    _masks: dict[int, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def causal_mask(self, index: int, dtype: torch.dtype, device) -> Tensor | None:
        """Additive mask [T, kv_len] for a span of T > 1 tokens (none for one token: it sees all its keys).

        Built once per step and shared by every layer."""
        span = self.spans[index]
        if span.length == 1:
            return None
        if index not in self._masks:
            query_pos = torch.arange(span.position, span.kv_len, device=device)[:, None]  # [T, 1]
            key_pos = torch.arange(span.kv_len, device=device)[None, :]  # [1, L]
            self._masks[index] = torch.zeros((), dtype=dtype, device=device).masked_fill(
                key_pos > query_pos, float("-inf")
            ).expand(span.length, span.kv_len).contiguous()
        return self._masks[index]


def plan_step(
    spans: list[Span], token_ids: list[int], max_len: int, device, logit_rows: list[int] | None = None
) -> StepPlan:
    """One host-to-device copy of the step's tokens and integer metadata (pinned, asynchronous on CUDA).

    token_ids [N] are the packed tokens in span order; logit_rows defaults to every span's last token."""
    positions = [p for s in spans for p in range(s.position, s.kv_len)]
    write_index = [s.slot * max_len + p for s in spans for p in range(s.position, s.kv_len)]
    rows = logit_rows if logit_rows is not None else [s.start + s.length - 1 for s in spans]
    decode = [s for s in spans if s.length == 1]
    host = token_ids + positions + write_index + rows
    host += [s.slot for s in decode] + [s.kv_len for s in decode] + [s.start for s in decode]
    packed = torch.tensor(host, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    n, r = len(positions), len(rows)
    if len(token_ids) != n:
        raise ValueError(f"{len(token_ids)} token ids for spans covering {n} tokens")
    plan = StepPlan(spans, packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], packed[3 * n : 3 * n + r])
    if decode:
        d, base = len(decode), 3 * n + r
        plan.decode_slots = packed[base : base + d]
        plan.decode_lens = packed[base + d : base + 2 * d]
        if d < len(spans):
            plan.decode_rows = packed[base + 2 * d : base + 3 * d]
    return plan


class SlotViewAttention:
    """Per-span grouped matmuls against views of the cache (see the module docstring)."""

    name = "slot-view"

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan, skip_single: bool = False):
        """q [N, heads, D]; layer_k/v [kv_heads, slots, max_len, D] (the cache, already holding this step's keys).

        Returns [N, heads * D]. With skip_single, one-token spans are left for the caller (their rows unset)."""
        tokens, heads, dim = q.shape
        groups = layer_k.shape[0]
        per_group = heads // groups
        scale = 1.0 / math.sqrt(dim)
        out = q.new_empty(tokens, heads * dim)
        for index, span in enumerate(plan.spans):
            if skip_single and span.length == 1:
                continue
            t, length = span.length, span.kv_len
            keys = layer_k[:, span.slot, :length].to(q.dtype)  # [G, L, D], a view when dtypes agree
            values = layer_v[:, span.slot, :length].to(q.dtype)
            # [T, heads, D] -> [G, heads/G * T, D]: the rows of one kv group share its keys.
            qg = q[span.start : span.start + t].view(t, groups, per_group, dim).permute(1, 2, 0, 3)
            qg = qg.reshape(groups, per_group * t, dim)
            scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(scale)  # [G, heads/G * T, L]
            mask = plan.causal_mask(index, scores.dtype, scores.device)
            if mask is not None:
                scores = scores.view(groups, per_group, t, length).add_(mask).view(groups, per_group * t, length)
            ctx = torch.bmm(scores.float().softmax(-1).to(values.dtype), values)  # [G, heads/G * T, D]
            ctx = ctx.view(groups, per_group, t, dim).permute(2, 0, 1, 3).reshape(t, heads * dim)
            out[span.start : span.start + t] = ctx
        return out


class FlexSlotAttention:
    """Decode rows through flex_attention over the whole layer cache; prefill spans through `SlotViewAttention`.

    `compile` wraps flex_attention in torch.compile, which it needs to be fast (on CUDA); eager flex materializes
    scores against every cached token and is only fit for correctness tests.
    """

    name = "flex"

    def __init__(self, compile: bool = False):
        # Compiled as a whole (block mask included), so the per-step mask_mod closure is traced, not a new input.
        self._decode = torch.compile(flex_decode) if compile else flex_decode
        self._fallback = SlotViewAttention()

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan) -> Tensor:
        if plan.decode_slots is None:
            return self._fallback(q, layer_k, layer_v, plan)
        groups, slots, max_len, dim = layer_k.shape
        keys = layer_k.view(1, groups, slots * max_len, dim)  # the cache as one sequence: no copy
        values = layer_v.view(1, groups, slots * max_len, dim)
        rows = q if plan.decode_rows is None else q[plan.decode_rows]  # [D, heads, D]
        out = self._decode(rows[:, :, None].to(keys.dtype), keys, values, plan.decode_slots, plan.decode_lens, max_len)
        out = out.to(q.dtype).flatten(1)  # [D, heads, 1, D] -> [D, heads * D]
        if plan.decode_rows is None:
            return out
        # A mixed step: prefill spans through slot views, then the decode rows' flex results in their places.
        merged = self._fallback(q, layer_k, layer_v, plan, skip_single=True)
        return merged.index_copy_(0, plan.decode_rows, out)


class GatherAttention:
    """The formulation this module replaced, kept as a measured baseline (`--attention gather`): decode rows gather
    their slots' keys up to the longest row with index_select and call SDPA with a boolean mask. Prefill spans go
    through `SlotViewAttention`."""

    name = "gather"

    def __init__(self):
        self._fallback = SlotViewAttention()

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan) -> Tensor:
        if plan.decode_slots is None or plan.decode_rows is not None:
            return self._fallback(q, layer_k, layer_v, plan)
        span = max(s.kv_len for s in plan.spans)  # known on the host
        # [G, slots, len, D] viewed slot-major, gathered to a contiguous [B, G, span, D] as the old layout was.
        keys = layer_k.transpose(0, 1)[:, :, :span].index_select(0, plan.decode_slots).to(q.dtype)
        values = layer_v.transpose(0, 1)[:, :, :span].index_select(0, plan.decode_slots).to(q.dtype)
        mask = torch.arange(span, device=q.device)[None, :] < plan.decode_lens[:, None]  # [B, S]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None, :],
                                             enable_gqa=True)  # [B, heads, 1, D]
        return out.reshape(q.shape[0], -1)


def flex_decode(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lens: Tensor, max_len: int) -> Tensor:
    """q [B, heads, 1, D]; keys/values [1, G, slots * max_len, D]; slots, lens [B] -> [B, heads, 1, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = decode_block_mask(slots, lens, keys.shape[2] // max_len, max_len)
    return flex_attention(q, keys, values, block_mask=block_mask, enable_gqa=True)


def decode_block_mask(slots: Tensor, lens: Tensor, num_slots: int, max_len: int):
    """Block mask for rows [B] of one query each over keys [slots * max_len]: row b sees its slot's first lens[b].

    Built from device tensors with tensor ops only (no host reads), so it can be captured in a CUDA graph."""
    from torch.nn.attention.flex_attention import BlockMask

    if max_len % FLEX_BLOCK:
        raise ValueError(f"the flex backend needs a cache length that is a multiple of {FLEX_BLOCK}, not {max_len}")
    per_slot = max_len // FLEX_BLOCK
    total = num_slots * per_slot
    num_blocks = ((lens + FLEX_BLOCK - 1) // FLEX_BLOCK).to(torch.int32)[:, None, None]  # [B, 1, 1]
    # The slot's blocks first, then the rest in order (from_kv_blocks wants every column listed once).
    first = slots[:, None] * per_slot  # [B, 1]
    indices = ((first + torch.arange(total, device=slots.device)[None]) % total).to(torch.int32)[:, None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        # Exact on its own (eager flex evaluates it everywhere); the block list is what makes it sparse.
        offset = kv_idx - slots[b] * max_len
        return (offset >= 0) & (offset < lens[b])

    return BlockMask.from_kv_blocks(
        num_blocks, indices, BLOCK_SIZE=(1, FLEX_BLOCK), mask_mod=mask_mod, compute_q_blocks=False,
        seq_lengths=(1, num_slots * max_len),
    )


BACKENDS = ("auto", "slot-view", "flex", "gather")


def make_backend(name: str, device: torch.device):
    """`auto`: flex (compiled) on CUDA, slot views elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "auto":
        name = "flex" if device.type == "cuda" else "slot-view"
    if name == "flex":
        return FlexSlotAttention(compile=device.type == "cuda")
    if name == "gather":
        return GatherAttention()
    return SlotViewAttention()
