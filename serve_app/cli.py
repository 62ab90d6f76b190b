"""The `chatglm2-serve` command: demo checkpoints, one-shot generation, quantization, benchmarks and chat."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens")
    parser.add_argument("--max-length", type=int, default=None, help="cap on prompt + generated tokens (official)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _add_model_args(parser: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    from serve_app.model.loader import PRECISIONS

    parser.add_argument("--checkpoint", type=Path, required=checkpoint_required,
                        help="official ChatGLM2 checkpoint directory")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from serve_app.model.demo import write_demo_checkpoint

    out = write_demo_checkpoint(args.out, args.preset, safetensors=args.safetensors)
    print(f"wrote {args.preset} demo checkpoint to {out}", file=sys.stderr)
    return 0


def _adapter_generator(loaded, path: Path):
    """generate(loaded, prompt_ids, params, on_token) with the adapter in `path` (P-tuning v2 or LoRA): the batching
    engine with that one adapter (the one-at-a-time path has none)."""
    import asyncio

    from serve_app.engine.engine import Engine, EngineConfig
    from serve_app.engine.sequential import GenerationOutput
    from serve_app.model.adapters import read_adapter

    adapter = read_adapter(path, loaded.config)
    rank = adapter.rank if adapter.kind == "lora" else 1
    engine = Engine(loaded, EngineConfig(max_batch_size=1, max_adapters=1, max_lora_rank=rank))
    engine.add_adapter(path.name, adapter)

    def generate(_loaded, prompt_ids, params, on_token=None):
        async def run():
            ids, reason = [], None
            async for delta in engine.generate(prompt_ids, params, adapter=path.name):
                for token in delta.token_ids:
                    ids.append(token)
                    if on_token is not None:
                        on_token(token)
                reason = delta.finish_reason or reason
            return ids, reason

        ids, reason = asyncio.run(run())
        return GenerationOutput(list(prompt_ids), ids, reason)

    return generate


def cmd_generate(args: argparse.Namespace) -> int:
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sequential import generate
    from serve_app.model.checkpoint import read_config
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer

    read_config(args.checkpoint)  # the clearest error for a wrong directory comes from its config
    history = json.loads(args.history) if args.history else []
    tokenizer = ChatGLM2Tokenizer(args.checkpoint)
    prompt_ids = tokenizer.build_chat_input(args.prompt, history)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
    )
    loaded = load_model(args.checkpoint, args.precision, args.device)
    if args.adapter is not None:
        generate = _adapter_generator(loaded, args.adapter)
    detok = IncrementalDetokenizer(tokenizer)

    def show(token: int) -> None:
        if not args.json:
            print(detok.push(token), end="", flush=True)

    out = generate(loaded, prompt_ids, params, on_token=show)
    if args.json:
        for token in out.token_ids:
            detok.push(token)
    tail = detok.finish()
    if args.json:
        usage = {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(out.token_ids),
            "total_tokens": len(out.prompt_token_ids) + len(out.token_ids),
        }
        result = {
            "text": detok.text,
            "token_ids": out.token_ids,
            "prompt_token_ids": out.prompt_token_ids,
            "finish_reason": out.finish_reason,
            "usage": usage,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(tail)
    return 0


def _load_bench_model(args: argparse.Namespace):
    """(LoadedModel, PromptVocab) from --checkpoint, or random weights of --preset made on the device."""
    from serve_app.bench.engine_bench import PromptVocab

    if args.random_weights:
        from serve_app.model.demo import PRESETS, random_model

        loaded = random_model(args.preset, args.precision, args.device)
        return loaded, PromptVocab.of_sp_vocab(PRESETS[args.preset][1])
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer

    return load_model(args.checkpoint, args.precision, args.device), PromptVocab.of_tokenizer(
        ChatGLM2Tokenizer(args.checkpoint))


def _add_random_weight_args(parser: argparse.ArgumentParser) -> None:
    from serve_app.model.demo import PRESETS

    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint: random weights of --preset, made directly on the device")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small",
                        help="model shapes for --random-weights")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from serve_app.bench.engine_bench import BenchConfig, format_report, run_benchmark

    try:
        concurrency = [int(level) for level in args.concurrency.split(",")]
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, not {args.concurrency!r}") from None
    if min(concurrency) < 1 or args.requests < 1 or args.max_new_tokens < 1:
        raise ValueError("--concurrency levels, --requests and --max-new-tokens must be >= 1")
    if args.adapter_mix:
        return _bench_adapters(args)
    if args.url and args.checkpoint:
        return _bench_compare(args, concurrency)
    if args.url:
        return _bench_http(args, concurrency)
    if args.checkpoint is None and not args.random_weights:
        raise ValueError("bench needs --checkpoint DIR or --random-weights (in-process), or --url URL (a running "
                         "application)")
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = BenchConfig(
        concurrency=concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        max_batch_size=args.max_batch_size,
        compare_sequential=args.compare_sequential,
        prefix_turns=args.prefix_turns,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        bandwidth_gbs=args.bandwidth_gbs,
    )
    loaded, vocab = _load_bench_model(args)
    result = run_benchmark(loaded, vocab, bench, lambda line: print(line, file=sys.stderr))
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_adapters(args: argparse.Namespace) -> int:
    import torch

    from serve_app.bench.adapters import format_adapter_report, run_adapter_bench

    if args.checkpoint is None:
        raise ValueError("bench --adapter-mix needs --checkpoint DIR (its demo adapters are made for that checkpoint)")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_adapter_bench(args.checkpoint, adapters=args.adapter_mix, requests=args.requests,
                               prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                               rounds=args.rounds, max_batch_size=args.max_batch_size, seed=args.seed,
                               log=lambda line: print(line, file=sys.stderr))
    print(format_adapter_report(result))
    return 0


def _bench_http(args: argparse.Namespace, concurrency: list[int]) -> int:
    from serve_app.bench.served import format_http_report, plot, run_http_benchmark

    models = [m for m in (args.models or "").split(",") if m]
    results = run_http_benchmark(args.url, models, concurrency, args.requests, args.prompt_tokens,
                                 args.max_new_tokens, args.seed)
    print(format_http_report(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"url": args.url, "results": results}))
    return 0


def _bench_compare(args: argparse.Namespace, concurrency: list[int]) -> int:
    import torch

    from serve_app.bench.compare import CompareConfig, format_comparison, run_comparison
    from serve_app.bench.served import models_of

    models = [m for m in (args.models or "").split(",") if m] or models_of(args.url.rstrip("/"))[:1]
    if len(models) != 1:
        raise ValueError("with --checkpoint and --url, --models names the one pool to compare with")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CompareConfig(str(args.checkpoint), args.url, models[0], args.precision, args.device, concurrency,
                           args.requests, args.prompt_tokens, args.max_new_tokens, args.max_batch_size,
                           args.rounds, args.seed)
    result = run_comparison(config)
    print(format_comparison(result))
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from serve_app.model.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(args.src, args.out, args.bits)
    print(f"wrote int{args.bits} checkpoint to {out}", file=sys.stderr)
    return 0


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from serve_app.bench.precision import run, table

    batches = [int(b) for b in args.batch.split(",")]
    if (args.checkpoint is None) == (not args.random_weights):
        raise ValueError("bench-precision needs exactly one of --checkpoint DIR or --random-weights")
    source = f"random:{args.preset}" if args.random_weights else str(args.checkpoint)
    results = run(source, args.precisions.split(","), args.device, batches, args.steps, args.prompt_tokens,
                  args.bandwidth_gbs)
    print(table(results, batches))
    if args.json:
        print(json.dumps(results))
    return 0


CHAT_BANNER = "欢迎使用 ChatGLM2-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"


def _chat_over_http(args: argparse.Namespace):
    """Returns reply(query, history, show) -> answer; `show` gets each delta streamed from the OpenAI endpoint."""
    import httpx

    from serve_app.client import openai_chunks

    if args.max_length is not None:
        raise ValueError("--max-length applies to --checkpoint; over --url use --max-new-tokens (OpenAI max_tokens)")
    url = args.url.rstrip("/") + "/v1/chat/completions"
    client = httpx.Client(timeout=httpx.Timeout(10.0, read=None))

    def reply(query: str, history: list[tuple[str, str]], show) -> str:
        messages, parts = [], []
        for past_query, past_response in history:
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_response}]
        body = {"model": args.model, "messages": messages + [{"role": "user", "content": query}], "stream": True,
                "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_new_tokens,
                "seed": args.seed}
        with client.stream("POST", url, json={k: v for k, v in body.items() if v is not None}) as response:
            if response.status_code != 200:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text
                raise RuntimeError(f"server answered {response.status_code}: {message}")
            for chunk in openai_chunks(response.iter_lines()):  # an error event raises StreamError
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        parts.append(choice["delta"]["content"])
                        show(parts[-1])
        return "".join(parts)

    return reply


def _chat_in_process(args: argparse.Namespace):
    """Returns reply(query, history, show) -> answer; `show` gets each delta as this process generates it."""
    from serve_app.engine.params import SamplingParams
    from serve_app.engine.sequential import generate
    from serve_app.model.checkpoint import read_config
    from serve_app.model.loader import load_model
    from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer

    read_config(args.checkpoint)
    tokenizer = ChatGLM2Tokenizer(args.checkpoint)
    loaded = load_model(args.checkpoint, args.precision, args.device)
    if args.adapter is not None:
        generate = _adapter_generator(loaded, args.adapter)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, max_length=args.max_length)

    def reply(query: str, history: list[tuple[str, str]], show) -> str:
        detok = IncrementalDetokenizer(tokenizer)
        generate(loaded, tokenizer.build_chat_input(query, history), params, on_token=lambda t: show(detok.push(t)))
        show(detok.finish())
        return detok.text

    return reply


def cmd_chat(args: argparse.Namespace) -> int:
    """The official cli_demo.py: type to chat, `clear` resets the history, `stop` (or end of input) exits."""
    if (args.url is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --url (a running server) or --checkpoint (chat in this process)")
    reply = _chat_over_http(args) if args.url else _chat_in_process(args)
    history: list[tuple[str, str]] = []
    print(CHAT_BANNER)
    while True:
        try:
            query = input("\n用户：").strip()
        except EOFError:
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            history = []
            print("(对话历史已清空 / history cleared)")
            continue
        if not query:
            continue
        print("\nChatGLM2：", end="", flush=True)
        try:
            answer = reply(query, history, lambda delta: print(delta, end="", flush=True))
        except KeyboardInterrupt:
            print("\n(已中断 / interrupted)")
            continue
        except (ValueError, RuntimeError, OSError) as exc:  # a bad turn (too long, server error) keeps the session
            print(f"\nchatglm2-serve: error: {exc}", file=sys.stderr)
            continue
        print()
        history.append((query, answer))


def build_parser() -> argparse.ArgumentParser:
    # The choices and defaults are the implementing modules' own (one definition each).
    from serve_app.engine.engine_config import EngineConfig
    from serve_app.model.attention import BACKENDS
    from serve_app.model.demo import PRESETS

    parser = argparse.ArgumentParser(prog="chatglm2-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-checkpoint", help="write a random-weight checkpoint in the official layout")
    demo.add_argument("out", type=Path)
    demo.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    demo.add_argument("--safetensors", action="store_true", help="write *.safetensors instead of pytorch_model*.bin")
    demo.set_defaults(func=cmd_demo_checkpoint)

    gen = commands.add_parser("generate", help="stream one chat reply from a checkpoint")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--history", default=None, help="JSON list of [query, response] pairs")
    _add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--adapter", type=Path, default=None, help="a P-tuning v2 checkpoint or peft LoRA directory")
    gen.set_defaults(func=cmd_generate)

    quantize = commands.add_parser("quantize", help="write an official pre-quantized int8/int4 checkpoint")
    quantize.add_argument("src", type=Path, help="full-precision checkpoint directory")
    quantize.add_argument("out", type=Path)
    quantize.add_argument("--bits", type=int, choices=(4, 8), required=True)
    quantize.set_defaults(func=cmd_quantize)

    bench = commands.add_parser("bench", help="in-process throughput benchmark: batching engine vs one at a time")
    _add_model_args(bench, checkpoint_required=False)
    bench.add_argument("--url", default=None, help="load-test a running application over HTTP instead; with "
                       "--checkpoint too, run the same requests both ways and print the ratio")
    bench.add_argument("--models", default=None, help="with --url: comma-separated pools (default: all; with "
                       "--checkpoint: the one pool to compare, default the first)")
    bench.add_argument("--rounds", type=int, default=1, help="with --checkpoint and --url: alternating rounds")
    bench.add_argument("--plot", default=None, help="with --url: write a PNG plot of the sweep here")
    bench.add_argument("--concurrency", default="1,4,16", help="comma-separated requests in flight, e.g. 1,4,16")
    bench.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt, [gMASK] sop included")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request (ignore_eos)")
    bench.add_argument("--max-batch-size", type=int, default=EngineConfig.max_batch_size, help="engine slots")
    bench.add_argument("--compare-sequential", action="store_true", help="also run the requests one at a time")
    bench.add_argument("--adapter-mix", type=int, default=0, metavar="N",
                       help="with --checkpoint: --requests at once over N demo adapters (P-tuning v2 and LoRA) and "
                       "the base model, against the base model alone (serve_app/bench/adapters.py)")
    bench.add_argument("--prefix-turns", action="store_true", help="turn-2 TTFT with and without prefix caching")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    bench.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0 = "
                       "greedy); the official api.py defaults are 0.95 with --top-p 0.7")
    bench.add_argument("--top-p", type=float, default=1.0)
    bench.add_argument("--attention", choices=BACKENDS, default=EngineConfig.attention,
                       help="engine attention backend (auto: flex on CUDA, slot views on CPU; gather: the old "
                       "formulation, for comparison)")
    bench.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay decode steps from CUDA graphs (default: on CUDA)")
    bench.add_argument("--bandwidth-gbs", type=float, default=None,
                       help="device memory bandwidth for the roofline column (default: from the GPU's name)")
    _add_random_weight_args(bench)
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    bench.set_defaults(func=cmd_bench)

    prec = commands.add_parser("bench-precision", help="decode speed and resident memory per precision")
    prec.add_argument("--checkpoint", type=Path, default=None)
    _add_random_weight_args(prec)
    prec.add_argument("--bandwidth-gbs", type=float, default=None, help="for the roofline column (GPU)")
    prec.add_argument("--precisions", default="fp32,int8,int4", help="comma-separated, each in its own process")
    prec.add_argument("--device", default="auto")
    prec.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes")
    prec.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    prec.add_argument("--prompt-tokens", type=int, default=32)
    prec.add_argument("--json", action="store_true")
    prec.set_defaults(func=cmd_bench_precision)

    chat = commands.add_parser("chat", help="interactive streaming chat: with a server (--url) or in-process")
    chat.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000 (OpenAI streaming)")
    chat.add_argument("--model", default=None, help="pool name with --url; default: the server's default")
    chat.add_argument("--checkpoint", type=Path, default=None, help="chat in this process with this checkpoint")
    chat.add_argument("--adapter", type=Path, default=None, help="with --checkpoint: a P-tuning v2 or LoRA adapter")
    chat.add_argument("--precision", default="auto", help="with --checkpoint: auto | fp32 | bf16 | fp16 | int8 | int4")
    chat.add_argument("--device", default="auto", help="with --checkpoint: auto | cpu | cuda[:N]")
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Checkpoint, tokenizer, limit and numeric errors are the user's to fix: say what, without a traceback.
        print(f"chatglm2-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
