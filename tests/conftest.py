"""Shared fixtures: demo checkpoints written once per test session, in the official layout."""

from __future__ import annotations

import pytest
import torch

from serve_app.model.demo import write_demo_checkpoint


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
