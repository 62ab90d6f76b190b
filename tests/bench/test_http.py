"""The HTTP load tester refuses to report throughput for work other than what it says it sent."""

from __future__ import annotations

import pytest

from serve_app.bench.engine_bench import RequestRecord
from serve_app.bench.served import Served, UsageMismatch, check_usage


def served(prompt_tokens: int, output_tokens: int) -> Served:
    return Served(RequestRecord(ttft_s=0.1, latency_s=1.0, output_tokens=output_tokens), prompt_tokens, text_chunks=3)


def test_usage_equal_to_what_was_sent_passes():
    check_usage(served(64, 32), prompt=list(range(64)), max_new_tokens=32)


@pytest.mark.parametrize(("prompt_tokens", "output_tokens"), [(96, 32), (64, 31), (63, 32)])
def test_a_usage_mismatch_is_an_error(prompt_tokens, output_tokens):
    with pytest.raises(UsageMismatch, match=f"says {prompt_tokens} prompt and {output_tokens} completion tokens"):
        check_usage(served(prompt_tokens, output_tokens), prompt=list(range(64)), max_new_tokens=32)
