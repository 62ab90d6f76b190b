"""The FastAPI app that the ingress deployment serves: its error handlers, middleware and OpenAPI document.

Routes are registered on `app` by the ingress and its protocol mixins (WebSocket, web page). Serve serves a frozen copy
of `app` in each ingress replica; `configure` gives that copy the replica's settings (API keys, CORS, the pools the
OpenAPI document lists) through `app.state` and middleware, so nothing is kept in module state.
Every HTTP error, FastAPI's and Starlette's own included (bad JSON, unknown path, wrong method), is an OpenAI-style
`{"error": {...}}` body. The OpenAPI document at `/openapi.json` says so: routes list the error statuses they can
answer with instead of FastAPI's default 422, and `model` fields list the deployed pools.
"""


import json
import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray.exceptions import TaskCancelledError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from serve_app.api.error_table import APIError, internal_error, status_description, validation_error
from serve_app.api.schemas import ErrorResponse
from serve_app.api.security import SecurityMiddleware, SecuritySettings

logger = logging.getLogger("ray.serve")

app = FastAPI(title="chatglm2-serve", description="ChatGLM2-6B chat service: FP16 / INT8 / INT4 pools")
# API keys and the body limit (serve_app/api/security.py); its settings come from `configure`.
app.add_middleware(SecurityMiddleware)


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers | (headers or {}))


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc, skip=1))  # locations start with "body"


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    # Starlette's and FastAPI's own errors (bad body encoding, unknown path, wrong method), in the same shape.
    return error_response(APIError.from_framework(exc.status_code, str(exc.detail)), exc.headers)


@app.exception_handler(TaskCancelledError)
async def _client_gone(_: Request, exc: TaskCancelledError) -> JSONResponse:
    # The client disconnected before its first token and Serve cancelled the request: nobody is left to answer,
    # and it is not a server error.
    logger.info("request cancelled: the client disconnected")
    return error_response(APIError("client_closed", "client closed the request"))


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in the ingress")
    return error_response(internal_error())


# --- the OpenAPI document ---------------------------------------------------------------------------------------


def errors(*statuses: int) -> dict:
    """`responses=` entries for the error statuses a route can answer with (described by the error table)."""
    return {status: {"model": ErrorResponse, "description": status_description(status)} for status in statuses}


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
    """Server-Sent Events. `source`, the pool stream the events come from, is held for as long as the response runs:
    it is closed when the response ends, however it ends (a client that went away stops the engine)."""

    media_type = "text/event-stream"

    # StreamingResponse's parameters spelled out: FastAPI reads the default `status_code` from the signature.
    def __init__(self, content, status_code: int = 200, headers: Mapping[str, str] | None = None,
                 media_type: str | None = None, background: BackgroundTask | None = None, *,
                 source: AbstractAsyncContextManager | None = None):
        super().__init__(content, status_code, headers, media_type, background)
        self.source = source

    async def __call__(self, scope, receive, send) -> None:
        async with self.source or nullcontext():
            await super().__call__(scope, receive, send)


def sse_only(description: str, *payloads: type[BaseModel]) -> dict:
    """A 200 that is always Server-Sent Events (routes using it set `response_class=EventStream`)."""
    return {200: {"description": description, "content": {"text/event-stream": {"schema": sse_events(*payloads)}}}}


def openapi_document(served: FastAPI, pools: list[str]) -> dict:
    """The OpenAPI document of `served`, with `pools` (and "auto") as the values of every request's `model` field."""
    if served.openapi_schema is None:
        schema = get_openapi(title=served.title, version=served.version, description=served.description,
                             routes=served.routes)
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
            if model and any(branch.get("type") == "null" for branch in model.get("anyOf", [])):
                model["anyOf"] = [{"type": "string", "enum": [*pools, "auto"]}, {"type": "null"}]
        served.openapi_schema = schema
    return served.openapi_schema


def configure(served: FastAPI, security: SecuritySettings, cors_origins: list[str], pools: list[str]) -> FastAPI:
    """Give the app an ingress replica serves its settings (called once per replica, before the first request)."""
    served.state.security = security
    if cors_origins:  # outermost: preflights need no key, and refusals carry the CORS headers too
        served.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                              allow_headers=["*"], max_age=600)
    served.openapi = lambda: openapi_document(served, pools)
    return served


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
