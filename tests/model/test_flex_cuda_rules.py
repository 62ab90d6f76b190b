"""The GPU decode path checked on CPU against the rules of the CUDA code it will run into.

Inductor's CUDA lowerings of flex attention (torch/_inductor/kernel/flex/flex_decoding.py and flex_attention.py) keep
only the kernel configs whose BLOCK_M divides the block mask's query block and whose BLOCK_N divides its key block;
with none left they fail (NoValidChoicesError), and the CPU lowering has no such rule. The decoding kernel is chosen
only for a static batch, so each row bucket must compile with static shapes, and a process that runs out of
dynamo's cache entries must raise, not fall back to eager flex. These tests apply those rules, taken from the
installed torch (the device's torch 2.11 has the same ones), to what serve_app builds.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from serve_app.model.attention import (
    FLEX_BLOCK,
    ROW_BUCKETS,
    FlexSlotAttention,
    StepPlan,
    decode_block_mask,
    padded_rows,
)
from serve_app.model.demo import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _cuda_configs(monkeypatch, capability: tuple[int, int]):
    """(flex attention forward configs, flex decoding configs) inductor would try on a GPU of `capability`, with
    and without max-autotune (exhaustive search space included)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    heuristic = CUDAConfigHeuristic()
    forward, decode = [], []
    for autotune, space in ((False, "DEFAULT"), (True, "DEFAULT"), (True, "EXHAUSTIVE")):
        with inductor_config.patch(max_autotune=autotune, max_autotune_flex_search_space=space):
            for dtype in (torch.float16, torch.bfloat16):
                forward.append(heuristic.get_flex_attn_fwd_configs(128, dtype))
                decode.append(heuristic.get_flex_decode_configs(128, dtype))
    return forward, decode


def _surviving(configs, q_block: int, kv_block: int, block_m_of) -> list:
    """The lowering's filter: BLOCK_N clamped to the key block, then both blocks must divide."""
    return [c for c in configs if q_block % block_m_of(c) == 0 and kv_block % min(c.block_n, kv_block) == 0]


def _mask(rows: int = 3, slots: int = 4, slot_len: int = 256):
    return decode_block_mask((torch.arange(rows) % slots)[:, None], torch.full((rows,), 5),
                             torch.zeros(slots, dtype=torch.int64), slot_len)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
@pytest.mark.parametrize("preset", ["6b", "tiny"])
def test_the_decode_block_mask_leaves_cuda_kernel_configs(monkeypatch, capability, preset):
    config = PRESETS[preset][0]
    group = config.num_attention_heads // config.kv_heads  # query heads per kv head: 16 for 6B
    q_block, kv_block = _mask().BLOCK_SIZE
    assert kv_block == FLEX_BLOCK
    forward, decode = _cuda_configs(monkeypatch, capability)
    # flex decoding: BLOCK_M = max(next power of two of q_len * group, 16), one query per row.
    decode_block_m = max(1 << (group - 1).bit_length(), 16)
    for configs in decode:
        assert _surviving(configs, q_block, kv_block, lambda c: decode_block_m)
    for configs in forward:  # the general kernel, used when the decoding one is not chosen
        assert _surviving(configs, q_block, kv_block, lambda c: c.block_m)
    # What the mask used to be: a query block of 1 leaves nothing, which is NoValidChoicesError on the device.
    assert not any(_surviving(configs, 1, kv_block, lambda c: decode_block_m) for configs in decode)


def test_the_lowering_still_has_the_rule_these_tests_apply():
    """If torch drops or changes the rule, revisit the block mask (and this file)."""
    import inspect

    from torch._inductor.kernel.flex import flex_attention, flex_decoding

    assert 'SPARSE_Q_BLOCK_SIZE % kernel_options["BLOCK_M"] != 0' in inspect.getsource(flex_decoding)
    assert "static_batch" in inspect.getsource(flex_decoding._use_flex_decoding)
    assert "SPARSE_Q_BLOCK_SIZE" in inspect.getsource(flex_attention)


def test_rows_pad_to_buckets():
    assert [padded_rows(n) for n in (1, 2, 3, 5, 64, 65, 128, 129, 300)] == [1, 2, 4, 8, 64, 128, 128, 256, 384]


class Recorder:
    """A torch.compile backend that keeps each graph's example inputs and runs it eagerly."""

    def __init__(self):
        self.graphs: list[list] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(list(example_inputs))
        return graph_module.forward


def _decode_inputs(rows: int, slots: int = 4, slot_len: int = 256, heads: int = 4, groups: int = 2, dim: int = 32):
    generator = torch.Generator().manual_seed(rows)
    layer_k = torch.randn(groups, slots, slot_len, dim, generator=generator)
    layer_v = torch.randn(groups, slots, slot_len, dim, generator=generator)
    q = torch.randn(rows, heads, dim, generator=generator)
    long = torch.zeros(0, dtype=torch.int64)
    plan = StepPlan([], long, long, long, long, (torch.arange(rows) % slots)[:, None],
                    torch.arange(rows) * 7 % slot_len + 1)
    cache = type("Cache", (), {"k": layer_k[None], "v": layer_v[None], "block_size": slot_len, "table_width": 1})()
    return q, layer_k, layer_v, plan, cache


def test_flex_compiles_one_static_graph_per_row_bucket():
    torch._dynamo.reset()
    recorder = Recorder()
    compiled = FlexSlotAttention(compile=True, backend=recorder)
    eager = FlexSlotAttention(compile=False)
    for rows in (1, 3, 5, 4, 2, 7):  # buckets 1, 4, 8, 4, 2, 8
        q, k, v, plan, cache = _decode_inputs(rows)
        compiled.prepare(plan, cache)
        got = compiled(q, k, v, plan)
        eager.prepare(plan, cache)
        torch.testing.assert_close(got, eager(q, k, v, plan))
        assert got.shape == (rows, q.shape[1] * q.shape[2])
    assert len(recorder.graphs) == 4  # buckets 1, 4, 8, 2: no recompile for a row count of a bucket seen
    for inputs in recorder.graphs:
        shapes = [s for t in inputs if isinstance(t, torch.Tensor) for s in t.shape]
        assert not any(isinstance(s, torch.SymInt) for s in shapes)  # dynamic=False: every batch static
        assert not any(isinstance(t, torch.SymInt) for t in inputs)
    batches = sorted({t.shape[0] for inputs in recorder.graphs for t in inputs[:1]})
    assert batches == [1, 2, 4, 8]


_PAST_THE_LIMIT = """
import sys, weakref
sys.path.insert(0, sys.argv[1])
import torch
from test_flex_cuda_rules import _decode_inputs
from serve_app.model.attention import CompileLimitHit, FlexSlotAttention

class Obj:
    pass

def kept(x):  # does a frame still hold its argument after rebinding it?
    ref = weakref.ref(x)
    x = None
    return ref() is not None

flex = FlexSlotAttention(compile=True, backend="eager", recompile_limit=2)
with torch._dynamo.config.patch(recompile_limit=2):
    for rows in (1, 2):
        q, k, v, plan, cache = _decode_inputs(rows)
        flex.prepare(plan, cache)
        flex(q, k, v, plan)
    before = kept(Obj())
    q, k, v, plan, cache = _decode_inputs(3)  # a third shape (bucket 4)
    flex.prepare(plan, cache)
    try:
        flex(q, k, v, plan)
        print("NO RAISE")
    except CompileLimitHit as exc:
        assert isinstance(exc.__cause__, torch._dynamo.exc.FailOnRecompileLimitHit), exc.__cause__
        print("RAISED", before, kept(Obj()))
"""


def test_flex_past_the_recompile_limit_raises_instead_of_running_eagerly():
    """In a process of its own: after dynamo's FailOnRecompileLimitHit, torch leaves its frame-evaluation hook on
    for the life of the process (every call slower, arguments kept alive to the end of their frames), which would
    skew later tests as it would a replica's serving. The process here prints what it saw of that too: that is why
    the engine stops for good on CompileLimitHit (tests/engine/test_engine.py) rather than serving on."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _PAST_THE_LIMIT, here], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RAISED"), done.stdout
    print("frame keeps its argument before/after the failure:", last.split()[1:])


def test_warmup_compiles_every_bucket_up_front():
    torch._dynamo.reset()
    recorder = Recorder()
    flex = FlexSlotAttention(compile=True, backend=recorder)
    _, k, _, _, cache = _decode_inputs(1, slots=6)
    buckets = flex.warmup(cache, heads=4, dtype=torch.float32, max_rows=6)
    assert buckets == [1, 2, 4, 8] and len(recorder.graphs) == 4
    for rows in range(1, 7):  # every row count a 6-slot cache can decode: nothing new compiles
        q, k, v, plan, cache = _decode_inputs(rows, slots=6)
        flex.prepare(plan, cache)
        flex(q, k, v, plan)
    assert len(recorder.graphs) == 4
    torch._dynamo.reset()


def test_buckets_are_the_graph_buckets():
    from serve_app.engine.graphs import BUCKETS

    assert BUCKETS == ROW_BUCKETS and all(padded_rows(b) == b for b in BUCKETS)
