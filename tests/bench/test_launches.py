"""serve_app/bench/launches.py and scripts/count_launches.py on CPU with the tiny preset: what one decode step
dispatches per layer, that the flex block mask is built once per step whatever the number of layers, the CUDA
launch bookkeeping on synthetic profiler events (no GPU here), and the script's JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serve_app.bench.launches import count_step, random_model, summarize
from serve_app.engine.runner import ModelRunner
from serve_app.model import attention as attention_module

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models():
    """The tiny preset with 2 and with 4 layers (same shapes otherwise)."""
    return {layers: random_model("tiny", "fp32", "cpu", layers=layers) for layers in (2, 4)}


def _count(loaded, rows: int = 2, **runner_options):
    runner = ModelRunner(loaded, 4, 128, **runner_options)
    return count_step(runner, rows, context=40)


def test_eager_ops_per_block_do_not_depend_on_the_number_of_layers(models):
    two, four = (_count(models[n], attention="slot-view", graphs=False) for n in (2, 4))
    assert two.num_layers == 2 and four.num_layers == 4 and two.step == "eager"
    # Every block dispatches the same ops, in either model; what is outside the blocks does not scale.
    assert len(set(two.block_ops)) == 1 and two.block_ops[0] > 20
    assert four.block_ops == two.block_ops * 2
    assert four.outside_blocks == two.outside_blocks > 0
    assert four.ops - two.ops == 2 * two.block_ops[0]
    assert two.ops == sum(two.block_ops) + two.outside_blocks
    assert two.ops_per_layer == two.ops / 2 and four.ops_per_layer < two.ops_per_layer
    assert 0 < two.aten_ops <= two.ops
    assert two.launches is None and two.device_kernels is None  # CPU: no kernel launches to count
    names = dict(two.top_ops)
    assert sum(names.values()) <= two.ops and two.top_ops == sorted(two.top_ops, key=lambda p: -p[1])
    assert two.mask_builds == 0 and two.mask_ops == 0  # slot views build no block mask


def test_the_fast_event_tree_is_the_profilers_own(models, monkeypatch):
    """`launches` reads kineto's events itself (10x faster than `profile.events()`); both give the same counts."""
    from serve_app.bench import launches

    fast = _count(models[2], attention="slot-view", graphs=False)
    monkeypatch.setattr(launches, "_events", lambda prof: prof.events())
    assert _count(models[2], attention="slot-view", graphs=False) == fast


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-function"])
def test_the_flex_block_mask_is_built_once_per_step(models, graphs):
    options = dict(attention="flex", graphs=graphs, compile_flex=False)
    if graphs:
        options["capture"] = lambda fn: fn
    two, four = (_count(models[n], **options) for n in (2, 4))
    assert two.step.startswith("graph function" if graphs else "eager")
    assert two.mask_builds == four.mask_builds == 1
    assert two.mask_ops == four.mask_ops > 0  # the ops that build it do not scale with the layers either
    assert four.block_ops == two.block_ops * 2  # and the mask is not built inside a block
    assert four.outside_blocks == two.outside_blocks


def test_a_mask_rebuilt_in_every_layer_would_be_counted(models, monkeypatch):
    """What the code did before `prepare`: each layer's attention built the block mask again."""
    real = attention_module.FlexSlotAttention.__call__

    def rebuild_per_layer(self, q, layer_k, layer_v, plan):
        plan.block_mask = attention_module.decode_block_mask(
            plan.decode_tables, plan.decode_lens, torch.zeros(layer_k.shape[1], dtype=torch.int64), layer_k.shape[2])
        return real(self, q, layer_k, layer_v, plan)

    monkeypatch.setattr(attention_module.FlexSlotAttention, "__call__", rebuild_per_layer)
    options = dict(attention="flex", graphs=False, compile_flex=False)
    two, four = (_count(models[n], **options) for n in (2, 4))
    assert (two.mask_builds, four.mask_builds) == (3, 5)  # prepare's, then one per layer
    assert four.mask_ops > two.mask_ops


def _event(name, parent=None, device="cpu", activity=None):
    kind = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, cpu_parent=parent, device_type=kind, activity_type=activity)


def test_cuda_launches_count_a_graph_replay_once():
    """Host launch calls and device kernels from synthetic events of the shape torch.profiler reports."""
    block = _event("nn.Module: GLMBlock_0")
    linear = _event("aten::linear", block)
    addmm = _event("aten::addmm", linear)  # nested: not a top-level op
    copy = _event("aten::copy_")
    events = [
        block, linear, addmm, _event("cudaLaunchKernel", addmm), _event("cuLaunchKernelEx", _event("triton_mm")),
        _event("cudaLaunchKernelExC_v11060", linear), copy, _event("cudaMemcpyAsync", copy),
        _event("cudaGraphLaunch"), _event("cudaStreamSynchronize"),
        _event("void gemv_kernel<float>(...)", device="cuda"), _event("triton_poi_fused_mul_0", device="cuda"),
        _event("Memcpy HtoD (Pinned -> Device)", device="cuda"), _event("Memset (Device)", device="cuda"),
        _event("/work/serve_app/model/attention.py(300): decode_block_mask"),
    ]
    for activity in (None, "kernel"):  # kineto's activity types, where the events carry them
        events += [_event("ampere_fp16_s16816gemm", device="cuda", activity=activity),
                   _event("Stream Sync", device="cuda", activity="cuda_sync"),
                   _event("## Call CompiledFxGraph ##", device="cuda", activity="gpu_user_annotation"),
                   _event("my::label", activity="user_annotation")]
    count = summarize(events, rows=1, path="p", step="graph replay (bucket 1)", device="cuda:0", num_layers=1,
                      cuda=True)
    assert (count.ops, count.aten_ops, count.block_ops, count.outside_blocks) == (2, 2, [1], 1)
    assert count.launches == 4 and count.graph_launches == 1 and count.copies == 1
    assert count.device_kernels == 4 and count.mask_builds == 1 and count.launches_per_layer == 4.0
    assert summarize(events, rows=1, path="p", step="s", device="cpu", num_layers=1, cuda=False).launches is None


def _script():
    spec = importlib.util.spec_from_file_location("count_launches", ROOT / "scripts" / "count_launches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "launches.json"
    report = _script().main(["--preset", "tiny", "--rows", "1,3", "--attention", "flex", "--paths", "eager,graphs",
                             "--layers", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    expected = {"preset", "num_layers", "precision", "device", "context", "torch", "paths", "rows", "results"}
    assert expected <= set(report)
    assert report["num_layers"] == 3 and report["paths"] == ["eager", "graphs"] and report["rows"] == [1, 3]
    results = report["results"]
    assert [(r["path"].split(", ")[1], r["rows"]) for r in results] == [
        ("eager", 1), ("eager", 3), ("decode graphs", 1), ("decode graphs", 3)]
    keys = {"rows", "path", "step", "device", "num_layers", "ops", "aten_ops", "ops_per_layer", "block_ops",
            "block_ops_mean", "outside_blocks", "mask_builds", "mask_ops", "launches", "launches_per_layer",
            "graph_launches", "copies", "device_kernels", "top_ops"}
    for result in results:
        assert keys <= set(result)
        assert result["ops"] > 0 and len(result["block_ops"]) == 3 and result["mask_builds"] == 1
        assert result["launches"] is None and result["top_ops"][0][1] >= result["top_ops"][-1][1]
    assert results[2]["step"] == "graph function, re-run (bucket 1)" and results[3]["step"].endswith("(bucket 4)")
    table = capsys.readouterr().out
    assert "| path | step | rows | ops |" in table and table.count("\n| flex, ") == 4 and "- top ops" in table
