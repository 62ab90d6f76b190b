"""IngressConfig: what the ingress replica reads of the app's args, and nothing else.

The YAML keys the ingress reads (routing, request defaults and limits, security) are defined here once, with their
defaults, as `IngressArgs`; the application's args (`AppArgs`, serve_app/config.py) inherit them, so the keys users
write stay flat. `build_app` resolves one `IngressConfig` (these keys plus the pool names) and binds it to the
ingress alone. Torch-free, like the rest of the front end.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.api.pool_choice import ROUTING_POLICIES


class FrozenArgs(BaseModel):
    """Every config model: a misspelt key fails instead of being ignored, and nothing changes after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationDefaults(FrozenArgs):
    """Used when a request leaves a parameter out (the official api.py's defaults)."""

    temperature: float = Field(default=0.95, ge=0.0, le=2.0)
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    max_length: int = Field(default=2048, ge=1, description="prompt + reply tokens when a request gives no limit")


class RequestLimits(FrozenArgs):
    """The bounds every request is held to at the ingress, on every protocol, before any tokenizing or Ray hop.

    The defaults fit the largest pool (ChatGLM2-6B-32K: 32,768 tokens, about four characters a token at most); a
    pool's context, in tokens, is checked by the pool itself.
    """

    max_body_bytes: int = Field(
        default=1_048_576, ge=1, description="largest HTTP request body, WebSocket message or gRPC request message "
        "(HTTP 413, WebSocket close 1009, gRPC RESOURCE_EXHAUSTED)")
    max_prompt_chars: int = Field(default=32_768, ge=1,
                                  description="longest new user message (query, prompt, the last user message)")
    max_total_prompt_chars: int = Field(
        default=131_072, ge=1, description="longest prompt in all: new message, kept history, system and other messages")
    max_history_turns: int = Field(default=256, ge=0, description="most [query, response] rounds a request may send")
    max_messages: int = Field(default=512, ge=1, description="most messages in an OpenAI chat request")
    max_stop_chars: int = Field(default=256, ge=1, description="longest stop string (at most 4 of them)")
    max_prompt_tokens: int = Field(
        default=32_768, ge=1, description="most token ids in a prompt or a /detokenize request (the pool then checks "
        "its own context)")
    grpc_default_max_length: int = Field(
        default=1024, ge=1, description="max_length (prompt + reply tokens) of a gRPC call that sets none, when below "
        "defaults.max_length: Ray's gRPC proxy does not always pass a client's cancel on, so an unbounded call could "
        "run to the pool's context for nobody")
    resend_divisor: int = Field(
        default=32, ge=0, description="streams that re-send the whole answer so far (WebSocket, gRPC, the `response` "
        "of POST /stream) send it when it has grown by len(last sent) // resend_divisor characters (at least 1), and "
        "always its final state: an answer of L characters then costs about (resend_divisor + 1) * L in all, not "
        "L * L / 2; 0 sends every piece (as the seeds did)")
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="longest a client may take to send its request: an HTTP body to arrive in "
        "full (else 408), a WebSocket's request message after the handshake (else close 1008)")


# Keys written before the `limits:` section existed: still accepted at the top level of the args.
_FLAT_LIMITS = ("max_body_bytes", "max_prompt_chars")


class IngressArgs(FrozenArgs):
    """The app args the ingress reads."""

    default_model: str | None = Field(default=None, description="pool for requests that name no model; default: first")
    routing: ROUTING_POLICIES = Field(
        default="default", description="'auto' sends requests that name no model to the best pool with headroom")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults,
                                         description="sampling defaults for requests that leave them out")
    max_history_rounds: int = Field(default=10, ge=0, description="history kept by /chat and /stream")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="bounds on every request")
    api_keys_env: str | None = Field(
        default=None, description="environment variable (in the ingress replica) holding comma-separated API keys; "
        "when it is set and non-empty every protocol requires one of them (HTTP/WebSocket/gRPC: Bearer <key>)")
    require_api_keys: bool = Field(
        default=False, description="refuse to start when api_keys_env is unset or holds no key (instead of serving "
        "openly with a warning)")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="browser origins allowed by CORS (exact match; '*' allows any)")
    log_prompts: bool = Field(default=False, description="log prompt and reply text (off: counts and ids only)")

    @model_validator(mode="after")
    def _keys_named(self) -> IngressArgs:
        if self.require_api_keys and not self.api_keys_env:
            raise ValueError("require_api_keys needs api_keys_env: the variable that holds the keys")
        return self

    @model_validator(mode="before")
    @classmethod
    def _flat_limits(cls, values: Any) -> Any:
        """`max_body_bytes: N` at the top level means `limits: {max_body_bytes: N}` (likewise max_prompt_chars)."""
        if not isinstance(values, dict) or not any(key in values for key in _FLAT_LIMITS):
            return values
        values = dict(values)
        limits = values.get("limits") or {}
        limits = dict(limits) if isinstance(limits, dict) else limits.model_dump(exclude_unset=True)
        for key in _FLAT_LIMITS:
            if key in values:
                if key in limits:
                    raise ValueError(f"{key} is given twice: at the top level and under limits")
                limits[key] = values.pop(key)
        values["limits"] = limits
        return values


class IngressConfig(IngressArgs):
    """The ingress's args plus the pools it routes to, highest precision first (resolved by `build_app`)."""

    pool_names: list[str] = Field(min_length=1)
    adapters: dict[str, list[str]] = Field(default_factory=dict)  # adapter -> the pools it is enabled on

    @property
    def default_pool(self) -> str:
        return self.default_model or self.pool_names[0]
