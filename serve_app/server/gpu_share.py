"""Keeping a replica inside its Ray GPU share.

Ray's `num_gpus: 0.25` is scheduling bookkeeping only: nothing stops the process from taking the whole card. So a
replica on a GPU (the CPU path is unchanged):

1. reads its share from Ray and the device's total memory, and caps PyTorch's allocator at the share less the CUDA
   context (which the allocator does not see): `torch.cuda.set_per_process_memory_fraction`;
2. loads the weights (quantizing on the GPU one layer at a time; the allocator is trimmed afterwards);
3. sizes its KV cache, in blocks, from what is left of the share after the weights and the activation workspace,
   and never more than the device has free. An explicit `kv_cache_bytes` wins over the computed size, but must
   still fit. Sequences take blocks as they grow, so the plan's floor is one sequence of max_seq_len, not a batch.

`plan_memory` and `activation_workspace_bytes` are pure arithmetic (tested without a GPU); `limit_process` and
`plan_replica` are the thin parts that read Ray and CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from serve_app.model.checkpoint import ChatGLM2Config

# What a CUDA context (driver state, library handles, loaded kernels) costs outside PyTorch's allocator: 0.5-1 GB
# measured elsewhere; the upper end, so that the share holds. (cuBLAS's workspaces go through the allocator: they are
# part of the workspace estimate, CUBLAS_WORKSPACE_BYTES.)
DEFAULT_CONTEXT_BYTES = 1 << 30
# The step estimate (`step_phases`) counts the tensors live at a step's peak; this covers the allocator's rounding and
# fragmentation between them.
WORKSPACE_SLACK = 1.25


# Per-element costs and fixed allowances of the workspace estimate (see activation_workspace_bytes).
# Sampling a row of fp32 logits (serve_app/engine/sampling.py) holds, besides the logits themselves, at most: the
# copy `resample_overflow` takes of the overflowing rows (4 B a logit), the tempered logits (4), the full sort's
# values (4) and int64 order (8), the nucleus mask (1), the masked scores (4) and the Gumbel hash: a gathered int64
# table row and mix32's int64 temporaries (~44). Measured: 69 B a logit past the logits and the copy, on a
# 65024-token vocabulary (tests/server/test_gpu_share.py); rounded up.
SAMPLE_BYTES_PER_LOGIT = 80
# Inside a decode graph `sample` never sorts the whole vocabulary (top_p/top_k look at 1024 candidates; the full
# resample runs eagerly afterwards): the tempered logits and the full-vocabulary Gumbel hash. Measured: 45 B.
GRAPH_SAMPLE_BYTES_PER_LOGIT = 48
# The cuBLAS workspace PyTorch allocates through its caching allocator, once per (handle, stream) and kept for the
# process's life: 4096 KiB x 8 = 32 MiB on sm_90 (torch's default CUBLAS_WORKSPACE_CONFIG there; less on older
# GPUs), and as much again for a cuBLASLt workspace where torch keeps a separate one. Two streams run matmuls: the
# current one and the decode graphs' capture stream.
CUBLAS_WORKSPACE_BYTES = (32 << 20) * 2
CUBLAS_STREAMS = 2
# Scratch of compiling and autotuning at warm-up (flex kernels, the compiled decode step), next to an eager decode
# step: Triton's do_bench allocates a 256 MB buffer to flush L2 between timings (inductor's own benchmarker an
# L2-sized one, 50-60 MB on H100/H200). Freed afterwards (the allocator releases cached blocks before failing), so a
# transient peak of its own, not a reservation.
COMPILE_SCRATCH_BYTES = 256 << 20
# Upper bound on the SMs of the GPUs this serves (H100/H200 SXM: 132): flex decoding splits the keys of each
# (row, kv head) into up to ~2 x SMs / (rows x kv heads) partial results, fp32.
MAX_SMS = 144


class MemoryPlanError(ValueError):
    """The replica's share cannot hold what its config asks for; the message says what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    share: float  # the replica's GPU share (Ray's num_gpus), 0 < share <= 1
    total_bytes: int  # the device's memory
    budget_bytes: int  # share * total: everything this process may hold on the device, context included
    memory_fraction: float  # for set_per_process_memory_fraction: the allocator's cap / total
    context_bytes: int
    weight_bytes: int
    workspace_bytes: int
    kv_cache_bytes: int  # the KV budget handed to the engine (whole blocks when block_bytes is known)
    kv_explicit: bool  # kv_cache_bytes came from the config, not from the share
    block_bytes: int = 0  # one KV block of every layer (keys and values); 0 when the plan was not given it
    num_blocks: int = 0  # kv_cache_bytes // block_bytes (the engine takes one of them as its scratch block with graphs)

    def as_dict(self) -> dict:
        return asdict(self)


def memory_fraction(share: float, total_bytes: int, context_bytes: int = DEFAULT_CONTEXT_BYTES) -> float:
    """The allocator's cap for a process that may hold `share` of a device of `total_bytes`, context included."""
    if not 0 < share <= 1:
        raise MemoryPlanError(f"the GPU share must be in (0, 1], not {share}")
    cap = share * total_bytes - context_bytes
    if cap <= 0:
        raise MemoryPlanError(
            f"a share of {share} of {total_bytes / 2**30:.1f} GiB does not even hold the CUDA context "
            f"({context_bytes / 2**30:.1f} GiB): raise num_gpus"
        )
    return cap / total_bytes


def step_phases(
    config: ChatGLM2Config,
    max_batch_size: int,
    prefill_chunk: int,
    max_seq_len: int,
    dtype_bytes: int = 2,
    *,
    attention: str = "auto",
    dequant_bytes: int = 0,
    sample_bytes_per_logit: int = SAMPLE_BYTES_PER_LOGIT,
) -> dict[str, int]:
    """Bytes live at each candidate peak of one eager engine step, counted tensor by tensor (no slack).

    The largest step the scheduler builds is a mixed one: a prefill chunk of T = prefill_chunk tokens (one span, the
    worst case: several spans share the chunk and are attended one at a time) at the end of a cache of
    L = max_seq_len keys, plus a decode token for every other running sequence: N = T + max_batch_size tokens and up
    to R = max_batch_size rows with a token due. Each phase counts what the code holds at that moment:

    - everywhere: the residual stream x [N, hidden], the rotary cos/sin [N, head_dim/4] x 2, the span's additive
      causal mask [T, L] (the step plan keeps it for every layer and until sampling) and the step's int64 metadata;
    - `attention`: the slot-view scores of the span (serve_app/model/attention.py, `SlotViewAttention`): the scores
      [heads, T, L] in the compute dtype, their fp32 copy (none when computing in fp32) and the fp32 softmax, live
      together while softmax runs (10 B a score in fp16: 1.34 GB at 32 heads x 512 x 8192); alongside them the
      input norm, the fused QKV, the rotated q and k, the output buffer and the span's regrouped queries;
    - `norm`: an RMSNorm's fp32 temporaries [N, hidden] x 2 next to x and its sum;
    - `mlp`: x and its sum, the norm, h_to_4h's [N, 2 ffn], SiLU(gate) and the product [N, ffn] each, plus
      `dequant_bytes` when a linear dequantizes its weight for the call (the device check's reference, a fallback);
    - `logits`: the head's [R, vocab] output in the compute dtype, a dtype conversion's copy and the fp32 logits;
    - `sampling`: the fp32 logits and `sample_bytes_per_logit` a logit (the full-sort resample path by default);
    - `gather_decode` (attention="gather" only): a decode step's keys and values gathered per row [B, kv_heads, L,
      head_dim], and SDPA's math path expanding them to every head (the path for a boolean mask with GQA).
    """
    b = dtype_bytes
    hidden, ffn, heads = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    groups, dim, vocab = config.kv_heads, config.kv_channels, config.padded_vocab_size
    t = max(1, min(prefill_chunk, max_seq_len))
    n, rows, keys = t + max_batch_size, max_batch_size, max_seq_len

    upcast = 0 if b == 4 else 4  # scores.float() is a copy unless the scores already are fp32
    scores, context = heads * t * keys, t * heads * dim * b
    span = max(
        scores * (b + upcast + 4),  # scores, fp32 copy and softmax while softmax runs
        scores * (b + 4 + (b if upcast else 0)) + context,  # scores, softmax, its cast back; the context bmm
        scores * b + 2 * context,  # scores, the context and its [T, heads * D] copy
    )
    mask = t * keys * b if t > 1 else 0
    # the step's int64 plan (tokens, positions, write index; rows and decode metadata) and sampling settings
    metadata = (3 * n + 4 * rows) * 8 + rows * 64
    common = n * hidden * b + 2 * n * (dim // 4) * b + mask + metadata
    phases = {
        "attention": common
        + n * (hidden + config.qkv_rows + heads * dim + groups * dim + heads * dim) * b  # norm, qkv, q, k, out
        + context  # the span's queries regrouped by kv head
        + span,
        "norm": common + n * hidden * b + n * hidden * (8 + b),
        "mlp": common + n * (2 * hidden + 4 * ffn) * b + dequant_bytes,
        "logits": common + rows * hidden * (2 * b + 8) + rows * vocab * (2 * b + 4),
        "sampling": mask + metadata + rows * vocab * (4 + sample_bytes_per_logit),
    }
    if attention == "gather":
        d = max_batch_size
        phases["gather_decode"] = (
            d * hidden * b * 2 + d * (config.qkv_rows + 2 * heads * dim) * b
            + 2 * d * groups * keys * dim * b  # index_select of keys and values
            + 2 * d * heads * keys * dim * b  # repeat_interleave to every head (SDPA math path)
            + d * heads * keys * (2 * b + 4) + d * keys * (1 + b)  # scores, softmax; the mask, as bool and float
        )
    return phases


def decode_step_bytes(config: ChatGLM2Config, rows: int, max_seq_len: int, dtype_bytes: int = 2,
                      sample_bytes_per_logit: int = GRAPH_SAMPLE_BYTES_PER_LOGIT, kv_blocks: int | None = None) -> int:
    """The peak of one decode step of `rows` rows through flex (a graph bucket's step): `step_phases` for one-token
    spans, plus flex decoding's fp32 partials and the block mask's index tensors (int64 twice, then int32, over
    every key block of the cache: `kv_blocks` flex blocks of 128, by default a slot cache's) and the bucket's static
    buffers."""
    heads, groups, dim = config.num_attention_heads, config.kv_heads, config.kv_channels
    step = max(step_phases(config, rows, 1, max_seq_len, dtype_bytes,
                           sample_bytes_per_logit=sample_bytes_per_logit).values())
    flex = max(rows * groups, 2 * MAX_SMS) * (heads // groups) * (dim + 2) * 4
    blocks = kv_blocks if kv_blocks is not None else (rows + 1) * -(-max_seq_len // 128)
    return step + flex + rows * blocks * (8 + 8 + 4) + rows * 16 * 8


def decode_graph_bytes(config: ChatGLM2Config, max_batch_size: int, max_seq_len: int, dtype_bytes: int = 2,
                       kv_blocks: int | None = None) -> int:
    """What the captured decode graphs (serve_app/engine/graphs.py) keep reserved in their private pool for good:
    every graph's outputs (ids and fp32 logits [bucket, vocab], one graph per bucket and sampling variant), plus the
    intermediates of the largest bucket's step, which the pool keeps for its replays."""
    from serve_app.engine.graphs import VARIANTS, buckets_for

    buckets = buckets_for(max_batch_size)
    outputs = len(VARIANTS) * sum(bucket * (config.padded_vocab_size * 4 + 8) for bucket in buckets)
    return outputs + decode_step_bytes(config, buckets[-1], max_seq_len, dtype_bytes, kv_blocks=kv_blocks)


def activation_workspace_bytes(
    config: ChatGLM2Config,
    max_batch_size: int,
    prefill_chunk: int,
    max_seq_len: int,
    dtype_bytes: int = 2,
    *,
    device_type: str = "cuda",
    attention: str = "auto",
    cuda_graphs: bool = True,
    dequant_bytes: int = 0,
    kv_blocks: int | None = None,
) -> int:
    """An upper bound on what the replica holds beyond its weights and KV cache, for the KV cache to leave room for.

    The transient peak is the larger of one eager step (`step_phases`: a prefill chunk of `prefill_chunk` tokens
    attending over `max_seq_len` keys through slot-view attention next to a decode token per slot, its logits and
    their sampling; on the 6B model in fp16 the chunk's attention scores dominate) and, on CUDA, the warm-up (an
    eager decode step of the largest bucket next to COMPILE_SCRATCH_BYTES), times WORKSPACE_SLACK for the
    allocator's rounding and fragmentation. On CUDA, add what stays reserved for good once the engine has warmed
    up: the cuBLAS workspaces (CUBLAS_WORKSPACE_BYTES on each of CUBLAS_STREAMS) and, unless cuda_graphs is False,
    the decode graphs' pool (`decode_graph_bytes`). `attention` is the engine's backend ("gather" adds its decode
    gathers); `dequant_bytes` what the largest dequantizing linear materialises (`dequant_transient_bytes`);
    `kv_blocks` an upper bound on the cache's flex key blocks (the block mask's width), by default a slot cache's.
    """
    peak = max(step_phases(config, max_batch_size, prefill_chunk, max_seq_len, dtype_bytes, attention=attention,
                           dequant_bytes=dequant_bytes).values())
    if device_type != "cuda":
        return int(peak * WORKSPACE_SLACK)
    from serve_app.engine.graphs import buckets_for

    warmup = COMPILE_SCRATCH_BYTES + decode_step_bytes(config, buckets_for(max_batch_size)[-1], max_seq_len,
                                                       dtype_bytes, kv_blocks=kv_blocks)
    total = int(max(peak, warmup) * WORKSPACE_SLACK) + CUBLAS_STREAMS * CUBLAS_WORKSPACE_BYTES
    if cuda_graphs:
        total += decode_graph_bytes(config, max_batch_size, max_seq_len, dtype_bytes, kv_blocks=kv_blocks)
    return total


def dequant_transient_bytes(model) -> int:
    """What the largest quantized linear of `model` materialises while it computes by dequantize + matmul (the
    device check's reference, `quant.reference_kernels`, and the eager fallback): the int8 values [out, in], their
    cast to the working dtype and the scaled product (and its cast when the working dtype is not the compute
    dtype); 0 without quantized layers."""
    import torch

    from serve_app.model.quant import QuantizedLinear

    worst = 0
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        scale_dtype = layer.weight_scale.dtype
        work = layer.dtype if layer.dtype in (scale_dtype, torch.float32, torch.float64) else torch.float32
        w, d = torch.empty((), dtype=work).element_size(), torch.empty((), dtype=layer.dtype).element_size()
        per_weight = 1 + 2 * w + (d if work != layer.dtype else 0)
        worst = max(worst, layer.out_features * layer.in_features * per_weight)
    return worst


def plan_memory(
    *,
    share: float,
    total_bytes: int,
    free_bytes: int,
    weight_bytes: int,
    workspace_bytes: int,
    kv_bytes_per_slot: int,
    kv_cache_bytes: int | None = None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
    kv_block_bytes: int | None = None,
) -> MemoryPlan:
    """Size the KV cache of a replica that holds `weight_bytes` of weights (measured after loading).

    free_bytes is the device's free memory after loading (other processes on the card count against it).
    The KV budget is what the share has left after context, weights and workspace, and at most what the device has
    free after the workspace. An explicit kv_cache_bytes replaces that figure but must fit both limits. Raises
    MemoryPlanError when the share cannot hold one sequence of KV (kv_bytes_per_slot), with the numbers. With
    kv_block_bytes the budget is whole blocks, and the plan says how many.
    """
    fraction = memory_fraction(share, total_bytes, context_bytes)
    budget = int(share * total_bytes)
    fits = min(budget - context_bytes - weight_bytes - workspace_bytes, free_bytes - workspace_bytes)
    explanation = (
        f"share {share} of {total_bytes / 2**30:.1f} GiB = {budget / 2**30:.2f} GiB: context "
        f"{context_bytes / 2**30:.2f} + weights {weight_bytes / 2**30:.2f} + workspace {workspace_bytes / 2**30:.2f} "
        f"GiB leave {max(fits, 0) / 2**30:.2f} GiB for the KV cache (device free: {free_bytes / 2**30:.2f} GiB)"
    )
    if kv_cache_bytes is not None:
        if kv_cache_bytes > fits:
            raise MemoryPlanError(f"kv_cache_bytes={kv_cache_bytes} does not fit: {explanation}; lower it or raise "
                                  "num_gpus")
        kv = kv_cache_bytes
    else:
        kv = fits
    if kv < kv_bytes_per_slot:
        raise MemoryPlanError(f"no room for one sequence of KV ({kv_bytes_per_slot / 2**20:.0f} MiB): {explanation}; "
                              "raise num_gpus or lower max_seq_len")
    blocks = kv // kv_block_bytes if kv_block_bytes else 0
    if kv_block_bytes:
        kv = blocks * kv_block_bytes
    return MemoryPlan(share, total_bytes, budget, fraction, context_bytes, weight_bytes, workspace_bytes, kv,
                      kv_cache_bytes is not None, kv_block_bytes or 0, blocks)


# ---- the replica side: reads Ray and CUDA -------------------------------------------------------------------------


def ray_gpu_share() -> float | None:
    """This actor's GPU share as Ray assigned it (e.g. 0.25), or None outside Ray or without a GPU resource."""
    import ray

    if not ray.is_initialized():
        return None
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return float(share) if share else None


def limit_process(device, share: float, context_bytes: int = DEFAULT_CONTEXT_BYTES) -> float:
    """Cap this process's CUDA allocator at its share before anything is loaded; returns the fraction set."""
    import torch

    _, total = torch.cuda.mem_get_info(device)
    fraction = memory_fraction(share, total, context_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def plan_replica(loaded, *, share: float, engine, context_bytes: int = DEFAULT_CONTEXT_BYTES) -> MemoryPlan:
    """After load_model (serve_app.model.loader.LoadedModel on a CUDA device): the KV budget for the engine whose
    settings are `engine` (an EngineConfig: batch, context, prefill chunk, explicit KV budget, attention, graphs)."""
    import torch

    device = loaded.device
    max_seq_len = engine.max_seq_len_for(loaded.config.seq_length)
    free, total = torch.cuda.mem_get_info(device)
    dtype_bytes = torch.empty((), dtype=loaded.dtype).element_size()
    block_size = engine.block_size or 128  # the engine's default with the flex backend (serve_app/engine/engine.py)
    block_bytes = loaded.config.kv_bytes_per_token(loaded.dtype) * block_size
    flex_blocks = int(share * total) // block_bytes * max(block_size // 128, 1)  # at most what the share could hold
    return plan_memory(
        share=share,
        total_bytes=total,
        free_bytes=free,
        weight_bytes=torch.cuda.memory_reserved(device),  # the weights, after load_model emptied the cache
        workspace_bytes=activation_workspace_bytes(
            loaded.config, engine.max_batch_size, engine.prefill_chunk, max_seq_len, dtype_bytes,
            device_type=device.type, attention=engine.attention, cuda_graphs=engine.cuda_graphs is not False,
            dequant_bytes=dequant_transient_bytes(loaded.model) if hasattr(loaded, "model") else 0,
            kv_blocks=flex_blocks,
        ),
        kv_bytes_per_slot=loaded.config.kv_bytes_per_token(loaded.dtype) * max_seq_len,
        kv_cache_bytes=engine.kv_cache_bytes,
        context_bytes=context_bytes,
        kv_block_bytes=block_bytes,
    )
