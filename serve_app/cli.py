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


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from serve_app.model import PRECISIONS

    parser.add_argument("--checkpoint", type=Path, required=True, help="official ChatGLM2 checkpoint directory")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from serve_app.demo import write_demo_checkpoint

    out = write_demo_checkpoint(args.out, args.preset, safetensors=args.safetensors)
    print(f"wrote {args.preset} demo checkpoint to {out}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from serve_app.generate import generate
    from serve_app.model import load_model
    from serve_app.sampling import SamplingParams
    from serve_app.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatglm2-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-checkpoint", help="write a random-weight checkpoint in the official layout")
    demo.add_argument("out", type=Path)
    demo.add_argument("--preset", choices=("tiny", "small", "6b"), default="tiny")
    demo.add_argument("--safetensors", action="store_true", help="write *.safetensors instead of pytorch_model*.bin")
    demo.set_defaults(func=cmd_demo_checkpoint)

    gen = commands.add_parser("generate", help="stream one chat reply from a checkpoint")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--history", default=None, help="JSON list of [query, response] pairs")
    _add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=cmd_generate)
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
