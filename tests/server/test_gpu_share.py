"""A replica's GPU memory plan: pure arithmetic, checked without a GPU against the placements configs/gpu.yaml uses,
and the workspace estimate checked against the live tensor bytes of real engine steps measured on CPU."""

import pytest

from serve_app.engine.engine_config import EngineConfig
from serve_app.model.demo import PRESETS
from serve_app.server.gpu_share import (
    DEFAULT_CONTEXT_BYTES,
    GRAPH_SAMPLE_BYTES_PER_LOGIT,
    SAMPLE_BYTES_PER_LOGIT,
    WORKSPACE_SLACK,
    MemoryPlanError,
    activation_workspace_bytes,
    decode_graph_bytes,
    memory_fraction,
    plan_memory,
    step_phases,
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


def test_the_plan_sizes_blocks_and_a_quarter_card_holds_hundreds_of_short_chats():
    """The issue's arithmetic: INT4 on a quarter of an 80 GB card, 8,192-token context. Slots held ~65 sequences
    whatever their length; in blocks of 128 the same budget holds that many sequences of 8,192 tokens or ~16x as
    many 500-token chats."""
    import torch

    block_bytes = CONFIG_6B.kv_bytes_per_token(torch.float16) * 128
    workspace = activation_workspace_bytes(CONFIG_6B, 64, 512, 8192)
    plan = plan_memory(share=0.25, total_bytes=H100, free_bytes=H100, weight_bytes=WEIGHTS["int4"],
                       workspace_bytes=workspace, kv_bytes_per_slot=slot_bytes(), kv_block_bytes=block_bytes)
    assert plan.kv_cache_bytes == plan.num_blocks * block_bytes and plan.block_bytes == block_bytes
    long_sequences = plan.num_blocks // (8192 // 128)
    chats = plan.num_blocks // -(-500 // 128)
    assert long_sequences == plan.kv_cache_bytes // slot_bytes()  # what slots held
    assert chats >= 15 * long_sequences
    print(f"{plan.num_blocks} blocks: {long_sequences} sequences of 8192 or {chats} of 500 tokens")


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
    assert activation_workspace_bytes(CONFIG_6B, 8, 1024, 8192) > activation_workspace_bytes(CONFIG_6B, 8, 512, 8192)
    assert GIB < activation_workspace_bytes(CONFIG_6B, 64, 512, 8192) < 3 * GIB


# A 512-token prefill chunk over 8192 keys holds 32 heads x 512 x 8192 scores at once, as fp16 scores, their fp32
# copy and the fp32 softmax: 10 B each.
PREFILL_SCORES_6B = 32 * 512 * 8192 * 10  # 1.34e9


@pytest.mark.parametrize("batch", [1, 32, 48, 64])
def test_the_6b_workspace_holds_a_long_prefill_chunk(batch):
    assert step_phases(CONFIG_6B, batch, 512, 8192)["attention"] >= PREFILL_SCORES_6B
    # Plus slack, the decode graphs' pool (at least every graph's fp32 logits) and two cuBLAS workspaces.
    outputs = 3 * sum(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < 2 * batch) * 65024 * 4
    assert decode_graph_bytes(CONFIG_6B, batch, 8192) >= outputs
    floor = PREFILL_SCORES_6B * WORKSPACE_SLACK + outputs + 2 * (32 << 20)
    assert activation_workspace_bytes(CONFIG_6B, batch, 512, 8192) >= floor
    assert activation_workspace_bytes(CONFIG_6B, batch, 512, 8192, cuda_graphs=False) >= floor - outputs
    # On CPU (no graphs, no cuBLAS) only the step, with its slack.
    assert activation_workspace_bytes(CONFIG_6B, batch, 512, 8192, device_type="cpu") >= PREFILL_SCORES_6B


def test_the_gather_backend_counts_its_decode_gathers():
    # 64 rows x 32 heads x 8192 keys x 128 x fp16, keys and values: SDPA's math path expands them to every head.
    assert (activation_workspace_bytes(CONFIG_6B, 64, 512, 8192, attention="gather")
            >= 2 * 64 * 32 * 8192 * 128 * 2 * WORKSPACE_SLACK)


# ---- the estimate against measured engine steps ---------------------------------------------------------------


class LiveBytes:
    """A dispatch mode that follows every tensor storage an op creates (by a weak reference to its storage) and
    records the peak of their total bytes after each op: what the step itself allocated, whatever already existed
    (weights, the KV cache, the rotary tables) left out."""

    def __init__(self, preexisting=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.skip = {s.data_ptr() for s in map(self._storage, preexisting) if s is not None}
        self.live: dict[int, tuple] = {}
        self.peak, self.peak_op = 0, None

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._record(out, func)
                return out

        self.mode = Mode()

    @staticmethod
    def _storage(tensor):
        try:
            return tensor.untyped_storage()
        except NotImplementedError:  # an opaque tensor (a oneDNN packed weight)
            return None

    def _record(self, out, func) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        for tensor in tree_leaves(out):
            storage = self._storage(tensor) if isinstance(tensor, torch.Tensor) else None
            if storage is None or storage.nbytes() == 0 or storage.data_ptr() in self.skip:
                continue
            known = self.live.get(storage.data_ptr())
            if known is None or known[0].expired():  # a view of a live tensor shares its storage: counted once
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        now = sum(size for _, size in self.live.values())
        if now > self.peak:
            self.peak, self.peak_op = now, str(func)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _measured_step(precision: str, batch: int, chunk: int, max_seq_len: int):
    """Peak live bytes of one engine step on CPU (tiny model, slot-view attention, no graphs): a prefill chunk of
    `chunk` tokens ending at max_seq_len in slot 0 and a decode token at the end of each other slot, every row
    sampled with top_p (the full-vocabulary sort: the tiny vocabulary is within sampling's candidates)."""
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.runner import ModelRunner, Work
    from serve_app.engine.sampling import _vocab_hash
    from serve_app.model import compute
    from serve_app.model.demo import random_model

    loaded = random_model("tiny", precision, "cpu")
    config = loaded.config
    runner = ModelRunner(loaded, batch, max_seq_len, attention="slot-view", graphs=False)
    params = SamplingParams(temperature=0.8, top_p=0.7)
    ids = list(range(3, 3 + chunk))
    work = [Work(ids, 0, max_seq_len - chunk, params, seed=1)]
    work += [Work([7], slot, max_seq_len - 1, params, seed=slot) for slot in range(1, batch)]

    def measure():
        model = loaded.model
        tables = model.rope(max_seq_len)  # made once per model, before any step
        vocab_hash = _vocab_hash(config.padded_vocab_size, loaded.device)  # made once per process
        preexisting = [*model.parameters(), *model.buffers(), *runner.cache.k, *runner.cache.v, *tables, vocab_hash]
        with LiveBytes(preexisting) as live:
            chosen = runner.step(work)
        assert len(chosen) == batch and all(token is not None for token in chosen)
        return live

    live = compute.run(measure)  # the runner's steps run on the compute thread, where the mode must be
    dtype_bytes = {"fp32": 4, "bf16": 2}[precision]
    return live, config, dtype_bytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "batch, chunk, max_seq_len",
    [
        (4, 512, 2048),  # a long chunk over a long cache: the attention scores dominate
        (32, 16, 256),  # many rows over a short cache: the MLP, the logits and their sampling
    ],
)
def test_the_estimate_bounds_a_measured_step(precision, batch, chunk, max_seq_len):
    live, config, dtype_bytes = _measured_step(precision, batch, chunk, max_seq_len)
    counted = max(step_phases(config, batch, chunk, max_seq_len, dtype_bytes).values())
    estimate = activation_workspace_bytes(config, batch, chunk, max_seq_len, dtype_bytes, device_type="cpu")
    report = (f"measured {live.peak} B at {live.peak_op}, counted {counted}, estimate {estimate} "
              f"({estimate / live.peak:.2f}x)")
    assert live.peak <= counted <= estimate, report  # an upper bound even before the slack
    assert estimate <= 4 * live.peak, report  # and close enough to size a KV cache by
    # On CUDA the estimate only adds to that (graph pool, cuBLAS workspaces).
    assert activation_workspace_bytes(config, batch, chunk, max_seq_len, dtype_bytes) >= estimate


def test_sampling_stays_within_its_bytes_per_logit():
    """`sample`'s worst paths on the 6B vocabulary: the full sort that `resample_overflow` runs for every row, and
    the candidate path a decode graph records."""
    import torch

    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sampling import OVERFLOW, SamplingTensors, _vocab_hash, resample_overflow, sample

    rows, vocab = 4, CONFIG_6B.padded_vocab_size
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(rows)
    table = _vocab_hash(vocab, logits.device)
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_p=0.7),
                   SamplingParams(temperature=0.8, top_p=0.7, top_k=50)):
        settings = SamplingTensors.build([params] * rows, list(range(rows)), vocab, "cpu")
        with torch.inference_mode():
            with LiveBytes([logits, positions, table]) as in_graph:
                sample(logits, settings, positions)
            with LiveBytes([logits, positions, table]) as resampled:
                resample_overflow([OVERFLOW] * rows, logits, settings, positions)
        assert in_graph.peak <= GRAPH_SAMPLE_BYTES_PER_LOGIT * rows * vocab, in_graph.peak / (rows * vocab)
        assert resampled.peak <= SAMPLE_BYTES_PER_LOGIT * rows * vocab, resampled.peak / (rows * vocab)


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


@pytest.mark.parametrize("total", [H100, H200])
def test_the_long_context_pool_holds_a_few_long_sequences_or_many_short_ones(total):
    """configs/gpu.yaml's chatglm2-6b-32k pool: int4 on 0.25 of a card, 32,768-token context, 64 rows."""
    import torch

    block_bytes = CONFIG_6B.kv_bytes_per_token(torch.float16) * 128
    workspace = activation_workspace_bytes(CONFIG_6B, 64, 512, 32768)
    plan = plan_memory(share=0.25, total_bytes=total, free_bytes=total, weight_bytes=WEIGHTS["int4"],
                       workspace_bytes=workspace, kv_bytes_per_slot=slot_bytes(32768), kv_block_bytes=block_bytes)
    assert plan.num_blocks // (32768 // 128) >= 8  # long sequences at once (9 on an H100, 27 on an H200)
    assert plan.num_blocks >= 64 * (2048 // 128)  # every row a 2K-token chat


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
    engine = EngineConfig(max_batch_size=32, max_seq_len=8192, prefill_chunk=512)
    plan = gpu_share.plan_replica(loaded, share=0.25, engine=engine)
    assert plan.weight_bytes == WEIGHTS["int4"] and plan.kv_cache_bytes // slot_bytes() >= 32
    assert gpu_share.ray_gpu_share() is None  # not inside Ray: the caller treats the whole device as its share


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_dequantize_transient_is_counted(precision):
    """What the largest quantized linear materialises for dequantize + matmul (the device check's reference path),
    measured on the tiny model, against `dequant_transient_bytes`."""
    import torch

    from serve_app.model.demo import random_model
    from serve_app.model.quant import QuantizedLinear
    from serve_app.server.gpu_share import dequant_transient_bytes

    loaded = random_model("tiny", precision, "cpu")
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    largest = max(layers, key=lambda m: m.out_features * m.in_features)
    with torch.inference_mode(), LiveBytes([*loaded.model.parameters(), *loaded.model.buffers()]) as live:
        largest.dequantized_weight()
    counted = dequant_transient_bytes(loaded.model)
    assert live.peak <= counted <= 2 * live.peak, (live.peak, counted)
    assert dequant_transient_bytes(random_model("tiny", "fp32", "cpu").model) == 0
