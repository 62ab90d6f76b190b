#!/usr/bin/env python
"""Bytes on the wire for one long streamed reply on the protocols that re-send the answer so far.

    python scripts/stream_bytes.py --url http://127.0.0.1:8000 --grpc-port 9000   # against a served app
    python scripts/stream_bytes.py --fake-engine 1000                              # starts its own app (below)

One chat turn with --history-turns earlier rounds of --turn-chars characters each, asked on `POST /stream` (SSE),
`/ws` (WebSocket) and gRPC `StreamChat`. For each: the messages received, the bytes received (the SSE body; the
WebSocket's text frames; each gRPC message's size plus its 5-byte frame header), the reply's own UTF-8 bytes and the
ratio of the two. Re-sending the whole answer in every message makes that ratio grow with the reply's length.

`--fake-engine N` starts Ray and Serve here with configs/local.yaml's first pool on tests/fake_engine.py (the real
ingress, tokenizer and prompt building; the reply is the prompt's own tokens, exactly N of them), so that every run
measures a reply of the same length. Prints a Markdown table; the numbers belong in docs/benchmarks.md. Run from
the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import grpc
import httpx
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.api.protos import chatglm2_pb2 as pb  # noqa: E402
from serve_app.api.protos.chatglm2_pb2_grpc import ChatGLM2Stub  # noqa: E402

GRPC_FRAME_HEADER = 5  # compressed flag + length, before every gRPC message


def history(turns: int, chars: int) -> list[list[str]]:
    text = ("历史对话 history " * chars)[: chars // 2]
    return [[f"{i} {text}", f"{i} {text}"] for i in range(turns)]


def sse(url: str, payload: dict) -> tuple[int, int, str]:
    received, events, answer = 0, 0, ""
    with httpx.stream("POST", f"{url}/stream", json=payload, timeout=600) as response:
        response.raise_for_status()
        lines = []
        for chunk in response.iter_raw():
            received += len(chunk)
            lines.append(chunk)
        for line in b"".join(lines).decode().splitlines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                events += 1
                answer = event["response"]
    return events, received, answer


def websocket(url: str, payload: dict) -> tuple[int, int, str]:
    received, messages, answer = 0, 0, ""
    with connect(url.replace("http", "ws", 1) + "/ws", open_timeout=30, max_size=None) as ws:
        ws.send(json.dumps(payload, ensure_ascii=False))
        for message in ws:
            received += len(message.encode() if isinstance(message, str) else message)
            messages += 1
            answer = json.loads(message)["resp"]
    return messages, received, answer


def grpc_chat(port: int, payload: dict) -> tuple[int, int, str]:
    received, messages, answer = 0, 0, ""
    turns = [pb.Turn(query=q, response=r) for q, r in payload["history"]]
    request = pb.ChatRequest(query=payload["query"], history=turns, max_length=payload["max_length"],
                             model=payload["model"])
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        for message in ChatGLM2Stub(channel).StreamChat(request, metadata=(("application", "chatglm2"),), timeout=600):
            received += message.ByteSize() + GRPC_FRAME_HEADER
            messages += 1
            answer = message.generated_text
    return messages, received, answer


def measure(url: str, grpc_port: int | None, payload: dict) -> list[tuple[str, int, int, str]]:
    rows = [("POST /stream (SSE)", *sse(url, payload)), ("/ws (WebSocket)", *websocket(url, payload))]
    if grpc_port:
        rows.append(("gRPC StreamChat", *grpc_chat(grpc_port, payload)))
    return rows


@contextlib.contextmanager
def fake_app(reply_tokens: int, token_delay_s: float, resend_divisor: int | None = None):
    import tempfile

    from serve_app.model.demo import write_demo_checkpoint
    from tests.serving import local_config, running

    checkpoint = write_demo_checkpoint(Path(tempfile.mkdtemp(prefix="stream-bytes-")), "tiny")
    pools = [{"model": "chatglm2-6b", "precision": "fp16"}]
    limits = {} if resend_divisor is None else {"limits": {"resend_divisor": resend_divisor}}
    config = local_config(checkpoint, fake_engine={"token_delay_s": token_delay_s, "max_reply_tokens": reply_tokens},
                          pools=pools, **limits)
    with running(config, grpc=True) as urls:
        yield urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--grpc-port", type=int, default=None, help="the app's gRPC proxy port (leave out: no gRPC)")
    parser.add_argument("--fake-engine", type=int, metavar="N", default=None,
                        help="start an app here on the fake engine, replying exactly N tokens")
    parser.add_argument("--token-delay", type=float, default=0.02,
                        help="with --fake-engine: seconds between tokens (0.02: 50 tokens/s, one GPU stream's pace)")
    parser.add_argument("--model", default="chatglm2-6b")
    parser.add_argument("--history-turns", type=int, default=4)
    parser.add_argument("--turn-chars", type=int, default=100, help="characters of each earlier round")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="prompt + reply tokens (the tiny demo model's context: 2048)")
    parser.add_argument("--resend-divisor", type=int, nargs="*", default=[None],
                        help="with --fake-engine: the app's limits.resend_divisor, one app per value, side by side "
                        "(leave out: the default)")
    args = parser.parse_args()
    payload = {"query": "讲一个长故事 tell a long story", "history": history(args.history_turns, args.turn_chars),
               "max_length": args.max_length, "model": args.model, "temperature": 0.01}

    rows = []
    for divisor in args.resend_divisor if args.fake_engine else [None]:
        app = (fake_app(args.fake_engine, args.token_delay, divisor) if args.fake_engine
               else contextlib.nullcontext((args.url, args.grpc_port)))
        with app as (url, grpc_port):
            rows += [("default" if divisor is None else str(divisor), *row) for row in measure(url, grpc_port, payload)]

    where = (f"fake engine, {args.fake_engine}-token reply at {1 / args.token_delay:.0f} tokens/s" if args.fake_engine
             else args.url)
    print(f"history: {args.history_turns} rounds of {args.turn_chars} characters; {where}")
    print("| resend_divisor | protocol | messages | bytes received | reply bytes (UTF-8) | received / reply |")
    print("|---|---|---:|---:|---:|---:|")
    for divisor, name, messages, received, answer in rows:
        reply = len(answer.encode())
        print(f"| {divisor} | {name} | {messages} | {received:,} | {reply:,} | {received / max(reply, 1):.1f} |")


if __name__ == "__main__":
    main()
