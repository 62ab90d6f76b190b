"""The front end is torch-free, and errors map through one table."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from serve_app.api.error_table import ERRORS, APIError
from serve_app.engine import errors as engine_errors
from serve_app.server.messages import ErrorInfo


def test_the_front_end_imports_neither_torch_nor_the_model():
    """What the ingress replica (and the proxy's gRPC servicer) load must not pull in torch or the model."""
    probe = ("import sys\n"
             "import serve_app.api.ingress, serve_app.api.grpc_servicer, serve_app.api.ingress_config\n"
             "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('serve_app.model', "
             "'serve_app.engine.engine', 'serve_app.engine.sampling', 'serve_app.server.deployment')))\n"
             "print(','.join(heavy))\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"the front end loaded {run.stdout.strip()}"


def test_every_engine_error_code_is_in_the_table():
    codes = {cls.code for cls in vars(engine_errors).values()
             if isinstance(cls, type) and issubclass(cls, engine_errors.EngineError)}
    assert codes <= set(ERRORS), codes - set(ERRORS)


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_each_code_has_one_status_per_protocol(code):
    error = APIError(code, "message", param="field")
    assert error.body() == {"error": {"message": "message", "type": error.type, "param": "field", "code": code}}
    assert isinstance(error.kind.grpc, grpc.StatusCode)
    # Retry-After exactly for the errors a client should retry (503s), never for a request's own fault.
    assert ("Retry-After" in error.headers) == (error.status == 503)
    fault = {"invalid_request_error", "authentication_error"} if error.status < 500 else {"server_error",
                                                                                          "overloaded_error"}
    assert error.type in fault


def test_errors_from_a_pool_travel_as_codes():
    assert APIError.from_info(ErrorInfo("overloaded", "busy")).headers == {"Retry-After": "1"}
    unknown = APIError.from_info(ErrorInfo("a_code_from_a_newer_pool", "?"))
    assert unknown.status == 500 and unknown.code == "internal_error"
