"""Shared fixtures: demo checkpoints written once per test session, in the official layout."""

from __future__ import annotations

import os

# Triton's interpreter has to be on before anything imports triton (inductor does, as do the flex tests): the
# language's own jit functions (tl.zeros, ...) are decorated at that import. The Triton kernel tests run through it
# on CPU tensors; the ahead-of-time compile test starts its own process without it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from serve_app.model.demo import write_demo_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny preset as pytorch_model.bin, written by the project's own demo writer."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from serve_app.model.tokenizer import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_checkpoint):
    from serve_app.model.loader import load_model

    return load_model(tiny_checkpoint, "fp32", "cpu")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def demo(tiny_checkpoint):
    """(HTTP base URL, gRPC port) of configs/local.yaml served with the tiny checkpoint, shared by every module that
    uses this fixture (one Ray start-up instead of one per module)."""
    from tests.serving import demo_service

    return demo_service(tiny_checkpoint)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_demo_service_at_the_end():
    yield
    from tests.serving import stop_demo_service

    stop_demo_service()


def pytest_collection_modifyitems(items):
    """The modules on the shared demo service run one after another (a stable sort), so it starts once."""
    items.sort(key=lambda item: 0 if "demo" in item.fixturenames else 1)
