"""What the CPU decode path's two fixes are worth, side by side: oneDNN-packed linears and the one compute thread.

    PYTHONPATH=. python scripts/cpu_step_bench.py --checkpoint checkpoints/demo-small --threads 2

1. Engine steps (ModelRunner.step) with linears packed vs plain F.linear, interleaved round by round: a decode step
   at batch 1 and 16 (contexts of 150 tokens) and a 128-token prefill. Median ms per step.
2. One request at a time (48 tokens after a 128-token prompt) where the model is loaded on one thread and run on
   another, as a Serve replica does, with the compute thread bypassed (the runner's unconfined methods) against the
   same through the compute thread. Each case runs in a fresh process, because the effect is the process's OpenMP
   pools. Median seconds per request.
3. Greedy ids of the packed and the plain model for the bench's prompts (16 x 128 tokens -> 64): oneDNN sums in
   another order than MKL, so this counts the requests whose ids still agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch


def step_times(checkpoint: str, rounds: int) -> dict:
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.runner import ModelRunner, Work
    from serve_app.model.loader import load_model

    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    runners = {name: ModelRunner(load_model(checkpoint, "fp32", "cpu", pack_cpu_linears=packed), 16, 256)
               for name, packed in (("packed", True), ("plain", False))}
    cases = {
        "decode, batch 1": lambda r: r.step([Work([5], 0, 150, greedy)]),
        "decode, batch 16": lambda r: r.step([Work([5], s, 150, greedy) for s in range(16)]),
        "prefill, 128 tokens": lambda r: r.step([Work(list(range(3, 131)), 0, 0, greedy)]),
    }
    times = {(case, name): [] for case in cases for name in runners}
    for _ in range(rounds):
        for case, run in cases.items():
            for name, runner in runners.items():
                run(runner)  # warm
                start = time.perf_counter()
                for _ in range(3):
                    run(runner)
                times[(case, name)].append((time.perf_counter() - start) / 3 * 1e3)
    return {case: {name: statistics.median(times[(case, name)]) for name in runners} for case in cases}


def thread_case(checkpoint: str, case: str, repeats: int) -> list[float]:
    """In this (fresh) process: load on one thread, generate on another, `repeats` times."""
    from serve_app.engine import runner as runner_module
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sequential import generate
    from serve_app.model.loader import build_model, load_model

    if case == "bypassed":  # what the code did before: each call on the caller's thread
        runner_module.ModelRunner.__init__ = runner_module.ModelRunner.__init__.__wrapped__
        runner_module.ModelRunner.step = runner_module.ModelRunner.step.__wrapped__
        import serve_app.model.loader as loader_module

        loader_module.build_model = build_model.__wrapped__
    loaded = load_model(checkpoint, "fp32", "cpu")  # on this (main) thread, or on the compute thread
    prompt = [8001, 8003] + list(range(100, 226))
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    seconds: list[float] = []

    def requests() -> None:
        for _ in range(repeats):
            start = time.perf_counter()
            generate(loaded, prompt, params)
            seconds.append(time.perf_counter() - start)

    other = threading.Thread(target=requests)  # the engine's worker thread, in a replica
    other.start()
    other.join()
    return seconds


def greedy_agreement(checkpoint: str, requests: int = 16) -> tuple[int, list[int]]:
    """(requests whose 64 greedy ids agree packed vs plain, first differing position of each other one)."""
    from serve_app.bench.engine_bench import PromptVocab, random_prompts
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sequential import generate
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer

    prompts = random_prompts(PromptVocab.of_tokenizer(ChatGLM2Tokenizer(checkpoint)), requests, 128, 7919)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    packed, plain = (load_model(checkpoint, "fp32", "cpu", pack_cpu_linears=flag) for flag in (True, False))
    agree, first_differences = 0, []
    for prompt in prompts:
        a, b = generate(packed, prompt, params).token_ids, generate(plain, prompt, params).token_ids
        if a == b:
            agree += 1
        else:
            first_differences.append(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
    return agree, first_differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/demo-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--thread-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.thread_case:
        print(json.dumps(thread_case(args.checkpoint, args.thread_case, 3)))
        return

    print(f"{args.checkpoint}, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| step | F.linear (MKL) ms | oneDNN packed ms | speed-up |\n|---|---|---|---|")
    for case, ms in step_times(args.checkpoint, args.rounds).items():
        print(f"| {case} | {ms['plain']:.1f} | {ms['packed']:.1f} | {ms['plain'] / ms['packed']:.2f}x |")

    seconds: dict[str, list[float]] = {"bypassed": [], "compute thread": []}
    for _ in range(args.rounds):  # alternate the cases, a fresh process each
        for case in seconds:
            out = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--threads",
                                  str(args.threads), "--thread-case", case], capture_output=True, text=True, check=True)
            seconds[case] += json.loads(out.stdout.strip().splitlines()[-1])
    print("\nloaded on the main thread, generating on another (48 tokens after 128):")
    print("| model work runs on | s per request, median | min | max |\n|---|---|---|---|")
    for case, values in seconds.items():
        label = "the caller's thread (before)" if case == "bypassed" else "the compute thread"
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")

    agree, differences = greedy_agreement(args.checkpoint)
    print(f"\ngreedy ids, packed vs plain (16 x 128 -> 64 tokens): {agree}/16 requests identical"
          + (f"; the others first differ at positions {differences}" if differences else ""))


if __name__ == "__main__":
    main()
