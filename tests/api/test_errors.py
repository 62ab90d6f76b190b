"""The one error table (serve_app/api/error_table.py) and what HTTP and WebSocket answer from it. Fast: no Ray."""

from __future__ import annotations

import asyncio
import inspect
import json
import re

import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException
from starlette.testclient import TestClient

from serve_app.api import http, websocket
from serve_app.api.error_table import ERRORS, WS_POLICY, WS_SERVER_ERROR, WS_TOO_BIG, APIError, status_description


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_every_code_has_a_websocket_close_code_and_a_description(code):
    kind = ERRORS[code]
    # The request's fault closes with 1008 (policy violation), one too big to take with 1009, the service's with 1011.
    expected = WS_TOO_BIG if kind.status == 413 else WS_POLICY if kind.status < 500 else WS_SERVER_ERROR
    assert kind.ws_close == expected
    assert kind.description.strip() and kind.description == kind.description.strip()


def test_the_openapi_descriptions_come_from_the_table():
    assert {status: status_description(status) for status in (400, 401, 404, 413, 503)} == {
        400: "invalid request: bad JSON, wrong types, unknown fields, out-of-range values, empty or too long prompt",
        401: "missing or invalid API key (when the service is configured with keys)",
        404: "unknown model",
        413: "request body (WebSocket or gRPC message) over the configured limit",
        503: "the pool is overloaded or its replica failed; retry after `Retry-After` seconds",
    }
    assert http.errors(401) == {401: {"model": http.ErrorResponse, "description": status_description(401)}}


@pytest.mark.parametrize(("status", "code", "message"), [
    (400, "invalid_json", "request body could not be parsed: send UTF-8 JSON"),
    (404, "not_found", "no such route; see /openapi.json"),
    (405, "method_not_allowed", "method not allowed on this route"),
    (401, "invalid_request", "the detail"),  # any other status of Starlette's is a 400 with its detail
    (413, "invalid_request", "the detail"),
    (503, "invalid_request", "the detail"),
])
def test_starlettes_own_errors_map_through_the_table(status, code, message):
    error = APIError.from_framework(status, "the detail")
    assert (error.code, error.message, error.status) == (code, message, 400 if code == "invalid_request" else status)


def test_each_handler_is_registered_once():
    """A second registration for the same exception class would silently replace the first."""
    source = inspect.getsource(http)
    registered = re.findall(r"^@app\.exception_handler\((\w+)\)", source, flags=re.MULTILINE)
    assert len(registered) == len(set(registered))
    assert {"APIError", "RequestValidationError", "HTTPException", "TaskCancelledError", "Exception"} <= set(registered)


# ---- HTTP: the app's handlers on a bare app (the real one must not get test routes: Serve serves a copy of it) ----


class Small(BaseModel):
    x: int


@pytest.fixture(scope="module")
def client():
    bare = FastAPI(exception_handlers=dict(http.app.exception_handlers))

    @bare.get("/api/{code}")
    async def api_error(code: str):
        raise APIError(code, f"message of {code}", param="p")

    @bare.get("/http/{status}")
    async def http_error(status: int):
        raise HTTPException(status, detail=f"detail {status}", headers={"X-Extra": "1"})

    @bare.post("/body")
    async def body(small: Small):
        return {}

    @bare.get("/cancelled")
    async def cancelled():
        raise TaskCancelledError()

    @bare.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    return TestClient(bare, raise_server_exceptions=False)


def error_of(response) -> tuple[int, dict, str | None]:
    return response.status_code, response.json()["error"], response.headers.get("retry-after")


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_http_answers_every_code_with_its_row(client, code):
    status, error, retry_after = error_of(client.get(f"/api/{code}"))
    assert status == ERRORS[code].status
    assert error == {"message": f"message of {code}", "type": ERRORS[code].type, "param": "p", "code": code}
    assert retry_after == ("1" if code in ("overloaded", "replica_failed") else None)


@pytest.mark.parametrize(("status", "answer", "code", "message"), [
    (400, 400, "invalid_json", "request body could not be parsed: send UTF-8 JSON"),
    (404, 404, "not_found", "no such route; see /openapi.json"),
    (405, 405, "method_not_allowed", "method not allowed on this route"),
    (413, 400, "invalid_request", "detail 413"),
    (503, 400, "invalid_request", "detail 503"),
])
def test_http_framework_errors_keep_their_headers(client, status, answer, code, message):
    response = client.get(f"/http/{status}")
    assert error_of(response) == (answer, {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": code}, None)
    assert response.headers["x-extra"] == "1"


def test_http_routing_and_validation_errors(client):
    assert error_of(client.post("/nope", json={}))[:2] == (404, {
        "message": "no such route; see /openapi.json", "type": "invalid_request_error", "param": None,
        "code": "not_found"})
    wrong_method = client.get("/body")
    assert error_of(wrong_method)[:2] == (405, {"message": "method not allowed on this route",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "method_not_allowed"})
    assert wrong_method.headers["allow"] == "POST"
    not_utf8 = client.post("/body", content=b'{"x": "\xff"}', headers={"content-type": "application/json"})
    assert error_of(not_utf8)[1]["code"] == "invalid_json"
    assert error_of(client.post("/body", json={"x": "a"}))[:2] == (400, {
        "message": "x: Input should be a valid integer, unable to parse string as an integer",
        "type": "invalid_request_error", "param": "x", "code": "invalid_request"})
    assert error_of(client.post("/body", json=[]))[1]["param"] is None


def test_http_cancelled_and_unexpected_errors(client):
    assert error_of(client.get("/cancelled")) == (499, {"message": "client closed the request",
                                                        "type": "invalid_request_error", "param": None,
                                                        "code": "client_closed"}, None)
    assert error_of(client.get("/boom")) == (500, {"message": "internal server error", "type": "server_error",
                                                   "param": None, "code": "internal_error"}, None)


# ---- WebSocket ---------------------------------------------------------------------------------------------------


class RecordingSocket:
    def __init__(self):
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_websocket_sends_the_error_then_closes_with_the_tables_code(code):
    socket = RecordingSocket()
    error = APIError(code, "message")
    asyncio.run(websocket._fail(socket, error))
    assert socket.sent == [error.body()]
    assert socket.closed == (ERRORS[code].ws_close, ERRORS[code].type)
