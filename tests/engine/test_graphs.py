"""Decode graphs' bookkeeping on CPU: bucket choice, padding rows that only touch the scratch slot, static-buffer
copy-in, and results equal to the eager step. The capture is injected (it re-runs the function) because CUDA graphs
cannot run here; on a GPU the same code records and replays torch.cuda.CUDAGraph (scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from serve_app.engine.graphs import bucket_for, buckets_for
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_buckets():
    assert buckets_for(16) == (1, 2, 4, 8, 16)
    assert buckets_for(5) == (1, 2, 4, 8)
    assert buckets_for(500) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert [bucket_for(n, buckets_for(100)) for n in (1, 3, 9, 64, 65, 100)] == [1, 4, 16, 64, 128, 128]
    assert bucket_for(129, buckets_for(500)) is None


def test_graph_replay_equals_the_eager_step(tiny_fp32):
    captured = []

    def capture(fn):
        captured.append(fn)
        return fn

    graphed = ModelRunner(tiny_fp32, 5, 64, attention="flex", graphs=True, capture=capture)
    eager = ModelRunner(tiny_fp32, 5, 64, attention="slot-view", graphs=False)
    prompts = [torch.randint(3, 1000, (4 + 3 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(5)]
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.7), SamplingParams(),
              SamplingParams(temperature=1.2, top_k=7), SamplingParams(temperature=0.7)]
    prefill = [Work(p, slot, 0, params[slot], seed=slot) for slot, p in enumerate(prompts)]
    last = graphed.step(prefill)
    assert last == eager.step(prefill)  # mixed prefill runs eagerly in both
    positions = [len(p) for p in prompts]
    for step, active in enumerate([[0, 2, 4], [0, 1, 2, 3, 4], [0, 2, 4], [3]]):
        work = [Work([last[s]], s, positions[s], params[s], seed=s) for s in active]
        got, expected = graphed.step(work), eager.step(work)
        assert got == expected, step
        for s, token in zip(active, got):
            last[s], positions[s] = token, positions[s] + 1
    # Buckets 4 (sampled rows), 8 (sampled, with top_p/top_k) and 1 (sampled, top_k): one capture per variant.
    assert len(captured) == 3
    scratch = graphed.cache.scratch_block
    keys = torch.stack(graphed.cache.k)  # [layers, G, blocks + 1, block_size, D]
    assert keys[:, :, scratch, 0].abs().sum() > 0  # padding rows wrote there, and only there
    assert keys[:, :, scratch, 1:].abs().sum() == 0


def test_graphs_need_the_flex_backend(tiny_fp32):
    with pytest.raises(ValueError, match="flex"):
        ModelRunner(tiny_fp32, 2, 64, attention="slot-view", graphs=True, capture=lambda fn: fn)


def test_warmup_captures_every_bucket_and_variant_before_any_step(tiny_fp32):
    captured = []

    def capture(fn):
        captured.append(fn)
        return fn

    runner = ModelRunner(tiny_fp32, 5, 64, attention="flex", graphs=True, capture=capture)
    report = runner.warmup()
    assert report["buckets"] == [1, 2, 4, 8] and report["graphs"] == len(captured) == 4 * 3
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(5)]
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    last = runner.step([Work(p, slot, 0, sampled, seed=slot) for slot, p in enumerate(prompts)])
    for rows in (1, 3, 5):
        runner.step([Work([last[s]], s, 3, SamplingParams() if s % 2 else sampled, seed=s) for s in range(rows)])
    assert len(captured) == 12  # nothing captured while serving


def test_graphs_refuse_to_replay_after_what_they_read_was_reallocated(tiny_fp32, monkeypatch):
    loaded = tiny_fp32
    runner = ModelRunner(loaded, 2, 64, attention="flex", graphs=True, capture=lambda fn: fn)
    runner.warmup()
    step = [Work([5], 0, 3, SamplingParams()), Work([6], 1, 7, SamplingParams())]
    runner.step(step)
    # Another runner with a longer cache in the same process used to regrow the tables the graphs read.
    ModelRunner(loaded, 1, 2048, attention="flex", graphs=False)
    runner.step(step)
    cos, sin = loaded.model.rope(64)
    monkeypatch.setattr(loaded.model, "_rope", (cos.clone(), sin.clone()))  # what a regrowth would do
    with pytest.raises(RuntimeError, match="reallocated after the decode graphs were captured"):
        runner.step(step)


def test_one_capture_stream_and_pool_for_all_of_a_runners_graphs(tiny_fp32, monkeypatch):
    """Each side stream brings its own cuBLAS workspace (~32 MiB on sm_90): graphs share one. CUDA is faked here;
    the capture sequence is what CudaGraphCapture does on a GPU."""
    import contextlib

    from serve_app.engine import graphs as graphs_module

    streams, captures = [], []

    class Stream:
        def __init__(self):
            streams.append(self)

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        captures.append((pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream.__new__(Stream))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    runner = ModelRunner(tiny_fp32, 5, 64, attention="flex", graphs=True)  # the default capture: CudaGraphCapture
    assert isinstance(runner.graphs.capture, graphs_module.CudaGraphCapture)
    runner.warmup()
    assert len(captures) == 12 and len(streams) == 1
    assert set(captures) == {("pool", streams[0])}


def test_graph_replay_applies_logit_bias_and_min_tokens_as_the_eager_step(tiny_fp32):
    """The graphs' always-on bias buffers: rows with logit_bias or a min_tokens ban, beside rows without, choose what
    the eager step chooses, and the bias changes the choice (so the check can fail)."""
    graphed = ModelRunner(tiny_fp32, 4, 64, attention="flex", graphs=True, capture=lambda fn: fn)
    eager = ModelRunner(tiny_fp32, 4, 64, attention="slot-view", graphs=False)
    prompts = [torch.randint(3, 1000, (5 + 2 * i,), generator=torch.Generator().manual_seed(20 + i)).tolist()
               for i in range(4)]
    plain = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(), SamplingParams()]
    prefill = [Work(p, slot, 0, plain[slot], seed=slot) for slot, p in enumerate(prompts)]
    first = eager.step(prefill)
    assert graphed.step(prefill) == first
    unbiased = eager.step([Work([first[s]], s, len(prompts[s]), plain[s], seed=s) for s in range(4)])
    eos = tiny_fp32.config.eos_token_id
    params = [SamplingParams(logit_bias=((7, 100.0),)), SamplingParams(temperature=0.9, top_p=0.8,
                                                                        logit_bias=((unbiased[1], -100.0),)),
              SamplingParams(min_tokens=3, stop_token_ids=(unbiased[2],)), SamplingParams()]
    work = [Work([first[s]], s, len(prompts[s]), params[s], seed=s, generated=1) for s in range(4)]
    got = graphed.step(work)
    assert got == eager.step(work)
    assert got[0] == 7 and got[1] != unbiased[1] and got[2] != unbiased[2] and got[2] != eos
    assert got[3] == unbiased[3]


def test_graph_replay_over_block_tables_equals_the_eager_step(tiny_fp32):
    """Paged: each row's table lists scattered 128-token blocks and rows cross a block boundary mid-run; the replayed
    flex step (static [rows, width] tables, the cache's block_logical read by address) equals eager slot views."""
    options = dict(block_size=128, num_blocks=12)
    graphed = ModelRunner(tiny_fp32, 3, 512, attention="flex", graphs=True, capture=lambda fn: fn, **options)
    eager = ModelRunner(tiny_fp32, 3, 512, attention="slot-view", graphs=False, **options)
    tables = [(7, 2, 9), (0, 11, 4), (5, 3)]
    prompts = [torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (120, 126, 60)]
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.7), SamplingParams()]
    prefill = [Work(p, t, 0, q, seed=i) for i, (p, t, q) in enumerate(zip(prompts, tables, params))]
    last = graphed.step(prefill)
    assert last == eager.step(prefill)
    positions = [len(p) for p in prompts]
    for step in range(12):  # rows 0 and 1 move into their second block at positions 128
        work = [Work([last[i]], tables[i], positions[i], params[i], seed=i) for i in range(3)]
        got, expected = graphed.step(work), eager.step(work)
        assert got == expected, step
        last, positions = got, [p + 1 for p in positions]
    assert graphed.cache.block_logical[[7, 2, 0, 11, 5]].tolist() == [0, 1, 0, 1, 0]
