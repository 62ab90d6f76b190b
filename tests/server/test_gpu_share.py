"""A replica's GPU memory plan: pure arithmetic, checked without a GPU against the placements configs/gpu.yaml uses."""

import pytest

from serve_app.model.demo import PRESETS
from serve_app.server.gpu_share import (
    DEFAULT_CONTEXT_BYTES,
    MemoryPlanError,
    activation_workspace_bytes,
    memory_fraction,
    plan_memory,
)

GIB = 2**30
H100 = 81559 * 2**20  # what torch.cuda.mem_get_info reports as total on an 80 GB H100
H200 = 143771 * 2**20  # and on a 141 GB H200
CONFIG_6B = PRESETS["6b"][0]
WEIGHTS = {"fp16": 12_487_168_064, "int8": 6_782_000_000, "int4": 3_921_000_000}  # bytes held after load


def slot_bytes(max_seq_len=8192):
    return 28_672 * max_seq_len  # fp16 KV per token of the 6B model (chatglm2.md)


def test_kv_per_token_matches_the_reference_figure():
    import torch

    assert CONFIG_6B.kv_bytes_per_token(torch.float16) == 28_672


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("total", [H100, H200])
def test_the_whole_plan_stays_inside_the_share(share, total):
    workspace = activation_workspace_bytes(CONFIG_6B, 64, 512, 8192)
    plan = plan_memory(share=share, total_bytes=total, free_bytes=total - 2 * GIB, weight_bytes=WEIGHTS["int4"],
                       workspace_bytes=workspace, kv_bytes_per_slot=slot_bytes())
    held = plan.context_bytes + plan.weight_bytes + plan.workspace_bytes + plan.kv_cache_bytes
    assert held == plan.budget_bytes == int(share * total)  # all that is left of the share goes to KV
    # The allocator's cap leaves exactly the context outside it.
    assert plan.memory_fraction * total + plan.context_bytes == pytest.approx(share * total)
    assert not plan.kv_explicit


def test_other_processes_on_the_card_limit_the_kv_cache():
    plan = plan_memory(share=0.5, total_bytes=H100, free_bytes=10 * GIB, weight_bytes=WEIGHTS["int8"],
                       workspace_bytes=GIB, kv_bytes_per_slot=slot_bytes())
    assert plan.kv_cache_bytes == 9 * GIB  # free minus workspace, well under the share's 30+ GiB


def test_an_explicit_kv_budget_wins_but_must_fit():
    common = dict(share=0.25, total_bytes=H100, free_bytes=H100, weight_bytes=WEIGHTS["int4"], workspace_bytes=GIB,
                  kv_bytes_per_slot=slot_bytes())
    plan = plan_memory(**common, kv_cache_bytes=6 * GIB)
    assert plan.kv_cache_bytes == 6 * GIB and plan.kv_explicit
    with pytest.raises(MemoryPlanError, match="does not fit.*raise num_gpus"):
        plan_memory(**common, kv_cache_bytes=30 * GIB)


def test_a_share_too_small_says_what_to_change():
    with pytest.raises(MemoryPlanError, match="no room for one sequence"):
        plan_memory(share=0.1, total_bytes=H100, free_bytes=H100, weight_bytes=WEIGHTS["fp16"], workspace_bytes=GIB,
                    kv_bytes_per_slot=slot_bytes())
    with pytest.raises(MemoryPlanError, match="CUDA context"):
        memory_fraction(0.01, 50 * GIB, DEFAULT_CONTEXT_BYTES)
    with pytest.raises(MemoryPlanError, match=r"\(0, 1\]"):
        memory_fraction(1.5, H100)


def test_workspace_grows_with_batch_and_context():
    small = activation_workspace_bytes(CONFIG_6B, 8, 512, 2048)
    assert activation_workspace_bytes(CONFIG_6B, 64, 512, 2048) > small
    assert activation_workspace_bytes(CONFIG_6B, 8, 512, 8192) > small
    # A 64-row decode step at 8k context gathers 64 x 2 x 256 x 8192 fp16 keys and values: ~0.5 GiB, twice over.
    assert GIB < activation_workspace_bytes(CONFIG_6B, 64, 512, 8192) < 3 * GIB


# The placement configs/gpu.yaml documents: (pool, share, max_batch_size). Each must hold its batch of 8k-token
# sequences on an 80 GB H100 and on a 141 GB H200.
PLACEMENT = [("fp16", 1.0, 64), ("int8", 0.5, 48), ("int4", 0.25, 32)]


@pytest.mark.parametrize("precision, share, batch", PLACEMENT)
@pytest.mark.parametrize("total", [H100, H200])
def test_documented_placement_fits(precision, share, batch, total):
    workspace = activation_workspace_bytes(CONFIG_6B, batch, 512, 8192)
    plan = plan_memory(share=share, total_bytes=total, free_bytes=total, weight_bytes=WEIGHTS[precision],
                       workspace_bytes=workspace, kv_bytes_per_slot=slot_bytes())
    assert plan.kv_cache_bytes // slot_bytes() >= batch


def test_the_replica_side_reads_cuda_and_caps_the_allocator(monkeypatch):
    """The thin CUDA-reading part, with torch.cuda's answers faked: what a 0.25 share of an H100 would do."""
    from types import SimpleNamespace

    import torch

    from serve_app.server import gpu_share

    calls = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (H100 - 6 * GIB, H100))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: WEIGHTS["int4"])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.setdefault("fraction", fraction))
    fraction = gpu_share.limit_process(torch.device("cuda"), 0.25)
    assert calls["fraction"] == fraction == pytest.approx((0.25 * H100 - DEFAULT_CONTEXT_BYTES) / H100)
    loaded = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, config=CONFIG_6B)
    plan = gpu_share.plan_replica(loaded, share=0.25, max_batch_size=32, max_seq_len=8192, prefill_chunk=512,
                                  kv_cache_bytes=None)
    assert plan.weight_bytes == WEIGHTS["int4"] and plan.kv_cache_bytes // slot_bytes() >= 32
    assert gpu_share.ray_gpu_share() is None  # not inside Ray: the caller treats the whole device as its share
