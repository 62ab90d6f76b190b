"""The prepared device check (`scripts/gpu_check.sh`): the GPU path from its first compile to served throughput, on
random weights made on the device, in one run that cannot lose what it measured.

No Ray, no network, no checkpoint, no tokenizer: the import chain is torch and this package's model/engine/bench
modules only (a test runs it with ray, pydantic, fastapi, sentencepiece and friends blocked).

Sections, in order (each needs little of what comes after it, so the first ones are worth most when time runs out):

  environment    torch / triton / CUDA versions, device name, capability, bandwidth (from the device's name)
  smoke          flex compiled for every row bucket and every decode graph captured on the 6B shapes (the compile
                 and capture time), then one captured step at batch 1 and at batch 64
  decode_fp16    fp16 decode step at batch 1 and 64 through graphs, against the HBM roofline
  device_check   the start-up check of serve_app/engine/device_check.py on that serving path
  decode_quant   int8 and int4 (official format, Triton kernels): their device check and decode step at 1 and 64
  attention      decode step per attention path: graphs on/off, flex compiled/eager, the compiled step on/off
  throughput     the engine at concurrency 1/16/64/128 greedy and top_p 0.7 at 64; start-up (warm-up and device
                 check) seconds; 8 requests together vs alone (informational: a GPU is not batch-invariant)
  launches       aten ops and kernel launches per decode step (serve_app/bench/launches.py)

Every figure is written to `$OUT/gpu_check.json` and `gpu_check.md` as soon as it exists (atomically: a reader
never sees half a file). A section that fails keeps what it measured and records its error, and the next one runs.
SIGTERM (the `timeout` in gpu_check.sh) marks the running section interrupted, writes, and exits 124. Before each
section the run compares its own estimate of the section's seconds with what is left of `--budget-s` and skips it
(recorded as skipped) rather than start what it cannot finish.

`--tiny-cpu` runs every section on CPU with the tiny preset and a few tokens: what the test suite runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import platform
import signal
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serve_app.bench.engine_bench import (
    PromptVocab,
    device_bandwidth,
    format_table,
    memory_report,
    random_prompts,
    run_engine_load,
    run_sequential,
    summarize,
)
from serve_app.engine.device_check import run_device_check
from serve_app.engine.engine import Engine, EngineConfig
from serve_app.engine.params import SamplingParams
from serve_app.engine.runner import ModelRunner, Work
from serve_app.model.demo import PRESETS, random_model

FILLER_TOKEN = 5  # fed back in place of a -1 (non-finite logits): a real id, so no later step index-faults


@dataclass(frozen=True)
class Plan:
    """Sizes of one check run."""

    device: str
    preset: str
    precisions: tuple[str, ...]  # the dense one first, then the quantized pools
    batches: tuple[int, ...]  # decode step batch sizes
    slots: int  # KV slots of the decode runners (>= max(batches))
    prompt_tokens: int
    decode_steps: int
    concurrency: tuple[int, ...]
    sampled_concurrency: int  # top_p 0.7 is measured at this level
    new_tokens: int
    sequential_requests: int
    estimate_s: dict  # by section: what it costs on the target device (checked against --budget-s)


# The estimates are written from the work each section does (6B random weights on one H200: ~2 s to make, inductor
# compiles of flex per bucket, 24 graph captures, two whole-step compiles in the attention section) and are to be
# corrected from the first real run's "seconds" figures.
GPU_PLAN = Plan("cuda", "6b", ("fp16", "int8", "int4"), (1, 64), 64, 128, 32, (1, 16, 64, 128), 64, 128, 2,
                {"environment": 5, "smoke": 70, "decode_fp16": 10, "device_check": 10, "decode_quant": 70,
                 "attention": 120, "throughput": 90, "launches": 15})
CPU_PLAN = Plan("cpu", "tiny", ("fp32", "int8", "int4"), (1, 4), 4, 16, 4, (1, 4), 4, 6, 1,
                {name: 1 for name in ("environment", "smoke", "decode_fp16", "device_check", "decode_quant",
                                      "attention", "throughput", "launches")})
SECTIONS = tuple(GPU_PLAN.estimate_s)
BUDGET_S = 420.0


class Interrupted(BaseException):
    """SIGTERM arrived (gpu_check.sh's timeout): stop the running section, keep its figures."""


class Report:
    """Every section's figures and markdown so far, rewritten to disk on every change."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.sections: dict[str, dict] = {}
        self.markdown: dict[str, list[str]] = {}

    def section(self, name: str) -> Section:
        self.sections[name] = {"status": "running"}
        self.markdown[name] = []
        self.flush()
        return Section(self, name)

    def flush(self) -> None:
        _write_atomic(self.out / "gpu_check.json", json.dumps(self.sections, indent=1, default=str))
        body = "\n\n".join(f"## {name} ({self.sections[name].get('status')})\n\n" + "\n".join(lines)
                           for name, lines in self.markdown.items())
        _write_atomic(self.out / "gpu_check.md", f"# Device check\n\n{body}\n")


class Section:
    """One section's handle: `put` a figure, `line` a markdown line; each is on disk when the call returns."""

    def __init__(self, report: Report, name: str):
        self.report, self.name = report, name
        self.result = report.sections[name]

    def put(self, key: str, value) -> None:
        self.result[key] = value
        self.report.flush()

    def line(self, text: str) -> None:
        self.report.markdown[self.name].append(text)
        self.report.flush()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def run_section(report: Report, name: str, fn, plan: Plan, budget: Budget) -> str:
    """Run one section unless the budget cannot hold its estimate; returns its status."""
    estimate = plan.estimate_s.get(name, 0)
    if budget.left() < estimate:
        report.sections[name] = {"status": "skipped", "reason": f"estimated {estimate} s, {budget.left():.0f} s left "
                                                                 f"of the {budget.seconds:.0f} s budget"}
        report.markdown[name] = [f"skipped: {report.sections[name]['reason']}"]
        report.flush()
        print(f"[gpu_check] {name}: skipped ({report.sections[name]['reason']})", flush=True)
        return "skipped"
    section = report.section(name)
    start = time.perf_counter()
    status = "ok"
    try:
        fn(plan, section)
    except Interrupted:
        status = "interrupted"
        section.result["error"] = "SIGTERM during the section (timeout): the figures above are what it measured"
        raise
    except Exception as exc:  # noqa: BLE001 - recorded with what the section measured; the next section still runs
        status = "failed"
        section.result["error"] = f"{type(exc).__name__}: {exc}"
        section.result["traceback"] = traceback.format_exc()[-3000:]
        section.report.markdown[name].append(f"FAILED: `{section.result['error'][:300]}`")
    finally:
        section.result["status"] = status
        section.result["seconds"] = round(time.perf_counter() - start, 2)
        section.result["estimate_s"] = estimate
        report.flush()
        print(f"[gpu_check] {name}: {status} in {section.result['seconds']} s", flush=True)
        _release()
    return status


def _release() -> None:
    """Between sections: drop compiled graphs (a process has one recompile budget per function) and cached blocks."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# What the sections share: models made once (random weights on the device), the fp16 serving runner and figures.
_STATE: dict = {}


def _model(plan: Plan, precision: str):
    models = _STATE.setdefault("models", {})
    if precision not in models:
        start = time.perf_counter()
        models[precision] = random_model(plan.preset, precision, plan.device)
        _STATE.setdefault("load_s", {})[precision] = time.perf_counter() - start
    return models[precision]


def _drop_model(precision: str) -> None:
    _STATE.get("models", {}).pop(precision, None)
    _STATE.pop(f"runner_{precision}", None)
    _release()


def _serving_runner(plan: Plan, precision: str, **options) -> ModelRunner:
    """A runner as the engine builds one for this device (flex, graphs and compiled flex on CUDA)."""
    return ModelRunner(_model(plan, precision), plan.slots, plan.prompt_tokens + plan.decode_steps + 8, **options)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_step_ms(runner: ModelRunner, batch: int, steps: int, prompt_len: int) -> dict:
    """Median decode step (ms) of `batch` rows after a `prompt_len` prefill, the first step excluded. -1 ids
    (non-finite logits) are counted and replaced by FILLER_TOKEN before they are fed back."""
    greedy = SamplingParams()
    tokens = runner.step([Work(list(range(10, 10 + prompt_len)), slot, 0, greedy) for slot in range(batch)])
    nonfinite, timings = 0, []
    for step in range(steps + 1):
        nonfinite += sum(t == -1 for t in tokens)
        tokens = [FILLER_TOKEN if t == -1 else t for t in tokens]
        _sync()
        t0 = time.perf_counter()
        tokens = runner.step([Work([t], slot, prompt_len + step, greedy) for slot, t in enumerate(tokens)])
        _sync()
        timings.append(time.perf_counter() - t0)
    measured = sorted(timings[1:])
    return {"step_ms": measured[len(measured) // 2] * 1e3, "min_ms": measured[0] * 1e3, "nonfinite_ids": nonfinite}


def roofline_ms(runner: ModelRunner, batch: int, positions: int, bandwidth: float | None) -> float | None:
    """The step's floor on this device: every weight byte once plus the batch's KV (positions keys and values per
    layer), at the peak bandwidth."""
    if not bandwidth:
        return None
    config = runner.loaded.config
    kv = batch * positions * config.num_layers * 2 * config.kv_heads * config.kv_channels * runner.cache.k[0].element_size()
    return (runner.loaded.weight_bytes() + kv) / bandwidth * 1e3


def section_environment(plan: Plan, out: Section) -> None:
    device = torch.device(plan.device)
    out.put("torch", torch.__version__)
    try:
        import triton

        out.put("triton", triton.__version__)
    except ImportError:
        out.put("triton", None)
    out.put("python", platform.python_version())
    out.put("device", plan.device)
    if device.type == "cuda":
        out.put("device_name", torch.cuda.get_device_name(device))
        out.put("capability", list(torch.cuda.get_device_capability(device)))
        out.put("cuda", torch.version.cuda)
        out.put("total_memory_bytes", torch.cuda.get_device_properties(device).total_memory)
        out.put("sms", torch.cuda.get_device_properties(device).multi_processor_count)
    else:
        out.put("device_name", platform.processor() or platform.machine())
    out.put("bandwidth_bytes_per_s", device_bandwidth(device))
    out.put("cpu_threads", torch.get_num_threads())
    for key, value in out.result.items():
        if key != "status":
            out.line(f"- {key}: {value}")


def section_smoke(plan: Plan, out: Section) -> None:
    dense = plan.precisions[0]
    _model(plan, dense)
    out.put("load_s", _STATE["load_s"][dense])
    runner = _serving_runner(plan, dense)
    out.put("path", runner.path)
    out.line(f"path: {runner.path}; weights made in {_STATE['load_s'][dense]:.1f} s")
    warm = runner.warmup()
    out.put("warmup", warm)
    out.line(f"compile + capture, every bucket: {warm['seconds']:.1f} s (buckets {warm['buckets']}, "
             f"{warm['graphs']} graphs)")
    greedy = SamplingParams()
    for batch in plan.batches:
        first = runner.step([Work([10 + i for i in range(8)], slot, 0, greedy) for slot in range(batch)])
        _sync()
        t0 = time.perf_counter()
        ids = runner.step([Work([max(t, FILLER_TOKEN)], slot, 8, greedy) for slot, t in enumerate(first)])
        _sync()
        out.put(f"batch_{batch}", {"first_step_ms": (time.perf_counter() - t0) * 1e3,
                                   "nonfinite_ids": sum(t == -1 for t in ids)})
        out.line(f"batch {batch}: one decode step ran ({out.result[f'batch_{batch}']['first_step_ms']:.2f} ms), "
                 f"{out.result[f'batch_{batch}']['nonfinite_ids']} non-finite rows")
    _STATE[f"runner_{dense}"] = runner


def _decode_rows(plan: Plan, out: Section, precision: str, runner: ModelRunner) -> None:
    bandwidth = device_bandwidth(torch.device(plan.device))
    for batch in plan.batches:
        figures = decode_step_ms(runner, batch, plan.decode_steps, plan.prompt_tokens)
        floor = roofline_ms(runner, batch, plan.prompt_tokens + plan.decode_steps // 2, bandwidth)
        figures |= {"tokens_per_s": batch * 1e3 / figures["step_ms"], "roofline_ms": floor,
                    "of_roofline": floor / figures["step_ms"] if floor else None}
        dense = _STATE.get("dense_step_ms", {}).get(batch)
        if dense and precision != plan.precisions[0]:
            figures["speedup_vs_dense"] = dense / figures["step_ms"]
        out.put(f"batch_{batch}", figures)
        share = f"{100 * figures['of_roofline']:.0f}%" if floor else "-"
        speedup = f"{figures['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in figures else "-"
        out.line(f"| {precision} | {batch} | {figures['step_ms']:.3f} | {figures['tokens_per_s']:.0f} | "
                 f"{f'{floor:.3f}' if floor else '-'} | {share} | {speedup} | {figures['nonfinite_ids']} |")
        if precision == plan.precisions[0]:
            _STATE.setdefault("dense_step_ms", {})[batch] = figures["step_ms"]


DECODE_HEADER = ["| precision | batch | step ms (median) | tok/s | roofline ms | of roofline | x dense | non-finite |",
                 "|---|---|---|---|---|---|---|---|"]


def section_decode_fp16(plan: Plan, out: Section) -> None:
    dense = plan.precisions[0]
    runner = _STATE.get(f"runner_{dense}") or _serving_runner(plan, dense)
    _STATE[f"runner_{dense}"] = runner
    out.put("path", runner.path)
    out.put("weight_bytes", runner.loaded.weight_bytes())
    for text in DECODE_HEADER:
        out.line(text)
    _decode_rows(plan, out, dense, runner)
    out.put("memory", memory_report(runner.device))


def section_device_check(plan: Plan, out: Section) -> None:
    dense = plan.precisions[0]
    runner = _STATE.get(f"runner_{dense}") or _serving_runner(plan, dense)
    result = run_device_check(runner).as_dict()
    out.put(dense, result)
    out.line(_check_line(dense, result))


def _check_line(precision: str, check: dict) -> str:
    verdict = "passed" if check["passed"] else f"FAILED ({check['detail']})"
    return (f"- {precision}: {verdict}; path {check['path']} vs {check['reference']}; max |logit error| "
            f"{check['max_abs_error']:.4g} (bound {check['bound']:.4g}); greedy agreement "
            f"{check['greedy_agreement']:.3f}; {check['seconds']:.2f} s")


def section_decode_quant(plan: Plan, out: Section) -> None:
    for text in DECODE_HEADER:
        out.line(text)
    checks = []
    for precision in plan.precisions[1:]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            runner = _serving_runner(plan, precision)
            out.put(f"{precision}_path", runner.path)
            out.put(f"{precision}_load_s", _STATE["load_s"][precision])
            out.put(f"{precision}_warmup", runner.warmup())
            check = run_device_check(runner).as_dict()
            out.put(f"{precision}_device_check", check)
            _decode_rows(plan, out, precision, runner)
            out.put(f"{precision}_weight_bytes", runner.loaded.weight_bytes())
            out.put(f"{precision}_memory", memory_report(runner.device))
            checks.append(_check_line(precision, check))
        except Exception as exc:  # noqa: BLE001 - one precision failing keeps the other's figures
            out.put(f"{precision}_error", f"{type(exc).__name__}: {exc}")
            out.put(f"{precision}_traceback", traceback.format_exc()[-2000:])
            out.line(f"| {precision} | FAILED: `{type(exc).__name__}: {str(exc)[:200]}` |")
        finally:
            _drop_model(precision)
    out.line("")
    for text in checks:
        out.line(text)


def section_attention(plan: Plan, out: Section) -> None:
    """Decode step per attention path on the dense model: the measurement the defaults rest on."""
    dense = plan.precisions[0]
    _STATE.pop(f"runner_{dense}", None)
    _release()
    if plan.device == "cuda":
        variants = [("flex compiled, graphs", {}),
                    ("flex compiled, graphs of the compiled step", {"compile_decode": True}),
                    ("flex compiled, no graphs", {"graphs": False}),
                    ("flex eager, no graphs", {"graphs": False, "compile_flex": False}),
                    ("slot-view, no graphs", {"attention": "slot-view", "graphs": False}),
                    ("gather, no graphs", {"attention": "gather", "graphs": False})]
    else:  # no graphs here (no CUDA), and compiling on CPU is the test suite's business
        variants = [("flex eager, no graphs", {"attention": "flex", "graphs": False, "compile_flex": False}),
                    ("slot-view, no graphs", {"attention": "slot-view", "graphs": False}),
                    ("gather, no graphs", {"attention": "gather", "graphs": False})]
    out.line("| attention path | " + " | ".join(f"step ms, batch {b}" for b in plan.batches) + " | device check |")
    out.line("|---|" + "---|" * (len(plan.batches) + 1))
    for label, options in variants:
        cells, figures = [], {}
        try:
            if options.get("compile_decode"):  # each (bucket, variant) is a whole-model compile: only the two used
                options = options | {"buckets": plan.batches}
            runner = _serving_runner(plan, dense, **options)
            start = time.perf_counter()
            for batch in plan.batches:
                ms = decode_step_ms(runner, batch, plan.decode_steps, plan.prompt_tokens)["step_ms"]
                figures[f"batch_{batch}_step_ms"] = ms
                cells.append(f"{ms:.3f}")
            figures["seconds_with_compiles"] = time.perf_counter() - start
            check = run_device_check(runner).as_dict()
            figures["device_check_passed"] = check["passed"]
            figures["device_check_max_abs_error"] = check["max_abs_error"]
            cells.append("passed" if check["passed"] else f"FAILED: {check['detail'][:80]}")
        except Exception as exc:  # noqa: BLE001 - a path that fails here is a result, not a stop
            figures["error"] = f"{type(exc).__name__}: {exc}"
            cells.append(f"FAILED: `{type(exc).__name__}: {str(exc)[:120]}`")
        out.put(label, figures)
        out.line(f"| {label} | " + " | ".join(cells) + " |")
        runner = None
        _release()


def section_throughput(plan: Plan, out: Section) -> None:
    dense = plan.precisions[0]
    loaded = _model(plan, dense)
    vocab = PromptVocab.of_sp_vocab(PRESETS[plan.preset][1])
    bandwidth = device_bandwidth(loaded.device)
    max_batch = max(plan.concurrency)
    out.put("preset", plan.preset)
    out.put("precision", dense)
    out.put("prompt_tokens", plan.prompt_tokens)
    out.put("new_tokens", plan.new_tokens)
    rows = []

    async def measure() -> None:
        start = time.perf_counter()
        engine = Engine(loaded, EngineConfig(max_batch, plan.prompt_tokens + plan.new_tokens, max_waiting=4 * max_batch))
        stats = engine.stats()
        out.put("engine_start_s", time.perf_counter() - start)
        out.put("engine_warmup", engine.warmup)
        out.put("engine_device_check", stats.device_check)
        out.put("decode_path", stats.decode_path)
        out.line(f"engine start-up {out.result['engine_start_s']:.1f} s (warm-up {engine.warmup['seconds']:.1f} s, "
                 f"device check {(stats.device_check or {}).get('seconds', 0):.2f} s); path {stats.decode_path}")
        levels = [("greedy", c, {}) for c in plan.concurrency]
        levels.append(("top_p_0.7", plan.sampled_concurrency, {"temperature": 0.95, "top_p": 0.7}))
        for mode, level, sampling in levels:
            params = SamplingParams(max_new_tokens=plan.new_tokens, ignore_eos=True, **sampling)
            await run_engine_load(engine, random_prompts(vocab, level, plan.prompt_tokens, 7 * level),
                                  SamplingParams(max_new_tokens=2, ignore_eos=True, **sampling), level)
            requests = max(8, 2 * level) if plan.device == "cuda" else level
            records, wall = await run_engine_load(
                engine, random_prompts(vocab, requests, plan.prompt_tokens, 1000 + level), params, level)
            summary = summarize(f"engine {mode}", level, records, wall)
            summary.roofline_tokens_per_s = level * bandwidth / loaded.weight_bytes() if bandwidth else None
            rows.append(summary)
            out.put(f"{mode}_c{level}", asdict(summary))
            print(f"[gpu_check] throughput {mode} c{level}: {summary.output_tokens_per_s:.1f} tok/s", flush=True)
        greedy = out.result.get(f"greedy_c{plan.sampled_concurrency}")
        if greedy:
            sampled = out.result[f"top_p_0.7_c{plan.sampled_concurrency}"]
            out.put("top_p_over_greedy", sampled["output_tokens_per_s"] / greedy["output_tokens_per_s"])
        # Informational: a GPU picks other kernels (cuBLAS, flex splits) for 8 rows than for 1, so a differing
        # sequence here is not by itself a bug; the device check is the correctness test.
        prompts = random_prompts(vocab, 8, plan.prompt_tokens // 2, seed=2)
        params = SamplingParams(max_new_tokens=min(16, plan.new_tokens), ignore_eos=True)

        async def tokens(prompt):
            return [t async for delta in engine.generate(prompt, params) for t in delta.token_ids]

        together = await asyncio.gather(*(tokens(p) for p in prompts))
        alone = [await tokens(p) for p in prompts]
        out.put("concurrent_vs_alone_identical", {"identical": sum(a == b for a, b in zip(together, alone)),
                                                  "of": len(prompts), "informational": True})
        await engine.shutdown()

    asyncio.run(measure())
    params = SamplingParams(max_new_tokens=plan.new_tokens, ignore_eos=True)
    baseline = summarize("sequential", 1, *run_sequential(
        loaded, random_prompts(vocab, plan.sequential_requests, plan.prompt_tokens, seed=99), params))
    out.put("sequential", asdict(baseline))
    rows.append(baseline)
    out.line("```\n" + format_table(rows) + "\n```")
    out.line("`sequential` is one request at a time through the eager path (no batching, no graphs). "
             f"top_p 0.7 / greedy at c{plan.sampled_concurrency}: {out.result.get('top_p_over_greedy', 0):.2f}. "
             f"8 requests together vs alone, greedy, {min(16, plan.new_tokens)} tokens: {out.result['concurrent_vs_alone_identical']['identical']}"
             "/8 identical (informational).")
    out.put("memory", memory_report(loaded.device))


def section_launches(plan: Plan, out: Section) -> None:
    from serve_app.bench.launches import count_step

    dense = plan.precisions[0]
    out.line("| path | rows | ops | ops per layer | mask builds | kernel launches | device kernels |")
    out.line("|---|---|---|---|---|---|---|")
    for label, options in (("serving", {}), ("eager", {"graphs": False})):
        runner = _serving_runner(plan, dense, **options)
        for rows in plan.batches:
            figures = count_step(runner, rows, context=plan.prompt_tokens).to_dict()
            out.put(f"{label}_rows_{rows}", figures)
            out.line(f"| {label}: {runner.path} | {rows} | {figures['ops']} | {figures['ops_per_layer']:.1f} | "
                     f"{figures['mask_builds']} | {figures['launches']} | {figures['device_kernels']} |")
        runner = None
        _release()


SECTION_FNS = {"environment": section_environment, "smoke": section_smoke, "decode_fp16": section_decode_fp16,
               "device_check": section_device_check, "decode_quant": section_decode_quant,
               "attention": section_attention, "throughput": section_throughput, "launches": section_launches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="results directory (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--tiny-cpu", action="store_true", help="every section on CPU with the tiny preset")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="skip a section whose estimate no longer fits (default %(default)s)")
    args = parser.parse_args(argv)
    plan = CPU_PLAN if args.tiny_cpu else GPU_PLAN
    unknown = [name for name in args.sections.split(",") if name not in SECTION_FNS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny-cpu")
    report = Report(args.out)
    budget = Budget(args.budget_s)
    planned = sum(plan.estimate_s[name] for name in args.sections.split(","))
    print(f"[gpu_check] {args.sections}: estimated {planned} s of a {args.budget_s:.0f} s budget", flush=True)

    def on_sigterm(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(report.flush)
    try:
        for name in args.sections.split(","):
            run_section(report, name, SECTION_FNS[name], plan, budget)
    except Interrupted:
        print(f"[gpu_check] interrupted; wrote {args.out / 'gpu_check.json'}", flush=True)
        return 124
    failed = [name for name, result in report.sections.items() if result.get("status") == "failed"]
    skipped = [name for name, result in report.sections.items() if result.get("status") == "skipped"]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md; failed: {failed or 'none'}; "
          f"skipped: {skipped or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
