"""The paged KV cache's blocks on the host: who holds which, and which hold a prefix worth keeping.

Every block is in one of three states:

- free: holds nothing anyone will look up;
- held: in the block table of one or more running sequences (`refs` counts them);
- cached: held by nobody but full of a known prefix's KV, kept for reuse and evicted least recently used first when a
  free block is needed.

A full block is keyed by a digest of every token id up to and including its own (a chain: the digest of the block
before, then this block's ids) and of a `salt` that stands for anything else that changes the KV (an adapter id, a
fine-tuned prefix): two sequences share a block only when all of that agrees. The digest is BLAKE2b, so a client
cannot make two different prefixes collide and read another's KV. A block is registered once its last position's
KV has been computed; a block still being written is never shared, and a shared block is never written again (the
engine leaves at least the last prompt token to compute, in a block of the sequence's own). A prompt block that a
running sequence is computing is `pending` under its key until then: the engine holds back a prompt that needs it
rather than compute the same prefix twice (16 chats that arrive together with one system prompt compute it once).

Not thread-safe: the engine's lock guards it.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence


def block_keys(token_ids: Sequence[int], block_size: int, salt: bytes = b"", start: bytes | None = None,
               first: int = 0) -> list[bytes]:
    """The keys of the full blocks of `token_ids`, from block `first` on (`start`: the key of block first - 1)."""
    keys, previous = [], start if start is not None else salt
    for index in range(first, len(token_ids) // block_size):
        chunk = token_ids[index * block_size : (index + 1) * block_size]
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(b"".join(int(t).to_bytes(4, "little") for t in chunk))
        previous = digest.digest()
        keys.append(previous)
    return keys


# Blocks set aside after a new sequence's first ones for it to grow into: enough for most replies to stay one run,
# few enough that one request with a large max_tokens does not fence off a large part of the cache.
MAX_GROWTH_ROOM = 8


class BlockPool:
    """Free, held and cached blocks (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs = [0] * num_blocks
        self._free = set(range(num_blocks))
        self._heap = list(range(num_blocks))  # the free blocks, lowest first (lazy: taken ones are skipped)
        # Free blocks set aside for a sequence's growth, so that its table stays one run (a view, not a gather, for
        # the CPU's attention). Soft: taken by anyone once no other free block is left.
        self._reserved: dict[int, Hashable] = {}
        self._reservations: dict[Hashable, set[int]] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 and keyed, least recently released first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}  # key -> the block a running sequence is computing it in
        self._pending_key: dict[int, bytes] = {}
        self.hits = 0  # blocks found by `match`
        self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks an allocation can take: free ones and cached ones (evicted on the way)."""
        return len(self._free) + len(self._cached)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks held by nobody that keep a prefix for reuse."""
        return len(self._cached)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    def match(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of `keys` that are cached or held, each now referenced once more."""
        found = []
        if not self.caching:
            return found
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._take(block)
        self.hits += len(found)
        return found

    def share(self, blocks: list[int]) -> None:
        """One more reference to each of these held blocks (a P-tuning prefix's, which its adapter holds)."""
        for block in blocks:
            if not self.refs[block]:
                raise RuntimeError(f"block {block} is shared but nobody holds it")
            self.refs[block] += 1

    def allocate(self, after: int | None = None, owner: Hashable | None = None) -> int:
        """A block for new KV (referenced once): the one after `after` when it is free and not set aside for
        another owner (a sequence's blocks in a run read as one view), else the lowest free block nobody set aside,
        else the least recently used cached block (evicted), else a block set aside for someone else."""
        following = None if after is None else after + 1
        if following in self._free and self._reserved.get(following, owner) == owner:
            block = following
        elif (block := self._lowest_unreserved()) is not None:
            pass
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
            self._free.add(block)
        elif self._free:
            block = min(self._free)  # every free block is set aside: take one from another sequence's growth
        else:
            raise RuntimeError("no free KV block (the scheduler checks `available` first)")
        self._take(block)
        return block

    def allocate_run(self, count: int, reserve: int, owner: Hashable) -> list[int]:
        """`count` blocks for a new sequence, and up to `reserve` - count (at most MAX_GROWTH_ROOM) more set aside for
        it to grow into, all one run when the lowest free blocks nobody set aside allow it; otherwise blocks wherever
        they are free."""
        reserve = min(reserve, count + MAX_GROWTH_ROOM)
        start = self._lowest_unreserved()
        if start is not None and all(b in self._free and b not in self._reserved
                                     for b in range(start, start + max(reserve, count))):
            blocks = list(range(start, start + count))
            for block in blocks:
                self._take(block)
            aside = set(range(start + count, start + reserve))
            for block in aside:
                self._reserved[block] = owner
            if aside:
                self._reservations.setdefault(owner, set()).update(aside)
            return blocks
        blocks: list[int] = []
        for _ in range(count):
            blocks.append(self.allocate(after=blocks[-1] if blocks else None, owner=owner))
        return blocks

    def unreserve(self, owner: Hashable) -> None:
        """Give back what was set aside for `owner` (it finished or was preempted)."""
        for block in self._reservations.pop(owner, ()):
            if self._reserved.get(block) == owner:
                del self._reserved[block]
                heapq.heappush(self._heap, block)  # a candidate for anyone again

    def _lowest_unreserved(self) -> int | None:
        """The lowest free block nobody set aside. Set-aside and taken blocks leave the heap as they are met (each
        once per reservation: `unreserve` puts a block back), so this is amortized O(log blocks)."""
        while self._heap:
            block = self._heap[0]
            if block in self._free and block not in self._reserved:
                return block
            heapq.heappop(self._heap)
        return None

    def pend(self, block: int, key: bytes) -> None:
        """Block `block` is about to hold the prefix `key` (its sequence is computing it)."""
        if self.caching and key not in self._pending and key not in self._block_of:
            self._pending[key] = block
            self._pending_key[block] = key

    def is_pending(self, key: bytes) -> bool:
        return key in self._pending

    def register(self, block: int, key: bytes) -> None:
        """Block `block` now holds the full prefix `key`: later sequences with that prefix may share it."""
        self._unpend(block)
        if not self.caching or block in self._key_of or key in self._block_of:
            return  # already keyed, or the same prefix is in another block (that one stays the shared copy)
        self._key_of[block] = key
        self._block_of[key] = block

    def release(self, blocks: list[int], keep: bool = True) -> None:
        """Drop one reference to each block. A block nobody holds becomes cached when it is keyed (and `keep`), else
        free. Released in reverse, so that a sequence's last blocks, the least shared, are evicted first."""
        for block in reversed(blocks):
            self._unpend(block)
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than it was taken")
            if self.refs[block]:
                continue
            if keep and block in self._key_of:
                self._cached[block] = None
            else:
                key = self._key_of.pop(block, None)
                if key is not None:
                    del self._block_of[key]
                self._free.add(block)
                heapq.heappush(self._heap, block)

    def _unpend(self, block: int) -> None:
        key = self._pending_key.pop(block, None)
        if key is not None:
            del self._pending[key]

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self._free.discard(block)
            self._cached.pop(block, None)
            owner = self._reserved.pop(block, None)
            if owner is not None:
                self._reservations[owner].discard(block)
        self.refs[block] += 1
