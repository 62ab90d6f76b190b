"""Conversation affinity: a Serve request router that sends a chat's next turn to the replica holding its KV.

The engine keeps the full KV blocks of a finished sequence, keyed by their prefix, and shares them with any later
prompt that starts the same way (serve_app/engine/blocks.py), so turn 2 of a conversation skips the prefill of turn
1 — but only on the replica that ran turn 1. Serve's default router (power of two choices on queue length) spreads the turns of one conversation over the
pool, and the reuse is lost exactly when the pool scales out. This router, configured per pool in the Serve YAML:

    deployments:
      - name: chatglm2-6b-int4
        request_router_config:
          request_router_class: serve_app.server.router.ConversationAffinityRouter
          request_router_kwargs: {max_imbalance: 8}

picks for each chat turn (a `TextRequest` with a `ChatPrompt`) a preferred replica:

1. the replica this router sent the conversation's previous turn to (keyed by a hash of system, history and query,
   so the next turn, whose history ends with this turn, finds it), else
2. the conversation's rendezvous-hash choice among the running replicas (keyed by system and first query), which
   every ingress replica computes alike, without shared state, and which moves only the conversations of a replica
   that goes away.

The preferred replica gets the turn while it has headroom: fewer ongoing requests than its `max_ongoing_requests`,
and at most `max_imbalance` more than the least loaded other replica (Serve's queue-length cache). Otherwise, and
for requests that are not chat turns (raw completions, `engine_stats`), the least loaded replica gets it. A replica
that is full rejects the request (Serve's rejection protocol) and the next rank is tried, so affinity never queues a
request behind a busy replica while another one is free.

Why not `ray.serve.llm`'s PrefixCacheAffinityRouter: it reads the prompt from a `prompt` or `messages` attribute
(TextRequest has query/history/system) and raises otherwise; it records prompts only, not answers, so a turn-2
prompt matches a small fraction of its text; it keeps its prefix tree in one detached actor without restarts, which a
lost node can take down with it; and its public module needs pyarrow, which this image does not install. Ray's
experimental ConsistentHashRouter keys on a session header that OpenAI clients do not send, and ignores load until a
replica refuses.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.server.messages import ChatPrompt, TextRequest


class AffinityArgs(BaseModel):
    """`request_router_kwargs` of ConversationAffinityRouter."""

    model_config = ConfigDict(extra="forbid")

    max_imbalance: int = Field(
        default=8, ge=0, description="keep a turn on its conversation's replica while that replica has at most this "
        "many more ongoing requests than the least loaded one (and fewer than its max_ongoing_requests)")
    max_conversations: int = Field(
        default=100_000, ge=1, description="conversations whose last replica is remembered (least recent dropped)")


def _digest(*parts) -> str:
    # Stable across processes (unlike hash()): every ingress replica must compute the same keys.
    text = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Turn:
    """Keys of one chat turn: the conversation, the state it continues from, and the state it leaves."""

    conversation: str  # system + first user query: the same for every turn of a conversation
    continues: str | None  # `leaves` of the previous turn; None for a first turn
    leaves: str  # system + history + this query: what the replica holds KV for after this turn

    @classmethod
    def of(cls, prompt: ChatPrompt) -> Turn:
        history = [[query, answer] for query, answer in prompt.history]
        first = history[0][0] if history else prompt.query
        continues = None
        if history:
            continues = _digest(prompt.system, history[:-1], history[-1][0])
        return cls(_digest(prompt.system, [], first), continues, _digest(prompt.system, history, prompt.query))


def chat_turn(pending_request: PendingRequest | None) -> Turn | None:
    """The turn a request to a pool's `generate` carries, or None for anything else."""
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, TextRequest) and isinstance(arg.prompt, ChatPrompt):
            return Turn.of(arg.prompt)
    return None


class ConversationAffinityRouter(MultiplexMixin, RequestRouter):
    """Routes a conversation's turns to one replica while it has headroom; the least loaded replica otherwise.

    A request for an adapter (its handle sets `multiplexed_model_id`) first goes among the replicas that hold that
    adapter, as Serve's default router does (MultiplexMixin: those that hold it, else those that hold the fewest,
    for a short while, then all), with conversation affinity inside that set."""

    def initialize_state(self, **kwargs) -> None:
        self.args = AffinityArgs(**kwargs)
        self._last_replica: OrderedDict[str, ReplicaID] = OrderedDict()

    def _queue_len(self, replica: RunningReplica) -> int | None:
        return self._replica_queue_len_cache.get(replica.replica_id) if self._use_replica_queue_len_cache else None

    def preferred(self, turn: Turn, replicas: list[RunningReplica]) -> RunningReplica:
        """The replica that ran the previous turn if it still runs, else the conversation's rendezvous choice."""
        if turn.continues is not None:
            last = self._last_replica.get(turn.continues)
            for replica in replicas:
                if replica.replica_id == last:
                    return replica
        return max(replicas, key=lambda r: _digest(turn.conversation, r.replica_id.unique_id))

    def has_headroom(self, replica: RunningReplica, others: list[RunningReplica]) -> bool:
        ongoing = self._queue_len(replica)
        if ongoing is None:
            return True  # not known lately: Serve probes it, and a full replica rejects
        if ongoing >= replica.max_ongoing_requests:
            return False
        known = [n for n in (self._queue_len(r) for r in others) if n is not None]
        return not known or ongoing - min(known) <= self.args.max_imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks for Serve: [[preferred], [the others]] when affinity holds, else [[all]] (least loaded wins)."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            holding = self.apply_multiplex_routing(pending_request)
            first = [r for r in candidate_replicas if r.replica_id in holding]
            rest = [r for r in candidate_replicas if r.replica_id not in holding]
            if first and rest:
                return self._by_affinity(first, pending_request) + [rest]
        return self._by_affinity(candidate_replicas, pending_request)

    def _by_affinity(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        turn = chat_turn(pending_request)
        if turn is None or len(candidate_replicas) < 2:
            return [list(candidate_replicas)]
        preferred = self.preferred(turn, candidate_replicas)
        others = [r for r in candidate_replicas if r is not preferred]
        if self.has_headroom(preferred, others):
            return [[preferred], others]
        return [list(candidate_replicas)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        turn = chat_turn(pending_request)
        if turn is None:
            return
        # The previous turn's entry stays: a client that regenerates this turn sends it again.
        self._last_replica[turn.leaves] = replica_id
        self._last_replica.move_to_end(turn.leaves)
        while len(self._last_replica) > self.args.max_conversations:
            self._last_replica.popitem(last=False)
