"""Decode speed and resident memory per precision: `chatglm2-serve bench-precision`.

Each precision is measured in a fresh subprocess, so the resident memory it reports is that process's own growth
while loading (measured from /proc, not computed from shapes). Decode speed is the steady-state rate of batched
decode steps after a short prefill, with the KV cache already allocated.
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


def measure(checkpoint: str, precision: str, device: str, batches: list[int], steps: int, prompt_len: int) -> dict:
    """Runs inside the subprocess: load, then time `steps` decode steps at each batch size."""
    from serve_app.model.chatglm2 import KVCache
    from serve_app.model.loader import load_model

    before = _rss_bytes()
    start = time.perf_counter()
    loaded = load_model(checkpoint, precision, device)
    load_s = time.perf_counter() - start
    resident = _rss_bytes() - before
    result = {"precision": loaded.precision, "load_s": load_s, "resident_bytes": resident,
              "weight_bytes": loaded.weight_bytes(), "decode": {}}
    config, model = loaded.config, loaded.model
    for batch in batches:
        cache = KVCache(config, batch, prompt_len + steps + 2, dtype=loaded.dtype, device=loaded.device)
        slots = torch.arange(batch, device=loaded.device)
        prompt = torch.randint(10, 500, (batch, prompt_len), device=loaded.device)
        model(prompt, torch.arange(prompt_len, device=loaded.device).expand(batch, -1), cache, slots, last_only=True)
        token = prompt[:, -1:]
        timings = []
        for step in range(steps + 1):
            positions = torch.full((batch, 1), prompt_len + step, device=loaded.device)
            t0 = time.perf_counter()
            token = model(token, positions, cache, slots, last_only=True).argmax(-1)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - t0)
        step_s = sorted(timings[1:])[len(timings[1:]) // 2]  # median, first step excluded (warm-up)
        result["decode"][str(batch)] = {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
        del cache
    return result


def run(checkpoint: str, precisions: list[str], device: str, batches: list[int], steps: int, prompt_len: int) -> list:
    results = []
    for precision in precisions:
        code = (
            "import json, sys; from serve_app.bench.precision import measure; "
            f"print(json.dumps(measure({checkpoint!r}, {precision!r}, {device!r}, {batches!r}, {steps}, {prompt_len})))"
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
    cells = [f"{result['decode'][str(b)]['tokens_per_s']:.2f} ({result['decode'][str(b)]['step_ms']:.0f} ms)"
             for b in batches]
    return (f"| {result['precision']} | {result['resident_bytes'] / 1e9:.2f} | {result['weight_bytes'] / 1e9:.2f} | "
            + " | ".join(cells) + f" | {result['load_s']:.1f} |")


def table(results: list, batches: list[int]) -> str:
    head = ("| precision | resident GB (measured) | weight GB | "
            + " | ".join(f"decode tok/s, batch {b} (step)" for b in batches) + " | load s |")
    rule = "|" + "---|" * (4 + len(batches))
    return "\n".join([head, rule, *(_row(r, batches) for r in results)])
