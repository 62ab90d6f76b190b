"""Fixtures of the API modules that run against the shared demo service (tests/conftest.py's `demo`); a module
that deploys its own application defines its own `base_url`, which takes precedence."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def base_url(demo):
    return demo[0]


@pytest.fixture(scope="module")
def client(base_url):
    """The official openai client against `base_url`, retries off (a test sees the first answer)."""
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
