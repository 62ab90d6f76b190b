"""Browser-facing routes of the ingress: the explorer's WebSocket chat (`/ws`) and the chat page (`GET /ui`).

The explorer's WebSocket protocol: the client sends one JSON object `{query, history, max_length?, top_p?, temperature?,
model?}` (the body of `POST /stream`); the server sends `{"resp": <answer so far>}` as the answer grows (paced by
`limits.resend_divisor`), then `{"resp": <final answer>, "history": [...]}` (history ends with the current turn) and
closes with 1000. Bad input (invalid JSON, wrong types, unknown model, empty or too long query) gets one `{"error": {message, type, param, code}}` message and close code
1008 (1009 for a message over `limits.max_body_bytes`; 1008 with `request_timeout` when no request message comes
within `limits.request_timeout_s`). Server-side failures (overload included) get the same
message shape and 1011. A client that disconnects mid-answer stops generation.

The handshake is refused before it is accepted, with an HTTP status and the same error object as its body: 401 when
keys are configured and it has no valid one (header `Authorization: Bearer <key>`, or `?api_key=<key>` from
browsers), 403 when its `Origin` is neither the service's own nor in `cors_origins`.
"""

import asyncio
import contextlib
import json
import logging
from importlib import resources

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError

from serve_app.api.error_table import APIError, internal_error, validation_error
from serve_app.api.http import app
from serve_app.api.pool_client import Stream
from serve_app.api.schemas import StreamChatRequest
from serve_app.api.security import timed_out, too_large, unauthorized, websocket_key_ok
from serve_app.server.messages import TextRequest

logger = logging.getLogger("ray.serve")

CLOSE_NORMAL = 1000  # the answer is complete; an error's close code is in the error table (api/error_table.py)


async def _fail(websocket: WebSocket, exc: APIError) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client may already be gone
        await websocket.send_text(json.dumps(exc.body(), ensure_ascii=False))
        await websocket.close(exc.kind.ws_close, reason=exc.type)


async def _refuse(websocket: WebSocket, exc: APIError) -> None:
    """Refuse the handshake with the error's HTTP status and body (ASGI's WebSocket denial response, which uvicorn
    and Ray Serve's proxy pass on); a server without it answers 403."""
    try:
        await websocket.send_denial_response(JSONResponse(exc.body(), exc.status, headers=exc.headers))
    except RuntimeError:  # no denial-response extension: closing before accepting is a 403
        await websocket.close(exc.kind.ws_close, reason=exc.type)


async def _until_disconnect(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass  # messages after the request are ignored


class WebSocketMixin:
    """`/ws` and `/ui` routes of ChatIngress; they use its `security`, `requests` (RequestBuilder) and `client`
    (PoolClient)."""

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def ui(self) -> HTMLResponse:
        """The self-contained chat page (chat, chat with a background setting, translator)."""
        return HTMLResponse(resources.files("serve_app").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.websocket("/ws")
    async def websocket_chat(self, websocket: WebSocket) -> None:
        # Checked before the handshake is accepted: a refused client never has an open socket.
        if not websocket_key_ok(self.security, websocket.scope):  # Authorization: Bearer <key> or ?api_key=<key>
            await _refuse(websocket, unauthorized())
            return
        if not self.security.origin_ok(websocket.scope):
            await _refuse(websocket, APIError("origin_not_allowed", "this Origin may not open the WebSocket; the "
                                              "service's cors_origins lists the origins that may"))
            return
        await websocket.accept()
        try:
            try:
                async with asyncio.timeout(self.security.request_timeout_s):
                    message = await websocket.receive()
            except TimeoutError:
                raise timed_out(self.security.request_timeout_s, "the request message") from None
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
            limit = self.security.max_body_bytes
            if (len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))) > limit:
                raise too_large(limit, "message")  # close 1009
            body = StreamChatRequest.model_validate_json(raw)
            request = self.requests.chat_turn(body)
            stream = await self.client.open(body.model, request)
        except ValidationError as exc:
            await _fail(websocket, validation_error(exc))
            return
        except APIError as exc:
            await _fail(websocket, exc)
            return
        except Exception:
            logger.exception("websocket request failed before the first token")
            await _fail(websocket, internal_error())
            return

        async with stream:  # closed however the exchange ends: a client that went away stops the engine
            answer = asyncio.ensure_future(_send_answer(websocket, request, stream))
            client_gone = asyncio.ensure_future(_until_disconnect(websocket))
            try:
                await asyncio.wait({answer, client_gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (answer, client_gone):
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await client_gone
                with contextlib.suppress(asyncio.CancelledError):
                    await answer


async def _send_answer(websocket: WebSocket, request: TextRequest, stream: Stream) -> None:
    """A message with the whole answer so far as it grows (and at least one), the last with the history, then a
    normal close."""
    try:
        async for response, last in stream.growing():
            message = {"resp": response}
            if last:
                message["history"] = request.prompt.history_after(response)
            await websocket.send_text(json.dumps(message, ensure_ascii=False))
        await websocket.close(CLOSE_NORMAL)
    except APIError as exc:
        await _fail(websocket, exc)
    except (WebSocketDisconnect, RuntimeError):
        return  # the client went away mid-answer
    except Exception:
        logger.exception("websocket stream failed")
        await _fail(websocket, internal_error())
