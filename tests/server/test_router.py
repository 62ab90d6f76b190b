"""ConversationAffinityRouter against fake replicas: a conversation's turns stay on one replica while it has
headroom, fall back to the least loaded otherwise, and every router instance (one per ingress replica) agrees."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from serve_app.engine.params import SamplingParams
from serve_app.server.messages import ChatPrompt, RawPrompt, TextRequest
from serve_app.server.router import ConversationAffinityRouter, chat_turn

POOL = DeploymentID(name="chatglm2-6b-int4", app_name="chatglm2")


@dataclass(eq=False)
class FakeReplica:
    """What the router reads of a RunningReplica."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 8


def fake_replicas(n: int) -> list[FakeReplica]:
    return [FakeReplica(ReplicaID(f"r{i}", POOL)) for i in range(n)]


def make_router(**kwargs) -> ConversationAffinityRouter:
    router = ConversationAffinityRouter(deployment_id=POOL, handle_source=DeploymentHandleSource.REPLICA,
                                        use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def request(query: str, history=(), system=None) -> TextRequest:
    return TextRequest("id", SamplingParams(), ChatPrompt(query, [list(turn) for turn in history], system))


def completion(text: str) -> TextRequest:
    return TextRequest("id", SamplingParams(), RawPrompt(text))


def pending(*args) -> PendingRequest:
    return PendingRequest(args=list(args), kwargs={}, metadata=RequestMetadata("id", "internal"))


def turn(*args):
    """chat_turn of a request with these arguments (a PendingRequest needs an event loop)."""

    async def go():
        return chat_turn(pending(*args))

    return asyncio.run(go())


def route(router, replicas, *args, loads: dict | None = None) -> FakeReplica:
    """What Serve does with the ranks: the first rank's least loaded replica that has room, then record it."""

    async def go():
        for replica, load in (loads or {}).items():
            router.on_new_queue_len_info(replica.replica_id, load)
        req = pending(*args)
        for rank in await router.choose_replicas(replicas, req):
            free = [r for r in rank if (loads or {}).get(r, 0) < r.max_ongoing_requests]
            if free:
                chosen = min(free, key=lambda r: (loads or {}).get(r, 0))
                router.on_request_routed(req, chosen.replica_id, None)
                return chosen
        raise AssertionError("no replica chosen")

    return asyncio.run(go())


def conversation(router, replicas, first: str, turns: int, loads=None) -> list[FakeReplica]:
    """Route `turns` turns of one conversation (answers are made up; the router never sees them generated)."""
    history, served = [], []
    query = first
    for i in range(turns):
        served.append(route(router, replicas, request(query, history), loads=loads))
        history.append([query, f"answer {i} to {query}"])
        query = f"follow-up {i}"
    return served


def test_every_turn_of_a_conversation_goes_to_one_replica():
    router, replicas = make_router(), fake_replicas(4)
    placements = [conversation(router, replicas, f"conversation {c}", turns=4) for c in range(24)]
    assert all(len(set(served)) == 1 for served in placements)
    # Different conversations spread over the pool (rendezvous hashing of the first query).
    assert len({served[0] for served in placements}) >= 3


def test_ingress_replicas_agree_without_sharing_state():
    replicas = fake_replicas(3)
    first, other = make_router(), make_router()
    for c in range(12):
        turn1 = route(first, replicas, request(f"q{c}", system="be brief"))
        # Turn 2 arrives at another ingress replica, which never saw turn 1.
        turn2 = route(other, replicas, request("more", [[f"q{c}", "a"]], system="be brief"))
        assert turn1 is turn2


def test_a_busy_replica_loses_the_turn_to_the_least_loaded():
    router, replicas = make_router(max_imbalance=2), fake_replicas(3)
    home = route(router, replicas, request("hello"))
    others = [r for r in replicas if r is not home]
    # Within the imbalance bound the conversation stays ...
    loads = {home: 3, others[0]: 1, others[1]: 2}
    assert route(router, replicas, request("again", [["hello", "hi"]]), loads=loads) is home
    # ... beyond it the least loaded replica takes the turn ...
    loads = {home: 4, others[0]: 1, others[1]: 2}
    assert route(router, replicas, request("again", [["hello", "hi"]]), loads=loads) is others[0]
    # ... and the next turn follows the KV to where this one ran.
    assert route(router, replicas, request("third", [["hello", "hi"], ["again", "ok"]]), loads={}) is others[0]


def test_a_full_replica_never_gets_the_turn():
    router, replicas = make_router(max_imbalance=100), fake_replicas(2)
    home = route(router, replicas, request("hello"))
    other = next(r for r in replicas if r is not home)
    loads = {home: home.max_ongoing_requests, other: 0}
    assert route(router, replicas, request("again", [["hello", "hi"]]), loads=loads) is other


def test_requests_that_are_not_chat_turns_go_to_the_least_loaded():
    router, replicas = make_router(), fake_replicas(3)
    loads = {replicas[0]: 2, replicas[1]: 0, replicas[2]: 1}
    assert turn(completion("[Round 1]")) is None
    assert turn() is None  # engine_stats
    assert route(router, replicas, completion("[Round 1]"), loads=loads) is replicas[1]
    assert route(router, replicas, loads=loads) is replicas[1]


def test_losing_a_replica_moves_only_its_conversations():
    router, replicas = make_router(), fake_replicas(4)
    before = {c: route(router, replicas, request(f"c{c}")) for c in range(40)}
    lost = replicas[1]
    survivors = [r for r in replicas if r is not lost]
    fresh = make_router()  # e.g. a restarted ingress: rendezvous hashing alone
    for c, home in before.items():
        again = route(fresh, survivors, request("next", [[f"c{c}", "a"]]))
        if home is not lost:
            assert again is home
    # The remembered replica is skipped once it is gone.
    moved = next(c for c, home in before.items() if home is lost)
    assert route(router, survivors, request("next", [[f"c{moved}", "a"]])) in survivors


def test_system_and_history_are_part_of_the_key():
    second = turn(request("q2", [["q1", "a1"]]))
    assert second.continues == turn(request("q1")).leaves
    assert second.continues != turn(request("q1", system="sys")).leaves
    assert second.conversation == turn(request("q1")).conversation != turn(request("q1", system="sys")).conversation


def test_unknown_router_arguments_are_refused():
    with pytest.raises(ValidationError):
        make_router(max_imbalanse=3)
    with pytest.raises(ValidationError):
        make_router(max_imbalance=-1)


@dataclass(eq=False)
class HoldingReplica(FakeReplica):
    """A replica that holds some adapters (Serve's multiplexed model ids)."""

    multiplexed_model_ids: frozenset = frozenset()
    node_id: str = "node"
    availability_zone: str | None = None


def test_an_adapter_request_goes_to_a_replica_that_holds_it_then_to_its_conversation():
    router = make_router()
    replicas = [HoldingReplica(ReplicaID(f"r{i}", POOL), multiplexed_model_ids=frozenset(ids))
                for i, ids in enumerate([(), ("lora-a",), ("lora-a", "pt"), ()])]
    router._update_multiplexed_model_ids_with_replicas(replicas)  # what Serve's update_replicas calls

    async def ranks(model_id, *args):
        req = PendingRequest(args=list(args), kwargs={}, metadata=RequestMetadata("id", "internal",
                                                                                  multiplexed_model_id=model_id))
        return [[r.replica_id.unique_id for r in rank] for rank in await router.choose_replicas(replicas, req)]

    first = asyncio.run(ranks("pt", request("hi")))
    assert first[0] == ["r2"] and sorted(first[-1]) == ["r0", "r1", "r3"]
    held = asyncio.run(ranks("lora-a", request("hi")))
    # Among the two holders, the conversation's rendezvous choice comes first; the others last.
    assert sorted(sum(held[:-1], [])) == ["r1", "r2"] and sorted(held[-1]) == ["r0", "r3"]
    assert len(asyncio.run(ranks("", request("hi")))[0]) == 1  # no adapter: affinity over all four
