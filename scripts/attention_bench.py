"""Time one layer of decode attention per backend on CPU (or --device cuda), at small-preset shapes.

    python scripts/attention_bench.py [--device cpu] [--threads 2] [--runs 40]

Prints the minimum over --runs of each backend's call (the minimum is the figure least disturbed by other load on a
shared machine). Each case: decode rows x context, rows at different lengths in random slots of a 16 x 1024 cache.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from serve_app.model.attention import FlexSlotAttention, GatherAttention, SlotViewAttention, Span, plan_step


def best_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--flex", action="store_true", help="also time flex (eager on CPU: a slow reference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    groups, heads, dim, slots, slot_len = 2, 8, 128, 16, 1024
    backends = [GatherAttention(), SlotViewAttention()]
    if args.flex:
        backends.append(FlexSlotAttention(compile=args.device.startswith("cuda")))
    cache_k = torch.randn(groups, slots, slot_len, dim, generator=generator).to(args.device)
    cache_v = torch.randn(groups, slots, slot_len, dim, generator=generator).to(args.device)
    print("| decode rows x context | " + " | ".join(b.name for b in backends) + " |")
    print("|---|" + "---|" * len(backends))
    for rows, context in ((1, 192), (16, 192), (16, 600)):
        lengths = torch.randint(context // 2, context + 1, (rows,), generator=generator).tolist()
        lengths[0] = context
        row_slots = torch.randperm(slots, generator=generator)[:rows].tolist()
        spans = [Span(i, 1, s, n - 1) for i, (s, n) in enumerate(zip(row_slots, lengths))]
        plan = plan_step(spans, [0] * rows, slot_len, args.device)
        q = torch.randn(rows, heads, dim, generator=generator).to(args.device)
        cache = SimpleNamespace(k=[cache_k], v=[cache_v], block_size=slot_len)
        for b in backends:
            b.prepare(plan, cache)  # once per step, as forward_packed does: not timed per layer
        cells = [f"{best_ms(lambda b=b, q=q, plan=plan: b(q, cache_k, cache_v, plan), args.runs):.3f} ms"
                 for b in backends]
        print(f"| {rows} x {'up to ' if rows > 1 else ''}{context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
