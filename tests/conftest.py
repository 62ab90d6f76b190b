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
    """Ray-starting modules in an order that keeps start-ups few and the process clean (a stable sort):

    1. the multi-node cluster tests (tests/server/test_cluster.py) first: their driver joins a cluster that `serve run`
       deployed, and Serve's handles in a process that already ran another Ray session time out (seen in a full run;
       alone, or first, they pass);
    2. the modules on the shared demo service, one after another, so it starts once;
    3. the rest, in file order."""
    def group(item) -> int:
        if item.module.__name__.endswith("test_cluster"):
            return 0
        return 1 if "demo" in item.fixturenames else 2

    items.sort(key=group)
