"""Attention over the paged KV cache, read in place: what one packed forward needs to know about its sequences.

The cache is a pool of fixed-size blocks (serve_app.model.chatglm2.KVCache); a sequence's keys live in the blocks its
block table lists, in order (position p is in block table[p // block_size] at offset p % block_size). A slot cache
is the special case of one block per sequence, as long as its context: a table of one entry, the slot.

A step packs every scheduled token into one row of N tokens: each sequence contributes a contiguous `Span` (a prefill
chunk or one decode token). The host knows every span's block table, first position and length, so nothing in here
reads a tensor back from the device.

Two backends, chosen by measurement (docs/design.md, "Attention"), and the old formulation as a baseline:

- `SlotViewAttention` (eager; the CPU path): one grouped matmul per span against the span's own keys, taken as a
  view of the cache when its blocks are consecutive (the allocator hands out runs where it can) and gathered block
  by block otherwise (no boolean mask; each sequence reads exactly its own keys). Query heads are grouped
  by their key/value head, so multi-query attention is a [G, heads/G * T, D] x [G, D, L] product, never an expansion
  of K/V to all heads.
- `FlexSlotAttention` (the GPU decode path): `flex_attention` with the whole layer cache as one key/value sequence
  of `blocks * block_size` tokens and a block mask whose key blocks are each decode row's block table up to its
  length (torch's paged-attention idea: the page table is the block mask), so the kernel skips every other block.
  The mask is built once per step (`prepare`) from tensors of fixed shape (block table and length per row, padded to
  a row bucket), so a decode step can be captured in a CUDA graph and compiled for a few static batch sizes. In a mixed step the decode rows still go through flex and the prefill spans through
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

FLEX_BLOCK = 128  # key block of the flex block mask; the cache's block_size is a multiple of it for this backend
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


def as_table(blocks: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """A block table from a table or a slot (a slot is a table of one block)."""
    return (blocks,) if isinstance(blocks, int) else tuple(blocks)


@dataclass(frozen=True)
class Span:
    """One sequence's tokens in a packed step: rows [start, start + length) at positions [position, + length), whose
    keys live in `blocks` (its block table, at least up to kv_len; an int is a slot: a table of one block).

    `offset`: positions before the sequence's first token that hold a fixed prefix's KV (a P-tuning v2 prefix): they
    are attended to like any earlier key, and the tokens' rotary positions start after them at 0 (position - offset),
    as the original code keeps the prompt's position ids unshifted."""

    start: int
    length: int
    blocks: tuple[int, ...]
    position: int
    offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "blocks", as_table(self.blocks))

    @property
    def kv_len(self) -> int:
        return self.position + self.length

    def used_blocks(self, block_size: int) -> tuple[int, ...]:
        """The blocks holding positions [0, kv_len)."""
        return self.blocks[: -(-self.kv_len // block_size)]

    def run_start(self, block_size: int) -> int | None:
        """The first block when the used blocks are consecutive (the keys are one view of the cache), else None."""
        used = self.used_blocks(block_size)
        first = used[0]
        return first if all(b == first + i for i, b in enumerate(used)) else None


@dataclass
class StepPlan:
    """What every layer of one packed forward needs. Built on the host from spans; its tensors are on the device.

    input_ids, positions, write_index: [N] int64 (positions: rotary ones, which a span's offset shifts; write_index: where each token's K/V goes in the layer's cache viewed
    as one sequence of blocks * block_size tokens: table[p // block_size] * block_size + p % block_size).
    logit_rows: [R] int64, the packed rows whose logits are wanted (usually each span's last token).
    decode_tables [D, W], decode_lens [D]: int64 block tables (padded with their first block) and key lengths of the
    one-token spans (the flex backend's inputs), None when there are none; decode_rows [D] is None too when every span
    is one token (then the decode rows are all rows).
    gathers: span index -> its used blocks [n] on the device, for the spans whose blocks are not one run (built once
    per step, not per layer).
    """

    spans: list[Span]
    input_ids: Tensor
    positions: Tensor
    write_index: Tensor
    logit_rows: Tensor
    decode_tables: Tensor | None = None
    decode_lens: Tensor | None = None
    decode_rows: Tensor | None = None
    block_size: int = 0
    gathers: dict[int, Tensor] = field(default_factory=dict)
    # span index -> (start, stop) of its keys in the layer cache viewed as one sequence, for spans whose blocks run
    runs: dict[int, tuple[int, int]] = field(default_factory=dict)
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
    spans: list[Span], token_ids: list[int], block_size: int, device, logit_rows: list[int] | None = None,
    table_width: int | None = None,
) -> StepPlan:
    """One host-to-device copy of the step's tokens and integer metadata (pinned, asynchronous on CUDA).

    token_ids [N] are the packed tokens in span order; logit_rows defaults to every span's last token. table_width:
    the width of the decode rows' tables (fixed per cache, so compiled kernels see one shape); default: the widest."""
    positions, write_index = [], []
    for s in spans:
        if len(s.blocks) * block_size < s.kv_len:
            raise ValueError(f"a span up to position {s.kv_len} with {len(s.blocks)} blocks of {block_size} tokens")
        positions += range(s.position - s.offset, s.kv_len - s.offset)  # rotary positions
        write_index += [s.blocks[p // block_size] * block_size + p % block_size for p in range(s.position, s.kv_len)]
    rows = logit_rows if logit_rows is not None else [s.start + s.length - 1 for s in spans]
    decode = [s for s in spans if s.length == 1]
    width = table_width or max((len(s.blocks) for s in decode), default=1)
    host = token_ids + positions + write_index + rows
    for s in decode:
        host += s.blocks[:width] + (s.blocks[0],) * (width - len(s.blocks))
    host += [s.kv_len for s in decode] + [s.start for s in decode]
    gathered, runs = [], {}
    for i, s in enumerate(spans):
        first = s.run_start(block_size)
        if first is not None:
            runs[i] = (first * block_size, first * block_size + s.kv_len)
        else:
            gathered.append((i, s.used_blocks(block_size)))
    for _, used in gathered:
        host += used
    packed = torch.tensor(host, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    n, r = len(positions), len(rows)
    if len(token_ids) != n:
        raise ValueError(f"{len(token_ids)} token ids for spans covering {n} tokens")
    plan = StepPlan(spans, packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], packed[3 * n : 3 * n + r],
                    block_size=block_size, runs=runs)
    base = 3 * n + r
    if decode:
        d = len(decode)
        plan.decode_tables = packed[base : base + d * width].view(d, width)
        base += d * width
        plan.decode_lens = packed[base : base + d]
        if d < len(spans):
            plan.decode_rows = packed[base + d : base + 2 * d]
        base += 2 * d
    for index, used in gathered:
        plan.gathers[index] = packed[base : base + len(used)]
        base += len(used)
    return plan


def span_keys(layer: Tensor, flat: Tensor, plan: StepPlan, index: int) -> Tensor:
    """Span `index`'s keys (or values) [G, kv_len, D] from a layer's cache [G, blocks, block_size, D] (`flat`: the
    same viewed as [G, blocks * block_size, D]): a view when its blocks are one run, else a gather of its blocks (one
    copy)."""
    run = plan.runs.get(index)
    if run is not None:
        return flat[:, run[0] : run[1]]
    return layer.index_select(1, plan.gathers[index]).flatten(1, 2)[:, : plan.spans[index].kv_len]


class SlotViewAttention:
    """Per-span grouped matmuls against views of the cache (see the module docstring)."""

    name = "slot-view"

    def prepare(self, plan: StepPlan, cache) -> None:
        """Nothing to build per step (the flex backend builds its block mask here)."""

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan, skip_single: bool = False):
        """q [N, heads, D]; layer_k/v [kv_heads, blocks, block_size, D] (the cache, already holding this step's keys).

        Returns [N, heads * D]. With skip_single, one-token spans are left for the caller (their rows unset)."""
        tokens, heads, dim = q.shape
        groups = layer_k.shape[0]
        per_group = heads // groups
        scale = 1.0 / math.sqrt(dim)
        out = q.new_empty(tokens, heads * dim)
        flat_k, flat_v = layer_k.flatten(1, 2), layer_v.flatten(1, 2)  # views: [G, blocks * block_size, D]
        for index, span in enumerate(plan.spans):
            if skip_single and span.length == 1:
                continue
            t, length = span.length, span.kv_len
            keys = span_keys(layer_k, flat_k, plan, index)  # [G, L, D]: a view when the blocks run
            values = span_keys(layer_v, flat_v, plan, index)
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
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
        if plan.decode_tables is None:
            return
        if hasattr(cache, "note_tables"):  # what the mask_mod reads (graph replays note it in DecodeGraphs.run)
            cache.note_tables(span.blocks for span in plan.spans)
        rows = plan.decode_tables.shape[0]
        pad = padded_rows(rows) - rows
        tables, lens = plan.decode_tables, plan.decode_lens
        if pad:  # padding rows repeat the first row's reads; their outputs are dropped
            tables = torch.cat((tables, tables[:1].expand(pad, -1)))
            lens = torch.cat((lens, lens[:1].expand(pad)))
        logical = getattr(cache, "block_logical", None)
        if logical is None:
            logical = block_positions(tables, lens, cache.k[0].shape[1], cache.block_size)
        plan.block_mask = decode_block_mask(tables, lens, logical, cache.block_size)

    def __call__(self, q: Tensor, layer_k: Tensor, layer_v: Tensor, plan: StepPlan) -> Tensor:
        if plan.decode_tables is None:
            return self._fallback(q, layer_k, layer_v, plan)
        groups, blocks, block_size, dim = layer_k.shape
        keys = layer_k.view(1, groups, blocks * block_size, dim)  # the cache as one sequence: no copy
        values = layer_v.view(1, groups, blocks * block_size, dim)
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
            plan = StepPlan([], empty, empty, empty, empty, torch.zeros(rows, cache.table_width, **long),
                            torch.ones(rows, **long))
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
    """q [B, heads, 1, D]; keys/values [1, G, blocks * block_size, D] -> [B, heads, 1, D]."""
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
        if plan.decode_tables is None or plan.decode_rows is not None:
            return self._fallback(q, layer_k, layer_v, plan)
        span = max(s.kv_len for s in plan.spans)  # known on the host
        rows, width = plan.decode_tables.shape
        groups, _, block_size, dim = layer_k.shape

        def gather(layer: Tensor) -> Tensor:  # every row's blocks, to a contiguous [B, G, span, D]
            picked = layer.index_select(1, plan.decode_tables.flatten()).view(groups, rows, width * block_size, dim)
            return picked[:, :, :span].transpose(0, 1).to(q.dtype)

        keys, values = gather(layer_k), gather(layer_v)
        mask = torch.arange(span, device=q.device)[None, :] < plan.decode_lens[:, None]  # [B, S]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None, :],
                                             enable_gqa=True)  # [B, heads, 1, D]
        return out.reshape(q.shape[0], -1)


def flex_decode(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, lens: Tensor, block_size: int) -> Tensor:
    """q [B, heads, 1, D]; keys/values [1, G, blocks * block_size, D]; tables [B, W] (or slots [B]), lens [B]."""
    tables = tables[:, None] if tables.dim() == 1 else tables
    logical = block_positions(tables, lens, keys.shape[2] // block_size, block_size)
    return _flex_call(q, keys, values, decode_block_mask(tables, lens, logical, block_size))


def block_positions(tables: Tensor, lens: Tensor, num_blocks: int, block_size: int) -> Tensor:
    """[num_blocks] int64: each block's index in the tables that use it up to their lengths, -1 for the rest (what a
    paged KVCache keeps as `block_logical`; computed here for callers without one)."""
    used = (lens + block_size - 1) // block_size
    logical = torch.arange(tables.shape[1], device=tables.device)
    listed = logical[None, :] < used[:, None]
    out = torch.full((num_blocks + 1,), -1, dtype=torch.int64, device=tables.device)
    out.scatter_(0, torch.where(listed, tables, num_blocks).flatten(), torch.where(listed, logical, -1).flatten())
    return out[:num_blocks]


def decode_block_mask(tables: Tensor, lens: Tensor, block_logical: Tensor, block_size: int):
    """Block mask for rows [B] of one query each over keys [num_blocks * block_size]: row b sees the first lens[b]
    positions of the sequence whose block table is tables[b] ([B, W] cache blocks, padded with anything).

    block_logical [num_blocks]: each block's index in the tables that use it. It is the same in every table that
    lists the block (a shared block holds the same prefix positions for every sequence), and a paged KVCache keeps
    it up to date (`note_tables`) in a tensor of its own: the mask_mod reads only the step's inputs (inductor's CPU
    flex template takes no buffer computed in the graph), and a CUDA graph reads it by address.

    The key blocks listed per row are its table's, in order, up to its length: the kernel visits nothing else. The
    mask_mod is exact on its own (eager flex evaluates it everywhere): a key is row b's when its block is the row's
    table entry at the block's logical index, and its position is below the row's length. Built from device tensors
    with tensor ops only (no host reads), so it can be captured in a CUDA graph. Its query block is FLEX_Q_BLOCK
    although each row has one query: inductor's CUDA kernels (flex decoding and flex attention) skip every config
    whose BLOCK_M (16 or more) does not divide the mask's query block."""
    from torch.nn.attention.flex_attention import BlockMask

    if block_size % FLEX_BLOCK:
        raise ValueError(f"the flex backend needs a cache block size that is a multiple of {FLEX_BLOCK}, not "
                         f"{block_size}")
    num_blocks = block_logical.shape[0]
    per_block = block_size // FLEX_BLOCK  # flex key blocks per cache block
    total = num_blocks * per_block
    rows, width = tables.shape
    # The table in flex key blocks: [B, W * per_block].
    flex_table = (tables[:, :, None] * per_block + torch.arange(per_block, device=tables.device)).flatten(1)
    used = ((lens + FLEX_BLOCK - 1) // FLEX_BLOCK).to(torch.int32)[:, None, None]  # [B, 1, 1]
    # kv_indices are as wide as the key sequence has blocks (BlockMask's convention); only the first `used` count.
    if width * per_block >= total:
        indices = flex_table[:, :total]
    else:
        indices = torch.cat((flex_table, flex_table.new_zeros(rows, total - width * per_block)), dim=1)
    last = width - 1

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        index = block_logical[block]
        mine = tables[b, index.clamp(0, last)] == block
        return (index >= 0) & mine & (index * block_size + kv_idx % block_size < lens[b])

    return BlockMask.from_kv_blocks(
        used, indices.to(torch.int32)[:, None, None], BLOCK_SIZE=(FLEX_Q_BLOCK, FLEX_BLOCK), mask_mod=mask_mod,
        compute_q_blocks=False, seq_lengths=(1, num_blocks * block_size),
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
