"""The one error table: every error code the service answers with, and what it is on each protocol.

    code -> HTTP status, OpenAI error `type`, gRPC status, WebSocket close code, Retry-After, description

`APIError(code, message)` is the only exception the front ends raise for a request; HTTP turns it into an OpenAI-style
`{"error": {message, type, param, code}}` body, WebSocket into the same message then a close, gRPC into a status.
Pools send errors back as data, `ErrorInfo(code, message)`, and the ingress raises `APIError.from_info`; what Ray
raises instead (backpressure, a replica that died) becomes an APIError in one place, api/pool_client.py
`pool_call_error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from pydantic import ValidationError

from serve_app.server.messages import ErrorInfo

# WebSocket close codes: the request's fault, a message over the size limit, the service's fault
WS_POLICY, WS_TOO_BIG, WS_SERVER_ERROR = 1008, 1009, 1011


@dataclass(frozen=True)
class ErrorKind:
    status: int  # HTTP
    type: str  # OpenAI error type
    grpc: grpc.StatusCode
    ws_close: int  # WebSocket close code, sent after the error message
    # What the code means. The first code of an HTTP status in ERRORS describes the status in the OpenAPI document.
    description: str
    retry_after_s: int | None = None  # clients should retry after this long (HTTP Retry-After)
    # Starlette's and FastAPI's own error of this HTTP status (bad body encoding, unknown path, wrong method) becomes
    # this code, with the description as its message.
    framework: bool = False


_INVALID = ("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, WS_POLICY)
_RETRY = 1  # seconds
ERRORS: dict[str, ErrorKind] = {
    # the request's fault
    "invalid_request": ErrorKind(400, *_INVALID, "invalid request: bad JSON, wrong types, unknown fields, "
                                 "out-of-range values, empty or too long prompt"),
    "invalid_json": ErrorKind(400, *_INVALID, "request body could not be parsed: send UTF-8 JSON", framework=True),
    "context_length_exceeded": ErrorKind(400, *_INVALID, "the prompt is longer than the character limit, or past "
                                         "the pool's context (on the OpenAI routes: with max_tokens)"),
    "invalid_api_key": ErrorKind(401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED, WS_POLICY,
                                 "missing or invalid API key (when the service is configured with keys)"),
    "origin_not_allowed": ErrorKind(403, "invalid_request_error", grpc.StatusCode.PERMISSION_DENIED, WS_POLICY,
                                    "a browser Origin that is not in cors_origins (WebSocket handshakes)"),
    "model_not_found": ErrorKind(404, "invalid_request_error", grpc.StatusCode.NOT_FOUND, WS_POLICY, "unknown model"),
    "not_found": ErrorKind(404, "invalid_request_error", grpc.StatusCode.UNIMPLEMENTED, WS_POLICY,
                           "no such route; see /openapi.json", framework=True),
    "method_not_allowed": ErrorKind(405, "invalid_request_error", grpc.StatusCode.UNIMPLEMENTED, WS_POLICY,
                                    "method not allowed on this route", framework=True),
    "request_timeout": ErrorKind(408, "invalid_request_error", grpc.StatusCode.DEADLINE_EXCEEDED, WS_POLICY,
                                 "the request did not arrive in full within the configured time"),
    "request_too_large": ErrorKind(413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED, WS_TOO_BIG,
                                   "request body (WebSocket or gRPC message) over the configured limit"),
    "client_closed": ErrorKind(499, "invalid_request_error", grpc.StatusCode.CANCELLED, WS_POLICY,
                               "the client went away before its answer"),
    # the service's state: retry later
    "overloaded": ErrorKind(503, "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED, WS_SERVER_ERROR,
                            "the pool is overloaded or its replica failed; retry after `Retry-After` seconds",
                            retry_after_s=_RETRY),
    "replica_failed": ErrorKind(503, "server_error", grpc.StatusCode.UNAVAILABLE, WS_SERVER_ERROR,
                                "the replica serving the request failed; retry after `Retry-After` seconds",
                                retry_after_s=_RETRY),
    # the service's fault
    "generation_error": ErrorKind(500, "server_error", grpc.StatusCode.INTERNAL, WS_SERVER_ERROR,
                                  "the request failed while generating; other requests are unaffected"),
    "engine_error": ErrorKind(500, "server_error", grpc.StatusCode.INTERNAL, WS_SERVER_ERROR, "the engine failed"),
    "internal_error": ErrorKind(500, "server_error", grpc.StatusCode.INTERNAL, WS_SERVER_ERROR,
                                "an unexpected failure; its details are in the service's log, not in the answer"),
}


def status_description(status: int) -> str:
    """What an HTTP error status means, for the OpenAPI document: the description of its first code."""
    return next(kind.description for kind in ERRORS.values() if kind.status == status)


class APIError(Exception):
    """An error answer: its code's row of ERRORS gives the status on every protocol."""

    def __init__(self, code: str, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.kind = ERRORS[code]

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def type(self) -> str:
        return self.kind.type

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.kind.retry_after_s)} if self.kind.retry_after_s is not None else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_info(cls, info: ErrorInfo) -> APIError:
        return cls(info.code if info.code in ERRORS else "internal_error", info.message)

    @classmethod
    def from_framework(cls, status: int, detail: str) -> APIError:
        """Starlette's or FastAPI's own HTTP error: the table's code for its status (a 400 that is otherwise)."""
        code = next((code for code, kind in ERRORS.items() if kind.framework and kind.status == status), None)
        return cls(code, ERRORS[code].description) if code else cls("invalid_request", detail)

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message)


def internal_error(message: str = "internal server error") -> APIError:
    """The one way a 500 is made: the details go to the log, never to the client."""
    return APIError("internal_error", message)


def _is_field_name(part: str) -> bool:
    return part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "tuple", "none")


def validation_error(exc: ValidationError, skip: int = 0, field: str | None = None) -> APIError:
    """The first problem of a failed validation as a 400; `skip` drops leading location parts (FastAPI's "body"),
    `field` names the field a value was validated for where the validation did not know it (a TypeAdapter)."""
    first = exc.errors()[0] if exc.errors() else {}
    # Union branches add pydantic's own tags to the location ("function-after[...]", "list[ContentPart]", "str").
    parts = [part for part in first.get("loc", ())[skip:] if isinstance(part, int) or _is_field_name(part)]
    parts = [field, *parts] if field else parts
    where = ".".join(str(part) for part in parts) or None
    problem = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError("invalid_request", f"{where}: {problem}" if where else problem, param=where)
