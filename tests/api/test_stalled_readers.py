"""Clients that stop reading, against the running application: Ray Serve's HTTP proxy runs the stalled-reader guard
(serve_app/api/proxy_guard.py, here with a 2 s send timeout), so a client that accepts no bytes loses its connection
and its generation is aborted, while a client that reads goes on as usual.

Nothing else pushes back on a stalled reader: without the guard the pool generates the whole reply into the proxy's
memory and the connection stays open for good. For the kernel's socket buffers (megabytes on loopback) to fill, the
reply must be larger than them: a 6,000-token reply re-sent in full in every `/stream` and `/ws` message
(resend_divisor 0, no coalescing) is tens of megabytes, and takes the fake engine 30 s to generate at its own pace, so a
generation that ends "abort" rather than "length" was cut off.
"""

from __future__ import annotations

import json
import shutil
import socket

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.serving import engine_stats, environment, local_config, running, wait_for

pytestmark = pytest.mark.slow

POOL = "chatglm2-6b"
REPLY_TOKENS = 6000
CONTEXT = 16_384
SEND_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory):
    # The tiny checkpoint with a longer context (the fake engine reads only its config and tokenizer).
    checkpoint = tmp_path_factory.mktemp("long") / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    model_config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(model_config | {"seq_length": CONTEXT}))
    config = local_config(checkpoint, fake_engine={"token_delay_s": 0.005},
                          pools=[{"model": POOL, "precision": "fp32"}], stream_coalesce_ms=0,
                          limits={"resend_divisor": 0},
                          engine={"max_batch_size": 8, "max_seq_len": CONTEXT, "max_waiting": 32})
    with environment(CHATGLM2_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S)), running(config) as (url, _):
        yield url


def finished(reason: str) -> int:
    return engine_stats(POOL).engine.finished.get(reason, 0)


def small_window(url: str) -> socket.socket:
    """A connection to the app with a 4 KiB receive buffer (the kernel would otherwise grow it to megabytes)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


def stalled_http_stream(url: str) -> socket.socket:
    """A `POST /stream` whose client reads nothing."""
    sock = small_window(url)
    body = json.dumps({"query": "hi", "history": [], "max_length": REPLY_TOKENS, "model": POOL}).encode()
    sock.sendall(b"POST /stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def test_an_http_reader_that_stops_reading_is_cut_off_and_its_generation_aborted(service):
    aborted, completed = finished("abort"), finished("length")
    sock = stalled_http_stream(service)
    try:
        # Meanwhile a client that reads gets its whole (short) answer.
        reader = httpx.post(f"{service}/stream", json={"query": "hi", "history": [], "max_length": 64, "model": POOL},
                            timeout=60)
        assert reader.status_code == 200
        assert json.loads(reader.text.strip().splitlines()[-1].removeprefix("data:"))["finished"] is True
        wait_for(lambda: finished("abort") > aborted, 60, "the stalled stream's generation to be aborted")
        assert engine_stats(POOL).engine.running == 0  # its slot is free
        received = read_to_end(sock)  # what the kernel's buffers held; then the proxy closed the connection
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"finished": true' not in received and b'"finished":true' not in received
    assert not received.endswith(b"0\r\n\r\n")  # no last chunk: cut off, not completed
    assert finished("length") == completed + 1  # only the reader's request ran to its end


def test_a_websocket_reader_that_stops_reading_is_cut_off_and_its_generation_aborted(service):
    aborted = finished("abort")
    # max_queue=1: websockets stops reading the socket once one message waits unread, as a stuck client would;
    # without compression (the fake's repetitive reply deflates a hundredfold) the reply outgrows the socket buffers.
    with connect(service.replace("http", "ws", 1) + "/ws", sock=small_window(service), max_queue=1,
                 compression=None, open_timeout=30, ping_interval=None) as ws:
        ws.send(json.dumps({"query": "hi", "history": [], "max_length": REPLY_TOKENS, "model": POOL}))
        wait_for(lambda: finished("abort") > aborted, 60, "the stalled WebSocket's generation to be aborted")
        assert engine_stats(POOL).engine.running == 0
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(json.loads(ws.recv(timeout=30)))
    assert messages and all(set(m) == {"resp"} for m in messages)  # the final {"resp", "history"} never came
    assert ws.close_code != 1000  # not a normal close: the connection was dropped
