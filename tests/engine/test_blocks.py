"""The block pool: references, prefix keys, LRU eviction of cached blocks, and what must never happen (a block in
use evicted, a prefix shared under another prefix's key)."""

from __future__ import annotations

import pytest

from serve_app.engine.blocks import BlockPool, block_keys


def test_keys_chain_every_token_before_and_the_salt():
    a = block_keys(list(range(12)), 4)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_keys(list(range(13)), 4) == a  # the partial block has no key
    b = block_keys([0, 1, 2, 3, 9, 5, 6, 7, 8, 9, 10, 11], 4)
    assert b[0] == a[0] and b[1] != a[1] and b[2] != a[2]  # one token differs: every later key differs
    assert block_keys(list(range(12)), 4, salt=b"adapter-1")[0] != a[0]
    # Keys from block 1 on, given block 0's, are the same chain.
    assert block_keys(list(range(12)), 4, start=a[0], first=1) == a[1:]


def test_allocation_prefers_the_next_block_then_the_lowest_free():
    pool = BlockPool(8, 4)
    first = pool.allocate()
    assert (first, pool.allocate(after=first), pool.allocate(after=first)) == (0, 1, 2)  # 1 is taken: lowest free
    pool.release([1])
    assert pool.allocate(after=0) == 1
    assert pool.num_held == 3 and pool.num_free == 5


def test_a_released_keyed_block_is_cached_and_found_by_its_prefix():
    pool = BlockPool(4, 4)
    keys = block_keys(list(range(8)), 4)
    blocks = [pool.allocate(), pool.allocate()]
    for block, key in zip(blocks, keys):
        pool.register(block, key)
    pool.release(blocks)
    assert (pool.num_cached, pool.num_free, pool.available) == (2, 2, 4)
    assert pool.match(keys + [b"unknown"]) == blocks
    assert pool.refs[:2] == [1, 1] and pool.num_cached == 0 and pool.hits == 2
    # A prefix is found while another sequence still holds it too (shared by reference count).
    assert pool.match(keys[:1]) == blocks[:1] and pool.refs[0] == 2
    assert pool.match(block_keys([9] * 8, 4)) == []


def test_eviction_takes_the_least_recently_released_and_never_a_held_block():
    pool = BlockPool(3, 2)
    keys = block_keys(list(range(6)), 2)
    held = [pool.allocate() for _ in range(3)]
    for block, key in zip(held, keys):
        pool.register(block, key)
    pool.release([held[0]])
    pool.release([held[2]])
    # Free blocks: none; cached: 0 (released first), then 2. Block 1 is held.
    assert pool.allocate() == 0 and pool.evictions == 1
    assert pool.match(keys[:1]) == []  # its prefix went with it
    assert pool.allocate() == 2
    with pytest.raises(RuntimeError, match="no free KV block"):
        pool.allocate()  # block 1 is held: never evicted
    assert pool.refs == [1, 1, 1]


def test_a_sequences_last_blocks_are_evicted_first():
    pool = BlockPool(3, 2)
    keys = block_keys(list(range(6)), 2)
    blocks = [pool.allocate() for _ in range(3)]
    for block, key in zip(blocks, keys):
        pool.register(block, key)
    pool.release(blocks)
    assert pool.allocate() == 2  # the end of the prefix goes first; its start (shared most) stays
    assert pool.match(keys) == [0, 1]


def test_a_second_copy_of_a_prefix_is_not_keyed_and_bad_kv_is_not_kept():
    pool = BlockPool(4, 2)
    (key,) = block_keys([1, 2], 2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, key)
    pool.register(b, key)  # the same prefix computed twice: the first copy stays the shared one
    pool.release([b])
    assert pool.num_cached == 0 and pool.num_free == 3
    pool.release([a], keep=False)  # a failed sequence's blocks: never shared
    assert pool.num_cached == 0 and pool.match([key]) == []


def test_caching_off_shares_nothing():
    pool = BlockPool(2, 2, caching=False)
    (key,) = block_keys([1, 2], 2)
    block = pool.allocate()
    pool.register(block, key)
    pool.release([block])
    assert pool.match([key]) == [] and pool.num_free == 2


def test_releasing_twice_is_an_error():
    pool = BlockPool(2, 2)
    block = pool.allocate()
    pool.release([block])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([block])


def test_a_pending_prefix_is_known_until_computed_or_released():
    pool = BlockPool(4, 2)
    key_a, key_b = block_keys([1, 2, 3, 4], 2)
    a, b = pool.allocate(), pool.allocate()
    pool.pend(a, key_a)
    pool.pend(b, key_b)
    assert pool.is_pending(key_a) and pool.match([key_a]) == []  # not shareable before it is computed
    pool.register(a, key_a)
    assert not pool.is_pending(key_a) and pool.is_pending(key_b)
    pool.release([b])  # its sequence went away before computing it
    assert not pool.is_pending(key_b)


def test_a_run_with_room_to_grow_is_set_aside_softly():
    pool = BlockPool(12, 4)
    a = pool.allocate_run(2, 5, owner="a")  # blocks 0, 1 now; 2, 3, 4 set aside for a's growth
    b = pool.allocate_run(2, 3, owner="b")  # placed after a's room: 5, 6; 7 aside
    assert (a, b) == ([0, 1], [5, 6])
    assert pool.allocate(after=1, owner="a") == 2  # a grows into its room: still one run
    assert pool.allocate(after=6, owner="b") == 7
    assert pool.allocate(after=7, owner="b") == 8  # past its room: the next free block nobody set aside
    assert pool.allocate() == 9  # a newcomer skips a's room (3, 4)
    pool.unreserve("a")
    assert pool.allocate() == 3
    # Under pressure a room is taken by others: nothing is refused while any block is free.
    pool.allocate_run(1, 3, owner="c")  # 4 now: 10, 11 do not make a run of 3, so c gets 4 and no room
    assert pool.allocate() == 10 and pool.allocate() == 11 and pool.available == 0
    assert sorted(pool._reserved) == []


def test_another_sequences_room_is_taken_only_when_nothing_else_is_free():
    pool = BlockPool(4, 4)
    assert pool.allocate_run(1, 4, owner="a") == [0]  # 1, 2, 3 aside
    assert pool.allocate(owner="b") == 1  # all free blocks are a's room: b takes one
    assert pool.allocate(after=0, owner="a") == 2  # 1 is gone: a still gets a block of its room


def test_growth_room_is_capped():
    from serve_app.engine.blocks import MAX_GROWTH_ROOM

    pool = BlockPool(64, 4)
    assert pool.allocate_run(2, 1000, owner="long") == [0, 1]  # a huge max_tokens sets aside a few blocks only
    assert len(pool._reservations["long"]) == MAX_GROWTH_ROOM
    assert pool.allocate() == 2 + MAX_GROWTH_ROOM
