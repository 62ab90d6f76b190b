"""API keys, CORS and the request body limit of the ingress, for every protocol.

`ChatIngress` builds one `SecuritySettings` from its IngressConfig in its replica (the keys come from that process's
environment) and keeps it; `SecurityMiddleware` (registered on the FastAPI app in api/http.py) reads it from the
served app's `state.security`, the WebSocket and gRPC methods from the ingress, so every protocol shares one
instance per replica.

- API keys: when `api_keys_env` names an environment variable holding comma-separated keys (e.g. CHATGLM2_API_KEYS,
  set from a Secret on Kubernetes or through the Serve config's `runtime_env.env_vars`), HTTP requests need
  `Authorization: Bearer <key>` (401, OpenAI-style `authentication_error` / `invalid_api_key`) except `GET /health`
  and `GET /ui`; WebSocket handshakes need the same header or `?api_key=<key>` (browsers cannot set headers); gRPC
  calls need metadata `authorization: Bearer <key>` (UNAUTHENTICATED). An unset or empty variable means no keys:
  the service is open, with a warning, unless `require_api_keys: true`, when the ingress replica refuses to start
  (`NoAPIKeys`) and the deployment fails. Keys are compared with hmac.compare_digest and never logged.
- WebSocket handshakes are checked before they are accepted: a bad key is refused with HTTP 401, an `Origin` that is
  neither the service's own nor in `cors_origins` with HTTP 403 (the OpenAI-style error as the body).
- CORS: Starlette's CORSMiddleware, added around this one when `cors_origins` is set (api/http.py), so preflight
  requests (which browsers send without credentials) are answered there and run no handler, and refusals carry the
  CORS headers too.
- Size limit (`limits.max_body_bytes`): an HTTP Content-Length above it gets 413 (`request_too_large`) before the
  body is read; a body without Content-Length (chunked) is read up to the limit and refused the same way if it goes
  over. The body must arrive in full within `limits.request_timeout_s` (else 408 `request_timeout`). A WebSocket
  message over it is closed with 1009 (api/websocket.py), a gRPC request message over it gets
  RESOURCE_EXHAUSTED (api/grpc.py); the gRPC proxy's own cap is Ray's RAY_SERVE_GRPC_MAX_MESSAGE_SIZE.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import dataclass
from urllib.parse import parse_qs

from serve_app.api.error_table import APIError

logger = logging.getLogger("ray.serve")

OPEN_ROUTES = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/ui"), ("HEAD", "/ui")}


class NoAPIKeys(RuntimeError):
    """`require_api_keys` is set and the keys' variable is unset or empty: the replica refuses to start."""


@dataclass(frozen=True)
class SecuritySettings:
    api_keys: tuple[bytes, ...]  # empty: no key required
    max_body_bytes: int
    cors_origins: tuple[str, ...] = ()  # browser origins allowed besides the service's own ('*': any)
    request_timeout_s: float = 30.0  # to receive a request in full (HTTP body, a WebSocket's request message)

    @classmethod
    def from_env(cls, api_keys_env: str | None, max_body_bytes: int, *, require_api_keys: bool = False,
                 cors_origins: tuple[str, ...] | list[str] = (), request_timeout_s: float = 30.0) -> SecuritySettings:
        """The keys are read from this process's environment, never logged. With `require_api_keys`, no keys is an
        error (`NoAPIKeys`) instead of an open service."""
        keys = load_api_keys(api_keys_env, quiet=require_api_keys)
        if require_api_keys and not keys:
            raise NoAPIKeys(f"require_api_keys is true but ${api_keys_env} is unset or holds no key: refusing to "
                            "serve without keys")
        return cls(api_keys=keys, max_body_bytes=max_body_bytes, cors_origins=tuple(cors_origins),
                   request_timeout_s=request_timeout_s)

    def origin_ok(self, scope) -> bool:
        """A WebSocket handshake's Origin: none (not a browser), the service's own, or one of `cors_origins`.
        Browsers send Origin on every WebSocket handshake and let any page open one, so this is what stops a page
        elsewhere from driving /ws with the user's network position (and, with keys off, with no key at all)."""
        headers = _headers(scope)
        origin = headers.get("origin")
        if origin is None or "*" in self.cors_origins or origin in self.cors_origins:
            return True
        host = headers.get("host")
        return host is not None and origin.partition("://")[2] == host

    @property
    def keys_required(self) -> bool:
        return bool(self.api_keys)

    def key_ok(self, key: str | None) -> bool:
        """Whether `key` is one of the configured keys (always true when none are configured)."""
        if not self.api_keys:
            return True
        if not key:
            return False
        candidate = key.encode()
        ok = False
        for known in self.api_keys:  # no short-circuit: every key is compared
            ok |= hmac.compare_digest(candidate, known)
        return ok


def load_api_keys(env_name: str | None, quiet: bool = False) -> tuple[bytes, ...]:
    if not env_name:
        return ()
    keys = tuple(key.strip().encode() for key in os.environ.get(env_name, "").split(",") if key.strip())
    if keys:
        logger.info("API keys required: %d key(s) from $%s", len(keys), env_name)
    elif not quiet:
        logger.warning("api_keys_env is %s but that variable is unset or empty: no API key is required (set "
                       "require_api_keys: true to refuse to start instead)", env_name)
    return keys


def bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def unauthorized() -> APIError:
    return APIError("invalid_api_key", "missing or invalid API key: send Authorization: Bearer <key>")


def timed_out(limit_s: float, what: str) -> APIError:
    return APIError("request_timeout", f"{what} did not arrive within {limit_s:g} s")


def too_large(limit: int, what: str = "request body") -> APIError:
    return APIError("request_too_large", f"{what} is larger than {limit} bytes")


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def websocket_key_ok(current: SecuritySettings, scope) -> bool:
    """A WebSocket handshake's key: the Authorization header, else the `api_key` query parameter."""
    if not current.keys_required:
        return True
    key = bearer(_headers(scope).get("authorization"))
    if key is None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
        key = values[0] if values else None
    return current.key_ok(key)


def grpc_key_ok(current: SecuritySettings, metadata) -> bool:
    if not current.keys_required:
        return True
    values = [value for name, value in metadata if name.lower() == "authorization"]
    return current.key_ok(bearer(values[0] if values else None))


class SecurityMiddleware:
    """Pure ASGI middleware (streaming responses and WebSockets pass through untouched) for HTTP requests."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        current: SecuritySettings = scope["app"].state.security  # set by ChatIngress for its replica
        headers = _headers(scope)
        method, path = scope["method"], scope["path"]
        # A CORS preflight is answered by CORSMiddleware, outside this one, when cors_origins is set; one that
        # reaches here (no cors_origins) is checked like any request, so without a key it runs no handler.
        if (method, path) not in OPEN_ROUTES and not current.key_ok(bearer(headers.get("authorization"))):
            return await _error(send, unauthorized(), [(b"www-authenticate", b"Bearer")])

        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > current.max_body_bytes:
            return await _error(send, too_large(current.max_body_bytes), [])
        if method in ("POST", "PUT", "PATCH"):
            # The body is read here, whole, up to the limit and within request_timeout_s, so a slow or stalled
            # upload is a 408 instead of an ingress slot held for as long as the client likes (Serve's proxy hands the
            # body to the replica as it arrives). A chunked body (no Content-Length) gets the size limit here too.
            try:
                async with asyncio.timeout(current.request_timeout_s):
                    body = await _read_body(receive, current.max_body_bytes)
            except TimeoutError:
                return await _error(send, timed_out(current.request_timeout_s, "the request body"), [])
            if body is None:
                return  # the client went away
            if isinstance(body, APIError):
                return await _error(send, body, [])
            receive = _replaying(bytes(body), receive)
        await self.app(scope, receive, send)


def _replaying(body: bytes, upstream):
    """A `receive` that gives the body already read as one message, then what `upstream` gives (the disconnect)."""
    replayed = False

    async def receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive


async def _read_body(receive, limit: int) -> bytearray | APIError | None:
    """The whole body; the 413 when it goes over `limit`; None when the client disconnects first."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            return too_large(limit)
    return body


async def _error(send, exc: APIError, extra_headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + extra_headers
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
