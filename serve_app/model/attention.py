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
  of `slots * slot_len` tokens and a block mask that points each decode row at its own slot's blocks up to its length,
  so the kernel skips every other block. The mask is built once per step (`prepare`) from tensors of fixed shape
  (slot and length per row, padded to a row bucket), so a decode step can be captured in a CUDA graph and compiled
  for a few static batch sizes. In a mixed step the decode rows still go through flex and the prefill spans through
  the slot-view path.
- `GatherAttention` (`--attention gather`): what the engine did before, gathering every decode row's slot up to the
  longest row and calling SDPA with a boolean mask; kept so benchmarks can compare against it in one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

FLEX_BLOCK = 128  # key block of the flex block mask; the cache's slot_len is a multiple of it for this backend
# Query block of the decode block mask: a multiple of every BLOCK_M of inductor's CUDA flex kernels (16..128), which
# skip any config it is not a multiple of and then have none left (torch's own default block size).
FLEX_Q_BLOCK = 128
# Decode row counts that get a compiled flex kernel (and a CUDA graph): a step's decode rows are padded up to one.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Distinct input shapes a process may compile flex for (buckets x a few caches); one more raises.
FLEX_RECOMPILE_LIMIT = 4 * len(ROW_BUCKETS)


class CompileLimitHit(RuntimeError):
    """A compiled region met a shape past dynamo's recompile limit. The process can't keep serving: besides the
    missing kernel, torch (2.13 measured, tests/model/test_flex_cuda_rules.py) leaves dynamo's frame-evaluation hook
    installed after this failure, so every later Python call in the process runs through it (~1.7x slower calls,
    arguments kept alive to the end of their frames). The engine stops on it and reports unhealthy."""


def run_under_recompile_limit(fn, limit: int, *args):
    """fn(*args) with dynamo failing, not falling back to eager, past max(its recompile limit, limit)."""
    from torch._dynamo import config as dynamo_config  # (not `import torch._dynamo`: that makes torch a local)
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        with dynamo_config.patch(fail_on_recompile_limit_hit=True,
                                 recompile_limit=max(dynamo_config.recompile_limit, limit)):
            return fn(*args)
    except FailOnRecompileLimitHit as exc:
        raise CompileLimitHit(f"{getattr(fn, '__name__', fn)}: {exc}") from exc


def padded_rows(rows: int) -> int:
    """The smallest row bucket that holds `rows`; past the largest, the next multiple of it."""
    bucket = next((b for b in ROW_BUCKETS if b >= rows), None)
    return bucket if bucket is not None else -(-rows // ROW_BUCKETS[-1]) * ROW_BUCKETS[-1]


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

    input_ids, positions, write_index: [N] int64 (write_index = slot * slot_len + position: where each token's K/V goes).
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
    block_mask: object | None = None  # the flex backend's, built once per step by its `prepare`
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
    spans: list[Span], token_ids: list[int], slot_len: int, device, logit_rows: list[int] | None = None
) -> StepPlan:
    """One host-to-device copy of the step's tokens and integer metadata (pinned, asynchronous on CUDA).

    token_ids [N] are the packed tokens in span order; logit_rows defaults to every span's last token."""
    positions = [p for s in spans for p in range(s.position, s.kv_len)]
    write_index = [s.slot * slot_len + p for s in spans for p in range(s.position, s.kv_len)]
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

    def prepare(self, plan: StepPlan, cache) -> None:
        """Nothing to build per step (the flex backend builds its block mask here)."""

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan, skip_single: bool = False):
        """q [N, heads, D]; layer_k/v [kv_heads, slots, slot_len, D] (the cache, already holding this step's keys).

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

    `prepare` builds the step's block mask once (every layer reads the same slots and lengths); each layer then
    calls flex_attention with it. The decode rows are padded to a row bucket (`padded_rows`) so that a compiled
    kernel exists for a handful of batch sizes only: compiled (`compile=True`, what CUDA needs to be fast; eager flex
    scores every cached key) with `dynamic=False` and `fullgraph=True`, because inductor's CUDA lowering picks its
    decoding kernel only for a static batch. Each new shape compiles under `fail_on_recompile_limit_hit`, so a
    process that runs out of dynamo's cache entries raises instead of silently running eager flex.
    """

    name = "flex"

    def __init__(self, compile: bool = False, backend: str = "inductor", recompile_limit: int = FLEX_RECOMPILE_LIMIT):
        self.compiled = compile
        self._flex = (torch.compile(_flex_call, backend=backend, dynamic=False, fullgraph=True) if compile
                      else _flex_call)
        self._shapes: set[tuple] = set()  # input shapes compiled so far (a new one is the only way to recompile)
        self._recompile_limit = recompile_limit
        self._fallback = SlotViewAttention()

    def prepare(self, plan: StepPlan, cache) -> None:
        """Pad the decode rows to their bucket and build their block mask, once per step."""
        if plan.decode_slots is None:
            return
        rows = plan.decode_slots.shape[0]
        pad = padded_rows(rows) - rows
        slots, lens = plan.decode_slots, plan.decode_lens
        if pad:  # padding rows repeat the first row's reads; their outputs are dropped
            slots = torch.cat((slots, slots[:1].expand(pad)))
            lens = torch.cat((lens, lens[:1].expand(pad)))
        plan.block_mask = decode_block_mask(slots, lens, cache.k[0].shape[1], cache.slot_len)

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan) -> Tensor:
        if plan.decode_slots is None:
            return self._fallback(q, layer_k, layer_v, plan)
        groups, slots, slot_len, dim = layer_k.shape
        keys = layer_k.view(1, groups, slots * slot_len, dim)  # the cache as one sequence: no copy
        values = layer_v.view(1, groups, slots * slot_len, dim)
        rows = q if plan.decode_rows is None else q[plan.decode_rows]  # [D, heads, D]
        count, padded = rows.shape[0], plan.block_mask.kv_num_blocks.shape[0]
        rows = rows[:, :, None].to(keys.dtype)  # [D, heads, 1, D]
        if padded > count:
            rows = torch.cat((rows, rows.new_zeros(padded - count, *rows.shape[1:])))
        elif torch.compiler.is_compiling() and rows.is_cpu:
            # A 4-d buffer of its own: inductor's CPU flex template reads the query's underlying (3-d) layout. (A
            # copy would be elided; a double negation is exact.)
            rows = rows.neg().neg()
        out = self._call(rows, keys, values, plan.block_mask)[:count]
        out = out.to(q.dtype).flatten(1)  # [D, heads, 1, D] -> [D, heads * D]
        if plan.decode_rows is None:
            return out
        # A mixed step: prefill spans through slot views, then the decode rows' flex results in their places.
        merged = self._fallback(q, layer_k, layer_v, plan, skip_single=True)
        return merged.index_copy_(0, plan.decode_rows, out)

    def warmup(self, cache, heads: int, dtype: torch.dtype, max_rows: int) -> list[int]:
        """Compile flex for every row bucket a step of up to max_rows decode rows can pad to; returns them."""
        buckets = [b for b in ROW_BUCKETS if b < max_rows] + [padded_rows(max_rows)]
        long = {"dtype": torch.int64, "device": cache.k[0].device}
        for rows in buckets:
            empty = torch.zeros(0, **long)
            plan = StepPlan([], empty, empty, empty, empty, torch.zeros(rows, **long), torch.ones(rows, **long))
            self.prepare(plan, cache)
            q = torch.zeros(rows, heads, cache.k[0].shape[-1], dtype=dtype, device=cache.k[0].device)
            self(q, cache.k[0], cache.v[0], plan)
        return buckets

    def _call(self, q: Tensor, keys: Tensor, values: Tensor, block_mask) -> Tensor:
        if not self.compiled or torch.compiler.is_compiling():
            # Inside a compiled decode step flex is traced into the step's graph, under the step's own limit.
            return _flex_call(q, keys, values, block_mask) if self.compiled else self._flex(q, keys, values, block_mask)
        shape = (tuple(q.shape), tuple(keys.shape), q.dtype, keys.dtype, q.device)
        if shape in self._shapes:
            return self._flex(q, keys, values, block_mask)
        # A shape not seen yet compiles: past dynamo's limit that must fail, not fall back to eager flex.
        out = run_under_recompile_limit(self._flex, self._recompile_limit, q, keys, values, block_mask)
        self._shapes.add(shape)
        return out


def _flex_call(q: Tensor, keys: Tensor, values: Tensor, block_mask) -> Tensor:
    """q [B, heads, 1, D]; keys/values [1, G, slots * slot_len, D] -> [B, heads, 1, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, keys, values, block_mask=block_mask, enable_gqa=True)


class GatherAttention:
    """The formulation this module replaced, kept as a measured baseline (`--attention gather`): decode rows gather
    their slots' keys up to the longest row with index_select and call SDPA with a boolean mask. Prefill spans go
    through `SlotViewAttention`."""

    name = "gather"

    def __init__(self):
        self._fallback = SlotViewAttention()
        self.prepare = self._fallback.prepare

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


def flex_decode(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lens: Tensor, slot_len: int) -> Tensor:
    """q [B, heads, 1, D]; keys/values [1, G, slots * slot_len, D]; slots, lens [B] -> [B, heads, 1, D]."""
    return _flex_call(q, keys, values, decode_block_mask(slots, lens, keys.shape[2] // slot_len, slot_len))


def decode_block_mask(slots: Tensor, lens: Tensor, num_slots: int, slot_len: int):
    """Block mask for rows [B] of one query each over keys [slots * slot_len]: row b sees its slot's first lens[b].

    Built from device tensors with tensor ops only (no host reads), so it can be captured in a CUDA graph. Its query
    block is FLEX_Q_BLOCK although each row has one query: inductor's CUDA kernels (flex decoding and flex
    attention) skip every config whose BLOCK_M (16 or more) does not divide the mask's query block."""
    from torch.nn.attention.flex_attention import BlockMask

    if slot_len % FLEX_BLOCK:
        raise ValueError(f"the flex backend needs a cache length that is a multiple of {FLEX_BLOCK}, not {slot_len}")
    per_slot = slot_len // FLEX_BLOCK
    total = num_slots * per_slot
    num_blocks = ((lens + FLEX_BLOCK - 1) // FLEX_BLOCK).to(torch.int32)[:, None, None]  # [B, 1, 1]
    # The slot's blocks first, then the rest in order (from_kv_blocks wants every column listed once).
    first = slots[:, None] * per_slot  # [B, 1]
    indices = ((first + torch.arange(total, device=slots.device)[None]) % total).to(torch.int32)[:, None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        # Exact on its own (eager flex evaluates it everywhere); the block list is what makes it sparse.
        offset = kv_idx - slots[b] * slot_len
        return (offset >= 0) & (offset < lens[b])

    return BlockMask.from_kv_blocks(
        num_blocks, indices, BLOCK_SIZE=(FLEX_Q_BLOCK, FLEX_BLOCK), mask_mod=mask_mod, compute_q_blocks=False,
        seq_lengths=(1, num_slots * slot_len),
    )


BACKENDS = ("auto", "slot-view", "flex", "gather")


def make_backend(name: str, device: torch.device, compile: bool | None = None, backend: str = "inductor"):
    """`auto`: flex on CUDA, slot views elsewhere. Flex is compiled on CUDA unless `compile` says otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "auto":
        name = "flex" if device.type == "cuda" else "slot-view"
    if name == "flex":
        return FlexSlotAttention(compile=device.type == "cuda" if compile is None else compile, backend=backend)
    if name == "gather":
        return GatherAttention()
    return SlotViewAttention()
