"""The FastAPI app that the ingress deployment serves, with the error handlers every route shares.

Kept apart from the ingress class so protocol mixins (WebSocket, web page) can register routes on the same app.
"""


import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import TaskCancelledError

from serve_app.protocol import APIError
from serve_app.security import SecurityMiddleware

logger = logging.getLogger("ray.serve")

app = FastAPI(title="chatglm2-serve", description="ChatGLM2-6B chat service: FP16 / INT8 / INT4 pools")
# API keys, CORS and the body limit (serve_app/security.py); its settings are set by ChatIngress.__init__.
app.add_middleware(SecurityMiddleware)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
    return JSONResponse(APIError(400, message, param=where, code="invalid_request").body(), status_code=400)


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


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
