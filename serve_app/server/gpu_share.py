"""Keeping a replica inside its Ray GPU share.

Ray's `num_gpus: 0.25` is scheduling bookkeeping only: nothing stops the process from taking the whole card. So a
replica on a GPU (the CPU path is unchanged):

1. reads its share from Ray and the device's total memory, and caps PyTorch's allocator at the share less the CUDA
   context (which the allocator does not see): `torch.cuda.set_per_process_memory_fraction`;
2. loads the weights (quantizing on the GPU one layer at a time; the allocator is trimmed afterwards);
3. sizes its KV cache from what is left of the share after the weights and the activation workspace, and never
   more than the device has free. An explicit `kv_cache_bytes` wins over the computed size, but must still fit.

`plan_memory` and `activation_workspace_bytes` are pure arithmetic (tested without a GPU); `limit_process` and
`plan_replica` are the thin parts that read Ray and CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from serve_app.model.checkpoint import ChatGLM2Config

# What a CUDA context (driver state, cuBLAS workspace, loaded kernels) costs outside PyTorch's allocator: 0.5-1 GB
# measured elsewhere; the upper end, so that the share holds.
DEFAULT_CONTEXT_BYTES = 1 << 30
# The workspace estimate covers the big tensors of one forward pass; this covers the allocator's rounding and
# fragmentation between them.
WORKSPACE_SLACK = 1.25


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
    kv_cache_bytes: int  # the KV budget handed to the engine
    kv_explicit: bool  # kv_cache_bytes came from the config, not from the share

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


def activation_workspace_bytes(
    config: ChatGLM2Config, max_batch_size: int, prefill_chunk: int, max_seq_len: int, dtype_bytes: int = 2
) -> int:
    """The largest transient tensors of one forward pass, times WORKSPACE_SLACK.

    The engine runs a prefill chunk (one sequence, `prefill_chunk` tokens) and a decode step (`max_batch_size`
    rows) as separate calls; the peak is the larger of the two. Per layer it holds the fused QKV and MLP outputs
    (tokens x (qkv + 2 ffn + ffn) values), the keys and values gathered for the batch (rows x kv_heads x span x
    head_dim, k and v, in the activation dtype and as cached), the attention scores in fp32 and the boolean mask;
    then the fp32 logits of the last positions.
    """
    hidden, ffn, heads = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    kv_width = config.kv_heads * config.kv_channels

    def one_call(rows: int, tokens_per_row: int) -> int:
        tokens = rows * tokens_per_row
        linear = tokens * (config.qkv_rows + 3 * ffn + 4 * hidden) * dtype_bytes
        gathered = rows * 2 * kv_width * max_seq_len * dtype_bytes * 2  # index_select, then .to(q.dtype)
        scores = rows * heads * tokens_per_row * max_seq_len * (4 + 1)  # fp32 scores + bool mask
        logits = rows * config.padded_vocab_size * 4 * 2  # fp32 logits, and their copy for sampling
        return linear + gathered + scores + logits

    peak = max(one_call(max_batch_size, 1), one_call(1, min(prefill_chunk, max_seq_len)))
    return int(peak * WORKSPACE_SLACK)


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
) -> MemoryPlan:
    """Size the KV cache of a replica that holds `weight_bytes` of weights (measured after loading).

    free_bytes is the device's free memory after loading (other processes on the card count against it).
    The KV budget is what the share has left after context, weights and workspace, and at most what the device has
    free after the workspace. An explicit kv_cache_bytes replaces that figure but must fit both limits. Raises
    MemoryPlanError when the share cannot hold one sequence of KV (kv_bytes_per_slot), with the numbers.
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
    return MemoryPlan(share, total_bytes, budget, fraction, context_bytes, weight_bytes, workspace_bytes, kv,
                      kv_cache_bytes is not None)


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


def plan_replica(
    loaded,
    *,
    share: float,
    max_batch_size: int,
    max_seq_len: int,
    prefill_chunk: int,
    kv_cache_bytes: int | None,
    context_bytes: int = DEFAULT_CONTEXT_BYTES,
) -> MemoryPlan:
    """After load_model (serve_app.model.loader.LoadedModel on a CUDA device): the KV budget for the engine."""
    import torch

    device = loaded.device
    free, total = torch.cuda.mem_get_info(device)
    dtype_bytes = torch.empty((), dtype=loaded.dtype).element_size()
    return plan_memory(
        share=share,
        total_bytes=total,
        free_bytes=free,
        weight_bytes=torch.cuda.memory_reserved(device),  # the weights, after load_model emptied the cache
        workspace_bytes=activation_workspace_bytes(loaded.config, max_batch_size, prefill_chunk, max_seq_len,
                                                   dtype_bytes),
        kv_bytes_per_slot=loaded.config.kv_bytes_per_token(loaded.dtype) * max_seq_len,
        kv_cache_bytes=kv_cache_bytes,
        context_bytes=context_bytes,
    )
