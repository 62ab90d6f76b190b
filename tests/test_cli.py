"""The remaining `chatglm2-serve` commands, run as a user runs them (a subprocess, tiny preset)."""

from __future__ import annotations

import json

from serve_app.model.checkpoint import iter_tensors, weight_files
from tests.serving import run_cli


def test_demo_checkpoint_command(tmp_path, tiny_checkpoint):
    run = run_cli("demo-checkpoint", str(tmp_path / "demo"), "--preset", "tiny", "--safetensors")
    assert run.returncode == 0, run.stderr
    assert [p.name for p in weight_files(tmp_path / "demo")] == ["model.safetensors"]
    ours = dict(iter_tensors(tmp_path / "demo"))
    assert all(ours[name].equal(tensor) for name, tensor in iter_tensors(tiny_checkpoint))  # same seed, same bytes


def test_bench_command_reports_engine_and_sequential(tiny_checkpoint):
    run = run_cli("bench", "--checkpoint", str(tiny_checkpoint), "--concurrency", "1,2", "--requests", "2",
               "--prompt-tokens", "8", "--max-new-tokens", "4", "--compare-sequential", "--threads", "1", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["speedup"] > 0
    assert [r["concurrency"] for r in result["results"]] == [1, 2]
    assert all(r["output_tokens"] == 8 for r in result["results"])  # 2 requests x 4 tokens, eos ignored
    assert "out tok/s" in run.stdout


def test_bench_precision_command(tiny_checkpoint):
    run = run_cli("bench-precision", "--checkpoint", str(tiny_checkpoint), "--precisions", "fp32,int4", "--batch", "1,2",
               "--steps", "2", "--json")
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["precision"] for r in results] == ["fp32", "int4"]
    assert all(r["resident_bytes"] > 0 and set(r["decode"]) == {"1", "2"} for r in results)
    assert results[1]["weight_bytes"] < results[0]["weight_bytes"]


def test_bench_with_random_weights_and_sampling():
    """No checkpoint: random weights of a preset made on the device; sampled requests; memory beside the table."""
    run = run_cli("bench", "--random-weights", "--preset", "tiny", "--concurrency", "1,2", "--requests", "2",
               "--prompt-tokens", "8", "--max-new-tokens", "4", "--temperature", "0.95", "--top-p", "0.7",
               "--threads", "1", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["temperature"], result["top_p"], result["checkpoint"]) == (0.95, 0.7, "random-tiny")
    assert result["memory"]["rss_bytes"] > 0 and "memory: RSS" in run.stdout
    assert all(r["output_tokens"] == 8 and r["roofline_tokens_per_s"] is None for r in result["results"])  # CPU


def test_bench_precision_with_random_weights():
    run = run_cli("bench-precision", "--random-weights", "--preset", "tiny", "--precisions", "fp32,int8", "--batch", "1",
               "--steps", "2", "--json")
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["precision"] for r in results] == ["fp32", "int8"] and results[0]["roofline_step_ms"] is None


def test_generate_with_an_adapter_gives_the_engines_ids(tmp_path, tiny_checkpoint):
    """`generate --adapter` for a P-tuning and a LoRA demo adapter: the ids of the engine run with it here, not the
    base model's."""
    import asyncio
    import json

    from serve_app.engine.engine import Engine, EngineConfig
    from serve_app.engine.params import SamplingParams
    from serve_app.model.adapters import read_adapter, write_demo_adapter
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer

    def cli(*extra):
        run = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "你好", "--precision", "fp32",
                      "--max-new-tokens", "6", "--json", *extra)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout.strip().splitlines()[-1])["token_ids"]

    base = cli()
    loaded = load_model(tiny_checkpoint, "fp32", "cpu")
    prompt = ChatGLM2Tokenizer(tiny_checkpoint).build_chat_input("你好", [])
    for kind in ("ptuning", "lora"):
        path = write_demo_adapter(tmp_path / kind, kind, tiny_checkpoint)
        engine = Engine(loaded, EngineConfig(max_batch_size=1, max_adapters=1))
        engine.add_adapter(kind, read_adapter(path, loaded.config))

        async def run():
            params = SamplingParams(max_new_tokens=6)
            return [t async for d in engine.generate(prompt, params, adapter=kind) for t in d.token_ids]

        expected = asyncio.run(run())
        asyncio.run(engine.shutdown())
        assert cli("--adapter", str(path)) == expected != base
