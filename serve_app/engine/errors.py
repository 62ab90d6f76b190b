"""The engine's errors. Each has a `code`: the API layer's error table (serve_app/api/error_table.py) maps it to an HTTP
status, an OpenAI error type and a gRPC status."""


class EngineError(Exception):
    """Base of the engine's errors; `code` is the OpenAI-style error code the API layer reports."""

    code = "engine_error"


class InvalidRequest(EngineError):
    code = "invalid_request"


class ContextLengthExceeded(EngineError):
    """The prompt leaves no room to generate within the engine's context (max_seq_len) or the request's max_length."""

    code = "context_length_exceeded"


class EngineOverloaded(EngineError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""

    code = "overloaded"


class GenerationError(EngineError):
    """The request failed while generating (NaN logits, a failed forward pass); other requests are unaffected."""

    code = "generation_error"


class ReplicaFailed(EngineError):
    """This replica can no longer serve (a fault that leaves the process unfit, e.g. a compile past dynamo's
    recompile limit): it reports unhealthy so that Serve replaces it, and the caller should retry (HTTP 503)."""

    code = "replica_failed"
