"""IngressConfig: what the ingress replica reads of the app's args, and nothing else.

The YAML keys the ingress reads (routing, request defaults and limits, security) are defined here once, with their
defaults, as `IngressArgs`; the application's args (`AppArgs`, serve_app/config.py) inherit them, so the keys users
write stay flat. `build_app` resolves one `IngressConfig` (these keys plus the pool names) and binds it to the
ingress alone. Torch-free, like the rest of the front end.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.pool_choice import ROUTING_POLICIES


class FrozenArgs(BaseModel):
    """Every config model: a misspelt key fails instead of being ignored, and nothing changes after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationDefaults(FrozenArgs):
    """Used when a request leaves a parameter out (the official api.py's defaults)."""

    temperature: float = Field(default=0.95, ge=0.0, le=2.0)
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    max_length: int = Field(default=2048, ge=1, description="prompt + reply tokens when a request gives no limit")


class IngressArgs(FrozenArgs):
    """The app args the ingress reads."""

    default_model: str | None = Field(default=None, description="pool for requests that name no model; default: first")
    routing: ROUTING_POLICIES = Field(
        default="default", description="'auto' sends requests that name no model to the best pool with headroom")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults,
                                         description="sampling defaults for requests that leave them out")
    max_history_rounds: int = Field(default=10, ge=0, description="history kept by /chat and /stream")
    max_prompt_chars: int = Field(default=32768, ge=1, description="longest accepted user message")
    api_keys_env: str | None = Field(
        default=None, description="environment variable (in the ingress replica) holding comma-separated API keys; "
        "when it is set and non-empty every protocol requires one of them (HTTP/WebSocket/gRPC: Bearer <key>)")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="browser origins allowed by CORS (exact match; '*' allows any)")
    max_body_bytes: int = Field(default=1_048_576, ge=1, description="largest accepted HTTP request body (else 413)")
    log_prompts: bool = Field(default=False, description="log prompt and reply text (off: counts and ids only)")


class IngressConfig(IngressArgs):
    """The ingress's args plus the pools it routes to, highest precision first (resolved by `build_app`)."""

    pool_names: list[str] = Field(min_length=1)

    @property
    def default_pool(self) -> str:
        return self.default_model or self.pool_names[0]
