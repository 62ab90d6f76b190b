"""Decode speed and resident memory per precision: `chatglm2-serve bench-precision`.

Each precision is measured in a fresh subprocess, so the resident memory it reports is that process's own growth
while loading (measured from /proc, not computed from shapes); on a GPU it also reports the allocator's peak
allocated and reserved bytes. Decode speed is the steady-state rate of the engine's own decode step (packed forward
and on-device sampling through `ModelRunner`, CUDA graphs on a GPU) after a short prefill, with the KV cache already
allocated. The source is a checkpoint directory or `random:<preset>` (random weights made on the device). On a GPU
each row also shows the weights-only roofline: weight bytes / bandwidth per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def load(source: str, precision: str, device: str):
    if source.startswith("random:"):
        from serve_app.model.demo import random_model

        return random_model(source.removeprefix("random:"), precision, device)
    from serve_app.model.loader import load_model

    return load_model(source, precision, device)


def measure(source: str, precision: str, device: str, batches: list[int], steps: int, prompt_len: int,
            bandwidth_gbs: float | None = None) -> dict:
    """Runs inside the subprocess: load, then time `steps` decode steps at each batch size."""
    from serve_app.bench.engine_bench import device_bandwidth
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.runner import ModelRunner, Work

    before = _rss_bytes()
    start = time.perf_counter()
    loaded = load(source, precision, device)
    load_s = time.perf_counter() - start
    resident = _rss_bytes() - before
    bandwidth = device_bandwidth(loaded.device, bandwidth_gbs)
    result = {"precision": loaded.precision, "load_s": load_s, "resident_bytes": resident,
              "weight_bytes": loaded.weight_bytes(), "decode": {},
              "roofline_step_ms": loaded.weight_bytes() / bandwidth * 1e3 if bandwidth else None}
    greedy = SamplingParams()
    for batch in batches:
        runner = ModelRunner(loaded, batch, prompt_len + steps + 2)
        prompts = torch.randint(10, 500, (batch, prompt_len)).tolist()
        tokens = runner.step([Work(p, slot, 0, greedy) for slot, p in enumerate(prompts)])
        timings = []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            tokens = runner.step([Work([t], slot, prompt_len + step, greedy) for slot, t in enumerate(tokens)])
            timings.append(time.perf_counter() - t0)  # the step returns host ids: the device is done
        step_s = sorted(timings[1:])[len(timings[1:]) // 2]  # median, first step excluded (warm-up, capture)
        result["decode"][str(batch)] = {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
        del runner
    if loaded.device.type == "cuda":
        result["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(loaded.device)
        result["gpu_max_reserved_bytes"] = torch.cuda.max_memory_reserved(loaded.device)
    return result


def run(source: str, precisions: list[str], device: str, batches: list[int], steps: int, prompt_len: int,
        bandwidth_gbs: float | None = None) -> list:
    results = []
    for precision in precisions:
        code = (
            "import json, sys; from serve_app.bench.precision import measure; "
            f"print(json.dumps(measure({source!r}, {precision!r}, {device!r}, {batches!r}, {steps}, {prompt_len}, "
            f"{bandwidth_gbs!r})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"precision": precision, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(_row(results[-1], batches), file=sys.stderr, flush=True)
    return results


def _row(result: dict, batches: list[int]) -> str:
    if "error" in result:
        return f"| {result['precision']} | failed: {result['error']} |"
    cells = [f"{result['decode'][str(b)]['tokens_per_s']:.2f} ({result['decode'][str(b)]['step_ms']:.1f} ms)"
             for b in batches]
    gpu = "-"
    if "gpu_max_allocated_bytes" in result:
        gpu = f"{result['gpu_max_allocated_bytes'] / 1e9:.2f} / {result['gpu_max_reserved_bytes'] / 1e9:.2f}"
    roofline = "-"
    if result.get("roofline_step_ms") and str(batches[0]) in result["decode"]:
        share = result["roofline_step_ms"] / result["decode"][str(batches[0])]["step_ms"]
        roofline = f"{result['roofline_step_ms']:.2f} ms ({100 * share:.0f}%)"
    return (f"| {result['precision']} | {result['resident_bytes'] / 1e9:.2f} | {gpu} | "
            f"{result['weight_bytes'] / 1e9:.2f} | " + " | ".join(cells) + f" | {roofline} | {result['load_s']:.1f} |")


def table(results: list, batches: list[int]) -> str:
    head = ("| precision | resident GB (measured) | GPU GB allocated / reserved (peak) | weight GB | "
            + " | ".join(f"decode tok/s, batch {b} (step)" for b in batches)
            + f" | roofline step (batch {batches[0]} at it) | load s |")
    rule = "|" + "---|" * (6 + len(batches))
    return "\n".join([head, rule, *(_row(r, batches) for r in results)])
