"""The FastAPI app that the ingress deployment serves: the error handlers every route shares and its OpenAPI document.

Kept apart from the ingress class so protocol mixins (WebSocket, web page) can register routes on the same app.
Every HTTP error, FastAPI's and Starlette's own included (bad JSON, unknown path, wrong method), is an OpenAI-style
`{"error": {...}}` body. The OpenAPI document at `/openapi.json` says so: routes list the error statuses they can
answer with instead of FastAPI's default 422, and `model` fields list the deployed pools.
"""


import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException

from serve_app.api.schemas import APIError, ErrorResponse, validation_error
from serve_app.api.security import SecurityMiddleware

logger = logging.getLogger("ray.serve")

app = FastAPI(title="chatglm2-serve", description="ChatGLM2-6B chat service: FP16 / INT8 / INT4 pools")
# API keys, CORS and the body limit (serve_app/api/security.py); its settings are set by ChatIngress.__init__.
app.add_middleware(SecurityMiddleware)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    error = validation_error(exc, skip=1)  # locations start with "body"
    return JSONResponse(error.body(), status_code=400)


_HTTP_ERRORS = {
    400: ("request body could not be parsed: send UTF-8 JSON", "invalid_json"),
    404: ("no such route; see /openapi.json", "not_found"),
    405: ("method not allowed on this route", "method_not_allowed"),
}


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    # Starlette's and FastAPI's own errors (bad body encoding, unknown path, wrong method), in the same shape.
    message, code = _HTTP_ERRORS.get(exc.status_code, (str(exc.detail), "http_error"))
    body = APIError(exc.status_code, message, code=code).body()
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(TaskCancelledError)
async def _client_gone(_: Request, exc: TaskCancelledError) -> JSONResponse:
    # The client disconnected before its first token and Serve cancelled the request: nobody is left to answer,
    # and it is not a server error.
    logger.info("request cancelled: the client disconnected")
    body = APIError(499, "client closed the request", type="invalid_request_error", code="client_closed").body()
    return JSONResponse(body, status_code=499)


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in the ingress")
    body = APIError(500, "internal server error", type="server_error", code="internal_error").body()
    return JSONResponse(body, status_code=500)


# --- the OpenAPI document ---------------------------------------------------------------------------------------

_ERROR_DESCRIPTIONS = {
    400: "invalid request: bad JSON, wrong types, unknown fields, out-of-range values, empty or too long prompt",
    401: "missing or invalid API key (when the service is configured with keys)",
    404: "unknown model",
    413: "request body over the configured limit",
    503: "the pool is overloaded or its replica failed; retry after `Retry-After` seconds",
}


def errors(*statuses: int) -> dict:
    """`responses=` entries for the error statuses a route can answer with."""
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


_event_models: list[type[BaseModel]] = []  # payloads that SSE schemas refer to, added to the document's components


def sse_events(*payloads: type[BaseModel], done: bool = False) -> dict:
    """The schema of one Server-Sent Event whose data is JSON of one of `payloads` (or the `[DONE]` marker).

    In OpenAPI 3.1 the `schema` of a text/event-stream response describes each event: {event, data, id, retry}."""
    _event_models.extend(model for model in payloads if model not in _event_models)
    json_data = {"contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in payloads]}}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"type": "string", **data}}}


def json_or_sse(model: type[BaseModel], chunk: type[BaseModel], description: str) -> dict:
    """A 200 that is `model` as JSON, or `chunk` events then `data: [DONE]` when the request asks to stream."""
    events = {"schema": sse_events(chunk, ErrorResponse, done=True)}
    return {200: {"model": model, "description": description, "content": {"text/event-stream": events}}}


class EventStream(StreamingResponse):
    """Server-Sent Events."""

    media_type = "text/event-stream"


def sse_only(description: str, *payloads: type[BaseModel]) -> dict:
    """A 200 that is always Server-Sent Events (routes using it set `response_class=EventStream`)."""
    return {200: {"description": description, "content": {"text/event-stream": {"schema": sse_events(*payloads)}}}}


_openapi_pools: list[str] = []


def _openapi() -> dict:
    # Installed as `app.openapi` at import: Serve serves a frozen copy of `app`, so the ingress cannot patch the
    # served object; it sets the pools here instead (use_openapi_for).
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operation in (op for ops in schema["paths"].values() for op in ops.values()):
            operation["responses"].pop("422", None)  # validation errors are 400s here
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                if int(status) >= 400 and "text/event-stream" in content:  # errors are JSON on every route
                    content["application/json"] = content.pop("text/event-stream")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, events = models_json_schema([(m, "serialization") for m in _event_models],
                                       ref_template="#/components/schemas/{model}")
        for name, definition in events.get("$defs", {}).items():
            components.setdefault(name, definition)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for component in components.values():
            model = component.get("properties", {}).get("model")
            if _openapi_pools and model and any(branch.get("type") == "null" for branch in model.get("anyOf", [])):
                model["anyOf"] = [{"type": "string", "enum": [*_openapi_pools, "auto"]}, {"type": "null"}]
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def use_openapi_for(pools: list[str]) -> None:
    """List these pools (and "auto") as the values of every request's `model` field in /openapi.json."""
    global _openapi_pools
    _openapi_pools = list(pools)
    app.openapi_schema = None


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
