"""Fake pools for the front end's fast tests: Serve handles whose generations follow a script, and a real
IngressConfig for the ingress parts under test. No Ray is started."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serve_app.api.ingress_config import IngressConfig
from serve_app.api.pool_client import PoolClient
from serve_app.engine.params import SamplingParams
from serve_app.server.messages import ChatPrompt, TextDelta, TextRequest, Tokens, Usage

POOL = "pool-a"
CONFIG = IngressConfig(pool_names=[POOL], max_prompt_chars=100)
REQUEST = TextRequest(request_id="r", params=SamplingParams(), prompt=ChatPrompt("hi"))
DONE = TextDelta(text="!", finish_reason="stop", usage=Usage(3, 2))


class Generation:
    """What `handle.options(stream=True).generate.remote(request)` returns: deltas (or exceptions) one at a time."""

    def __init__(self, script: list, hold: bool = False):
        self.script, self.hold, self.cancelled = list(script), hold, False

    async def __anext__(self) -> TextDelta:
        await asyncio.sleep(0)
        if not self.script:
            if self.hold:  # a generation still running
                await asyncio.Event().wait()
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A pool's DeploymentHandle: `generate` streams `script`, `tokenize`/`detokenize` answer `tokens`."""

    def __init__(self, script: list | None = None, tokens: Tokens | BaseException | None = None, hold: bool = False):
        self.script, self.tokens, self.hold = script or [], tokens, hold
        self.generations: list[Generation] = []

    def options(self, stream: bool = False) -> Handle:
        return self

    @property
    def generate(self):
        def remote(request):
            self.generations.append(Generation(self.script, self.hold))
            return self.generations[-1]

        return SimpleNamespace(remote=remote)

    def _answer(self, *args):
        async def answer():
            if isinstance(self.tokens, BaseException):
                raise self.tokens
            return self.tokens

        return answer()

    @property
    def tokenize(self):
        return SimpleNamespace(remote=self._answer)

    @property
    def detokenize(self):
        return SimpleNamespace(remote=self._answer)


def client_of(handle: Handle) -> PoolClient:
    return PoolClient({POOL: handle}, CONFIG)


def in_flight(client: PoolClient) -> int:
    return client.router.load[POOL].in_flight
