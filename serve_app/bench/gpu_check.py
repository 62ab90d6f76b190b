"""The prepared device check (`scripts/gpu_check.sh`): correctness, single-stream decode against the HBM roofline,
batched throughput and memory per precision, on random weights made on the device.

No Ray, no network, no checkpoint, no tokenizer: the import chain is torch and this package's model/engine/bench
modules only (a test runs it with ray, pydantic, fastapi, sentencepiece and friends blocked). Every section writes
`gpu_check.json` and `gpu_check.md` in the output directory as soon as it finishes, and a section that fails records
its error and lets the next one run, so one failure does not cost the rest.

Sections, most valuable first: environment, correctness, decode (per precision, with memory), throughput, attention
(decode step per attention backend, graphs on and off).

`--tiny-cpu` runs every section on CPU with the tiny preset and a few tokens: what the test suite runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serve_app.bench.engine import (
    LoadSummary,
    PromptVocab,
    device_bandwidth,
    format_table,
    memory_report,
    random_prompts,
    run_engine_load,
    run_sequential,
    summarize,
)
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.model.attention import Span, plan_step
from serve_app.model.demo import PRESETS, random_model


@dataclass
class Plan:
    """Sizes of one check run."""

    device: str
    small: str  # preset for the correctness section
    big: str  # preset for decode, throughput and memory
    half_dtypes: tuple[str, ...]  # precisions compared against CPU fp32
    precisions: tuple[str, ...]
    concurrency: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    decode_steps: int
    sequential_requests: int


GPU_PLAN = Plan("cuda", "small", "6b", ("fp16", "bf16"), ("fp16", "int8", "int4"), (1, 8, 32, 64, 128), 128, 128,
                32, 3)
CPU_PLAN = Plan("cpu", "tiny", "tiny", ("bf16",), ("fp32", "int8", "int4"), (1, 4), 16, 6, 4, 2)


class Report:
    """The results so far, rewritten to JSON and markdown after every section."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.sections: dict[str, dict] = {}
        self.markdown: dict[str, str] = {}

    def record(self, name: str, result: dict, markdown: str) -> None:
        self.sections[name] = result
        self.markdown[name] = markdown
        (self.out / "gpu_check.json").write_text(json.dumps(self.sections, indent=1, default=str))
        body = "\n\n".join(f"## {section}\n\n{text}" for section, text in self.markdown.items())
        (self.out / "gpu_check.md").write_text(f"# Device check\n\n{body}\n")
        print(f"[gpu_check] {name}: done", flush=True)


def run_section(report: Report, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        result, markdown = fn()
        result["seconds"] = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded, and the next section still runs
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:],
                  "seconds": time.perf_counter() - start}
        markdown = f"FAILED: `{result['error']}`"
        print(f"[gpu_check] {name}: FAILED {result['error']}", flush=True)
    report.record(name, result, markdown)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section_environment(plan: Plan) -> tuple[dict, str]:
    device = torch.device(plan.device)
    result = {"torch": torch.__version__, "python": platform.python_version(), "device": plan.device,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "bandwidth_bytes_per_s": device_bandwidth(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["capability"] = torch.cuda.get_device_capability(device)
        result["cuda"] = torch.version.cuda
    return result, "\n".join(f"- {key}: {value}" for key, value in result.items())


def _full_logits(loaded, tokens: list[int]) -> torch.Tensor:
    """All positions' logits through the packed path: [T, vocab] fp32 on CPU."""
    runner = ModelRunner(loaded, 1, len(tokens), graphs=False)
    plan = plan_step([Span(0, len(tokens), 0, 0)], tokens, runner.cache.max_len, loaded.device,
                     list(range(len(tokens))))
    return loaded.model.forward_packed(plan, runner.cache, runner.attention).cpu()


def section_correctness(plan: Plan) -> tuple[dict, str]:
    vocab = PromptVocab.of_sp_vocab(PRESETS[plan.small][1])
    prompt = random_prompts(vocab, 1, 64, seed=1)[0]
    reference = _full_logits(random_model(plan.small, "fp32", "cpu", weights_device="cpu"), prompt)
    result: dict = {"preset": plan.small, "positions": len(prompt), "vs_cpu_fp32": {}}
    lines = ["| precision | top-1 agreement | max abs logit error | max abs logit (fp32) |", "|---|---|---|---|"]
    for precision in plan.half_dtypes:
        loaded = random_model(plan.small, precision, plan.device, weights_device="cpu")
        logits = _full_logits(loaded, prompt)
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        error = (logits - reference).abs().max().item()
        result["vs_cpu_fp32"][precision] = {"top1_agreement": agree, "max_abs_error": error,
                                            "max_abs_logit": reference.abs().max().item()}
        lines.append(f"| {precision} | {agree:.3f} | {error:.4f} | {reference.abs().max().item():.2f} |")
        del loaded
    # The engine under concurrency against one request at a time, greedy, same device and precision.
    precision = plan.half_dtypes[0] if plan.device == "cuda" else "fp32"
    loaded = random_model(plan.small, precision, plan.device, weights_device="cpu")
    prompts = random_prompts(vocab, 8, 24, seed=2)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=0.95, top_p=0.7, seed=5)

    async def tokens(engine: Engine, batch: list[list[int]], p: SamplingParams) -> list[list[int]]:
        async def one(prompt):
            return [t async for delta in engine.generate(prompt, p) for t in delta.token_ids]

        return await asyncio.gather(*(one(prompt) for prompt in batch))

    async def compare() -> dict:
        engine = Engine(loaded, EngineConfig(max_batch_size=8, max_seq_len=64))
        figures = {}
        for name, p in (("greedy", params), ("top_p_0.7_seeded", sampled)):
            together = await tokens(engine, prompts, p)
            alone = [(await tokens(engine, [prompt], p))[0] for prompt in prompts]
            figures[name] = {"identical_sequences": sum(a == b for a, b in zip(together, alone)),
                             "of": len(prompts)}
        await engine.shutdown()
        return figures

    result["engine_concurrent_vs_alone"] = asyncio.run(compare())
    lines.append("")
    lines.append(f"Engine ({precision}, {plan.device}), 8 requests together vs one at a time, 16 tokens each: " + ", ".join(
        f"{name}: {v['identical_sequences']}/{v['of']} identical" for name, v in
        result["engine_concurrent_vs_alone"].items()))
    return result, "\n".join(lines)


def _decode_step_ms(loaded, batch: int, steps: int, prompt_len: int, attention: str = "auto",
                    graphs: bool | None = None) -> float:
    """Median decode step (ms) of `batch` rows after a `prompt_len` prefill, first step (capture) excluded."""
    runner = ModelRunner(loaded, batch, prompt_len + steps + 2, attention=attention, graphs=graphs)
    greedy = SamplingParams()
    tokens = runner.step([Work(list(range(10, 10 + prompt_len)), slot, 0, greedy) for slot in range(batch)])
    timings = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        tokens = runner.step([Work([t], slot, prompt_len + step, greedy) for slot, t in enumerate(tokens)])
        timings.append(time.perf_counter() - t0)
    del runner
    return sorted(timings[1:])[len(timings[1:]) // 2] * 1e3


def section_decode_and_memory(plan: Plan) -> tuple[dict, str]:
    device = torch.device(plan.device)
    bandwidth = device_bandwidth(device)
    result: dict = {"preset": plan.big, "precisions": {}}
    lines = [("| precision | weight GB | step ms (batch 1) | tok/s | roofline ms | of roofline | GPU GB allocated / "
              "reserved (peak) | RSS GB | load s |"), "|---|---|---|---|---|---|---|---|---|"]
    for precision in plan.precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            start = time.perf_counter()
            loaded = random_model(plan.big, precision, plan.device)
            load_s = time.perf_counter() - start
            step_ms = _decode_step_ms(loaded, 1, plan.decode_steps, 32)
            memory = memory_report(device)
            roofline_ms = loaded.weight_bytes() / bandwidth * 1e3 if bandwidth else None
            row = {"weight_bytes": loaded.weight_bytes(), "step_ms": step_ms, "tokens_per_s": 1e3 / step_ms,
                   "roofline_ms": roofline_ms, "memory": memory, "load_s": load_s}
            del loaded
        except Exception as exc:  # noqa: BLE001 - one precision failing (e.g. no int4 kernel) keeps the others
            row = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        result["precisions"][precision] = row
        if "error" in row:
            lines.append(f"| {precision} | FAILED: `{row['error']}` |")
            continue
        gpu = "-"
        if "gpu_max_allocated_bytes" in row["memory"]:
            gpu = (f"{row['memory']['gpu_max_allocated_bytes'] / 1e9:.2f} / "
                   f"{row['memory']['gpu_max_reserved_bytes'] / 1e9:.2f}")
        roof = f"{roofline_ms:.2f}" if roofline_ms else "-"
        share = f"{100 * roofline_ms / step_ms:.0f}%" if roofline_ms else "-"
        lines.append(f"| {precision} | {row['weight_bytes'] / 1e9:.2f} | {step_ms:.2f} | {1e3 / step_ms:.1f} | {roof} | "
                     f"{share} | {gpu} | {row['memory']['rss_bytes'] / 1e9:.2f} | {load_s:.1f} |")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result, "\n".join(lines)


def section_throughput(plan: Plan) -> tuple[dict, str]:
    precision = plan.precisions[0]
    loaded = random_model(plan.big, precision, plan.device)
    vocab = PromptVocab.of_sp_vocab(PRESETS[plan.big][1])
    bandwidth = device_bandwidth(loaded.device)
    max_batch = max(plan.concurrency)
    result: dict = {"preset": plan.big, "precision": precision, "prompt_tokens": plan.prompt_tokens,
                    "new_tokens": plan.new_tokens, "modes": {}}
    modes = {"greedy": {}, "top_p_0.7": {"temperature": 0.95, "top_p": 0.7}}
    rows: list[LoadSummary] = []

    async def engine_runs(sampling: dict, seed: int) -> list[LoadSummary]:
        config = EngineConfig(max_batch, plan.prompt_tokens + plan.new_tokens, max_waiting=4 * max_batch)
        engine = Engine(loaded, config)
        params = SamplingParams(max_new_tokens=plan.new_tokens, ignore_eos=True, **sampling)
        warm = SamplingParams(max_new_tokens=4, ignore_eos=True, **sampling)
        # Warm-up: every bucket's graph gets captured here, not inside a measured level.
        for level in plan.concurrency:
            await run_engine_load(engine, random_prompts(vocab, level, plan.prompt_tokens, seed - level), warm, level)
        out = []
        for level in plan.concurrency:
            requests = max(8, 2 * level) if plan.device == "cuda" else level
            prompts = random_prompts(vocab, requests, plan.prompt_tokens, seed + level)  # fresh per level
            records, wall = await run_engine_load(engine, prompts, params, level)
            out.append(summarize("engine", level, records, wall))
            out[-1].roofline_tokens_per_s = level * bandwidth / loaded.weight_bytes() if bandwidth else None
            print(f"[gpu_check] throughput {sampling or 'greedy'} c{level}: {out[-1].output_tokens_per_s:.1f} tok/s",
                  flush=True)
        await engine.shutdown()
        return out

    for name, sampling in modes.items():
        levels = asyncio.run(engine_runs(sampling, seed=1000 * (len(result["modes"]) + 1)))
        rows += levels
        result["modes"][name] = [asdict(row) for row in levels]
    params = SamplingParams(max_new_tokens=plan.new_tokens, ignore_eos=True)
    baseline = summarize("sequential", 1, *run_sequential(
        loaded, random_prompts(vocab, plan.sequential_requests, plan.prompt_tokens, seed=99), params))
    result["sequential"] = asdict(baseline)
    rows.append(baseline)
    greedy = {row["concurrency"]: row["output_tokens_per_s"] for row in result["modes"]["greedy"]}
    sampled = {row["concurrency"]: row["output_tokens_per_s"] for row in result["modes"]["top_p_0.7"]}
    result["speedup_vs_sequential"] = {c: v / baseline.output_tokens_per_s for c, v in greedy.items()}
    result["top_p_over_greedy"] = {c: sampled[c] / greedy[c] for c in greedy}
    result["memory"] = memory_report(loaded.device)
    text = [format_table(rows), "", ("greedy rows first, then temperature 0.95 / top_p 0.7; `sequential` is one "
                                     "request at a time through the eager path (no batching, no graphs)"), "",
            "speedup vs sequential: " + ", ".join(f"c{c}: {v:.1f}x" for c, v in result["speedup_vs_sequential"].items()),
            "top_p 0.7 / greedy: " + ", ".join(f"c{c}: {v:.2f}" for c, v in result["top_p_over_greedy"].items())]
    return result, "```\n" + "\n".join(text) + "\n```"


def section_attention_ablation(plan: Plan) -> tuple[dict, str]:
    """Decode step time per attention backend, with and without graphs: the measurement the GPU choice rests on."""
    precision = plan.precisions[0]
    loaded = random_model(plan.big, precision, plan.device)
    variants = [("flex", None), ("flex", False), ("slot-view", False), ("gather", False)]
    if plan.device != "cuda":
        variants = [("slot-view", False), ("gather", False), ("flex", False)]  # no graphs, eager flex on CPU
    prompt_len = 256 if plan.device == "cuda" else 16
    batches = (1, 64) if plan.device == "cuda" else (1, 4)
    result: dict = {"preset": plan.big, "precision": precision, "prompt_tokens": prompt_len, "step_ms": {}}
    lines = ["| attention | graphs | " + " | ".join(f"step ms, batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for attention, graphs in variants:
        label = f"{attention}, graphs {'on' if graphs is None and plan.device == 'cuda' else 'off'}"
        cells = []
        for batch in batches:
            try:
                ms = _decode_step_ms(loaded, batch, plan.decode_steps, prompt_len, attention, graphs)
                result["step_ms"][f"{label}, batch {batch}"] = ms
                cells.append(f"{ms:.2f}")
            except Exception as exc:  # noqa: BLE001 - a backend that fails here is a result, not a stop
                result["step_ms"][f"{label}, batch {batch}"] = f"{type(exc).__name__}: {exc}"
                cells.append(f"FAILED: `{type(exc).__name__}: {str(exc)[:80]}`")
        lines.append(f"| {attention} | {label.split('graphs ')[1]} | " + " | ".join(cells) + " |")
    return result, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="results directory (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--tiny-cpu", action="store_true", help="every section on CPU with the tiny preset")
    parser.add_argument("--sections", default="environment,correctness,decode,throughput,attention")
    args = parser.parse_args(argv)
    plan = CPU_PLAN if args.tiny_cpu else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny-cpu")
    report = Report(args.out)
    sections = {"environment": section_environment, "correctness": section_correctness,
                "decode": section_decode_and_memory, "throughput": section_throughput,
                "attention": section_attention_ablation}
    for name in args.sections.split(","):
        run_section(report, name, lambda section=sections[name]: section(plan))
    failed = [name for name, result in report.sections.items() if "error" in result]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
